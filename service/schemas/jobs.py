"""Bodies of /v1/jobs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from storage.models import Job, JobStatus


class JobOut(BaseModel):
    id: uuid.UUID
    lineage: str
    engine: str
    status: JobStatus
    ticket_ids: list[str]
    progress: dict[str, Any] | None = Field(
        None, description="phase, step / max_steps, loss, ... while it runs; per-phase "
                          "seconds once known")
    method_config: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(None, description="Why a failed job failed: one line; operators "
                                                "also get the full traceback after it.")
    ray_job_id: str | None = None
    logs_uri: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None
    phases: dict[str, float] | None = Field(
        None, description="Seconds per phase, in order: queue_wait, preparing (start-up: "
                          "models, Ray Train, retain answers), training (the loop), teardown, "
                          "evaluation, upload, promote. Spans with timestamps are in "
                          "progress.phases.")
    submission_to_live_seconds: float | None = Field(
        None, description="From the oldest ticket's submission until its version was live "
                          "(null if it was held for review or the job failed).")
    outside_training_share: float | None = Field(
        None, description="Share of the job's total time (from submission) spent outside the "
                          "training loop.")

    @classmethod
    def build(cls, job: Job, lineage: str, *, full_error: bool = True) -> JobOut:
        duration = None
        if job.started_at and job.finished_at:
            duration = (job.finished_at - job.started_at).total_seconds()
        progress = job.progress or {}
        spans = progress.get("phases") if isinstance(progress.get("phases"), dict) else None
        return cls(
            phases={name: span.get("seconds") for name, span in spans.items()} if spans else None,
            submission_to_live_seconds=progress.get("total_seconds") if progress.get("live")
            else None,
            outside_training_share=progress.get("outside_training_share"),
            id=job.id, lineage=lineage, engine=job.engine, status=job.status,
                   ticket_ids=[str(t) for t in job.ticket_ids or []], progress=job.progress,
                   method_config=job.method_config or {},
                   error=job.error if full_error else first_line(job.error),
                   ray_job_id=job.ray_job_id, logs_uri=job.logs_uri, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at,
                   duration_seconds=duration)


def first_line(error: str | None) -> str | None:
    """The one-line cause a job's error starts with (the rest is the operators' trace)."""
    return error.split("\n", 1)[0] if error else error


class JobListOut(BaseModel):
    items: list[JobOut]
