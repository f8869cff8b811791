"""The worker process: settings, metrics, probes and the graceful lifecycle of one worker."""

from ..loading import GraphLoadError, load_graph
from .metrics import PrometheusObserver
from .process import Worker, WorkerStartupError, run_worker
from .settings import ConnectionSettings, SettingsError, WorkerSettings, load_settings, mask_url

__all__ = [
    "ConnectionSettings",
    "GraphLoadError",
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
