"""Job telemetry from the worker side: progress updates on the job row, and Ray metrics.

`merge_progress` folds a progress update (phase, step, loss...) into a job's progress dict.
Phase timings have one source, the job's `workers.job_phases.PhaseClock`: the job runner
stores its record on the job (`progress["phases"]`, `["phase_seconds"]`, which the API's
`/metrics` `oblivio_job_duration_seconds{phase}` and the dashboard read from the database),
and `observe_phases` hands the same seconds to Ray. In a Ray process these functions record
Ray metrics, exported by Ray's metrics agent on every node (as
`ray_oblivio_job_phase_seconds`, `ray_oblivio_training_loss`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.job_phases import PhaseClock

log = logging.getLogger(__name__)

PHASE_BUCKETS = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
_metrics: dict[str, Any] | None = None


def merge_progress(progress: dict[str, Any] | None, update: dict[str, Any], *,
                   lineage: str | None = None) -> dict[str, Any]:
    """`progress` with `update` applied; a reported loss also goes to Ray's loss gauge."""
    merged = {**(progress or {}), **update}
    loss = update.get("loss")
    if isinstance(loss, (int, float)):
        _observe("loss", float(loss), {"lineage": lineage or ""})
    return merged


def observe_phases(clock: PhaseClock) -> None:
    """Each phase of a finished job, as the clock measured it, into Ray's phase histogram."""
    for phase, seconds in clock.seconds().items():
        _observe("phase", seconds, {"phase": phase})


def _observe(kind: str, value: float, tags: dict[str, str]) -> None:
    metrics = _ray_metrics()
    if metrics is None:
        return
    try:
        if kind == "phase":
            metrics["phase"].observe(value, tags=tags)
        else:
            metrics["loss"].set(value, tags=tags)
    except Exception:  # telemetry must never break a job
        log.debug("could not record a Ray metric", exc_info=True)


def _ray_metrics() -> dict[str, Any] | None:
    """Ray metrics, created on first use inside a Ray worker process (else None)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        from ray.util.metrics import Gauge, Histogram

        _metrics = {
            "phase": Histogram("oblivio_job_phase_seconds",
                               description="Seconds a job spent in each phase.",
                               boundaries=PHASE_BUCKETS, tag_keys=("phase",)),
            "loss": Gauge("oblivio_training_loss", description="Last training loss reported "
                          "by a job, by lineage.", tag_keys=("lineage",)),
        }
    except Exception:
        log.debug("Ray metrics unavailable", exc_info=True)
        return None
    return _metrics
