"""Where a job's time goes, phase by phase, from the ticket's submission to live.

Phases, in order (each a wall-clock span; they tile the time from submission to the end):

    queue_wait   the oldest ticket's submission -> the job starts
    preparing    the job starts -> the training loop's first step: base model, version row,
                 parent adapter, and inside the engine's train call the Ray Train / DeepSpeed
                 start-up, model loading, retain answers and reference log-probs
    training     the training loop itself (what the engine reports as its loop)
    teardown     the loop's end -> the engine's train call returns (saving the adapter, Ray
                 Train shutting its workers down)
    evaluation   the version's own evaluation (base vs new version on the probes)
    upload       manifest + storing the version in the object store
    promote      registering it, moving `live` (or `candidate`), settling the tickets

An engine that reports no loop timestamps (`loop_started_at` / `loop_finished_at`, epoch
seconds, in its training metrics) has its whole train call counted as training.
This clock is the one source of a job's phase timings. The record is stored as
`jobs.progress["phases"]` (spans) and `["phase_seconds"]` (the summary
`oblivio_job_duration_seconds{phase}` on /metrics reads it), shown by GET /v1/jobs/{id},
and its seconds go to Ray's `oblivio_job_phase_seconds` histogram
(`workers.telemetry.observe_phases`) when the job ends, failed jobs included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

PHASES = ("queue_wait", "preparing", "training", "teardown", "evaluation", "upload", "promote")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


class PhaseClock:
    """Collects the spans of one job (epoch seconds; every process on a node shares them)."""

    def __init__(self, *, submitted_at: datetime, started_at: float | None = None) -> None:
        self.submitted = submitted_at.timestamp()
        self.started = time.time() if started_at is None else started_at
        self.spans: dict[str, tuple[float, float]] = {}
        self.add("queue_wait", self.submitted, self.started)
        self._train_call: tuple[float, float] | None = None

    def add(self, name: str, start: float, end: float) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        self.spans[name] = (start, max(start, end))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(name, start, time.time())

    @contextmanager
    def train_call(self) -> Iterator[None]:
        """Around the engine's train call: split later by `split_training`."""
        start = time.time()
        try:
            yield
        finally:
            self._train_call = (start, time.time())
            self.add("preparing", self.started, start)
            self.add("training", start, self._train_call[1])

    def split_training(self, training_metrics: dict[str, Any] | None) -> None:
        """Use the loop's own timestamps to move start-up into `preparing` and the end into
        `teardown`, so `training` is the optimisation alone."""
        if self._train_call is None:
            return
        call_start, call_end = self._train_call
        metrics = training_metrics or {}
        loop_start, loop_end = metrics.get("loop_started_at"), metrics.get("loop_finished_at")
        if not isinstance(loop_start, (int, float)) or not isinstance(loop_end, (int, float)):
            return
        loop_start = min(max(loop_start, call_start), call_end)
        loop_end = min(max(loop_end, loop_start), call_end)
        self.add("preparing", self.started, loop_start)
        self.add("training", loop_start, loop_end)
        self.add("teardown", loop_end, call_end)

    def seconds(self) -> dict[str, float]:
        return {name: round(self.spans[name][1] - self.spans[name][0], 3)
                for name in PHASES if name in self.spans}

    def record(self, *, live: bool) -> dict[str, Any]:
        """What is stored on the job: each phase's span and seconds, and the totals."""
        end = max((e for _, e in self.spans.values()), default=self.started)
        total = end - self.submitted
        seconds = self.seconds()
        training = seconds.get("training", 0.0)
        return {
            "phases": {name: {"started_at": _iso(self.spans[name][0]),
                              "finished_at": _iso(self.spans[name][1]),
                              "seconds": seconds[name]}
                       for name in PHASES if name in self.spans},
            # Flat, for /metrics: oblivio_job_duration_seconds{phase} (service.metrics_ops).
            "phase_seconds": seconds,
            # Submission to the moment its version was live; if it was held, to the job's end.
            "live": live,
            "total_seconds": round(total, 3),
            "outside_training_seconds": round(total - training, 3),
            "outside_training_share": round((total - training) / total, 4) if total > 0 else None,
        }
