"""The worker process: settings, metrics, probes and the graceful lifecycle of one worker."""

from .metrics import InstrumentedBus, InstrumentedStore, PrometheusObserver
from .process import GraphLoadError, Worker, WorkerStartupError, load_graph, run_worker
from .settings import ConnectionSettings, SettingsError, WorkerSettings, load_settings, mask_url

__all__ = [
    "ConnectionSettings",
    "GraphLoadError",
    "InstrumentedBus",
    "InstrumentedStore",
    "PrometheusObserver",
    "SettingsError",
    "Worker",
    "WorkerSettings",
    "WorkerStartupError",
    "load_graph",
    "load_settings",
    "mask_url",
    "run_worker",
]
