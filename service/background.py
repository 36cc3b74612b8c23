"""What `oblivio serve` runs beside the API: Ray, the dispatcher and the generation deployment.

Heavy imports (ray, torch) stay inside the function so the API import path remains light.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from service.settings import Settings

log = logging.getLogger(__name__)


class BackgroundWorkers(Protocol):
    def stop(self) -> None: ...


def start_background_workers(settings: Settings, app: Any = None) -> BackgroundWorkers | None:
    """Start Ray (local or `settings.ray_address`), the dispatcher actor and Ray Serve.

    With `app`, the runtime and the generation handle are attached to `app.state` so that
    /v1/generate and /v1/system can use them.
    """
    try:
        from workers.runtime import start_runtime
    except ImportError:
        log.info("workers package not installed; the API runs without a dispatcher")
        return None
    runtime = start_runtime(settings.worker_config())
    if app is not None:
        app.state.runtime = runtime
        app.state.generator = runtime.generator
    dashboard = runtime.info.get("ray_dashboard")
    if dashboard:
        print(f"Ray dashboard:   {dashboard}", flush=True)
    if settings.scheduler_enabled and app is not None:
        from service.scheduler import SchedulerLoop

        return _WithScheduler(runtime, SchedulerLoop(settings, app.state.sessions).start())
    return runtime


class _WithScheduler:
    """The runtime plus the scheduler thread; stops the scheduler first."""

    def __init__(self, runtime: BackgroundWorkers, scheduler: BackgroundWorkers) -> None:
        self.runtime, self.scheduler = runtime, scheduler

    def stop(self) -> None:
        self.scheduler.stop()
        self.runtime.stop()
