"""CPU priority of the work behind the API: training ranks and the dispatcher yield.

On a machine the API shares with training (one node, or a small cluster), a job's ranks
and its evaluation would otherwise take every core for minutes, and ticket submission and
generation would wait behind them (benchmarks/load.py). A niceness of 10 leaves the
background work the cores whenever the API is idle and costs it almost nothing otherwise.

Ray already starts its worker processes at niceness 15 (the raylet's worker_niceness), so
on a cluster `oblivio serve` starts, ranks and the dispatcher actor run below the API
anyway (and so do Serve replicas); this setting is a floor that also holds where workers
start at 0 (a cluster started with RAY_worker_niceness=0, the dispatcher-only process of
tests/fixtures/service_process.py), and it never raises a process's priority.

Linux keeps the nice value per thread (nice(2) changes only the calling one), and new
threads inherit their creator's: so every existing thread of the process is set, and the
threads torch or the dispatcher start later inherit it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

NICE_ENV = "OBLIVIO_BACKGROUND_NICE"


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: one call covers the process
        return [0]


def yield_cpu(nice: int) -> int:
    """Raise every thread of this process to niceness `nice` (never lowers it: an
    unprivileged process cannot). Returns the calling thread's niceness afterwards."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return os.nice(0) if hasattr(os, "nice") else 0
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # the thread ended meanwhile, or a platform that refuses
            log.debug("could not renice thread %s", tid, exc_info=True)
    return os.getpriority(os.PRIO_PROCESS, 0)


def yield_cpu_from_env() -> int:
    """In a Ray worker that runs background work (a training rank): the niceness the
    service passed down in its runtime environment (workers.runtime.ray_env)."""
    try:
        nice = int(os.environ.get(NICE_ENV, "0"))
    except ValueError:
        nice = 0
    return yield_cpu(nice)
