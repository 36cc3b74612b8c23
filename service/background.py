"""Hook for the work `oblivio serve` runs beside the API (the Ray dispatcher, schedules).

>>> HOOK: the Ray dispatcher is started from here by the workers' side. Keep the heavy
imports (ray, torch) inside the function, and return something with `stop()`, so that
`oblivio serve` can shut it down cleanly. Until then this is a no-op.
"""

from __future__ import annotations

import logging
from typing import Protocol

from service.settings import Settings

log = logging.getLogger(__name__)


class BackgroundWorkers(Protocol):
    def stop(self) -> None: ...


def start_background_workers(settings: Settings) -> BackgroundWorkers | None:
    """Start the background workers for `settings`; None when there is nothing to start."""
    try:
        import workers  # noqa: F401  (the Ray side may be absent in an API-only install)
    except ImportError:
        log.info("workers package not installed; the API runs without a dispatcher")
        return None
    return None
