"""Job telemetry: phase timings kept on the job row, and Ray metrics from the worker side.

`merge_progress` folds a progress update into a job's progress dict and, when the phase
changes, adds the time spent in the phase that ended to `progress["phase_seconds"]`; the
API's `/metrics` (`oblivio_job_duration_seconds{phase}`) and the dashboard read it from the
database. In a Ray process it also records Ray metrics, exported by Ray's metrics agent on
every node (as `ray_oblivio_job_phase_seconds`, `ray_oblivio_training_loss`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

PHASE_BUCKETS = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
_metrics: dict[str, Any] | None = None


def merge_progress(progress: dict[str, Any] | None, update: dict[str, Any], *,
                   now: float | None = None, lineage: str | None = None) -> dict[str, Any]:
    """`progress` with `update` applied and the finished phase's seconds accumulated."""
    now = time.time() if now is None else now
    merged = {**(progress or {}), **update}
    old, new = (progress or {}).get("phase"), update.get("phase")
    started = (progress or {}).get("phase_started_at")
    if new is not None and new != old:
        if old is not None and isinstance(started, (int, float)):
            seconds = max(0.0, now - started)
            phases = dict(merged.get("phase_seconds") or {})
            phases[old] = round(phases.get(old, 0.0) + seconds, 3)
            merged["phase_seconds"] = phases
            _observe("phase", seconds, {"phase": str(old)})
        merged["phase_started_at"] = now
    loss = update.get("loss")
    if isinstance(loss, (int, float)):
        _observe("loss", float(loss), {"lineage": lineage or ""})
    return merged


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
