"""Test helpers for users' own graphs: a crash-injection harness on the in-memory adapters.

    report = await FaultHarness(StartNode, {"a1": Ctx(...), "a2": Ctx(...)}).check()

runs the agents once without faults, then once per protocol point and per step with the
"worker" crashed there, recovers on a fresh worker, and asserts that every agent ends in the
same state with the same history as the crash-free run.
"""

from .harness import CRASH_POINTS, FaultHarness, FaultReport, Outcome, SimulatedCrash
from .vbus import VirtualClock, VirtualTimeBus

__all__ = [
    "CRASH_POINTS",
    "FaultHarness",
    "FaultReport",
    "Outcome",
    "SimulatedCrash",
    "VirtualClock",
    "VirtualTimeBus",
]
