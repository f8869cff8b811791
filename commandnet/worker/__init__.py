"""The worker process: settings, metrics, probes and the graceful lifecycle of one worker.

Names load on first use, so a process that needs only the settings or the log setup (the
operator) imports neither the engine nor a store driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..loading import GraphLoadError, load_graph
    from .metrics import PrometheusObserver
    from .process import Worker, WorkerStartupError, run_worker
    from .settings import (
        BusSettings,
        ConnectionSettings,
        SettingsError,
        WorkerSettings,
        load_settings,
        mask_url,
    )

_HOMES = {
    "GraphLoadError": "..loading", "load_graph": "..loading",
    "PrometheusObserver": ".metrics",
    "Worker": ".process", "WorkerStartupError": ".process", "run_worker": ".process",
    "BusSettings": ".settings", "ConnectionSettings": ".settings", "SettingsError": ".settings",
    "WorkerSettings": ".settings", "load_settings": ".settings", "mask_url": ".settings",
}

__all__ = [
    "BusSettings",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)
