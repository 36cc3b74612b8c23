"""/v1/jobs: what a job is doing or did (progress, phases, error) for operators and the
submitters whose tickets it serves."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import OperatorDep, SessionDep, SubmitterDep
from service.schemas.jobs import JobListOut, JobOut
from storage import jobs
from storage.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobListOut)
def list_jobs(session: SessionDep, _caller: OperatorDep, status: JobStatus | None = None,
              lineage: str | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> JobListOut:
    """Newest first (operators)."""
    found = jobs.list_jobs(session, status=status, lineage=lineage, limit=limit)
    return JobListOut(items=[JobOut.build(j, jobs.lineage_name(session, j)) for j in found])


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: uuid.UUID, session: SessionDep, caller: SubmitterDep) -> JobOut:
    """One job; a submitter sees only jobs that serve their own tickets, and of a failed
    one's error only its one-line cause."""
    job = jobs.get_job(session, job_id, requester=caller.ticket_owner_filter)
    # The traceback (server paths, internals) is for operators; submitters get its cause.
    return JobOut.build(job, jobs.lineage_name(session, job), full_error=caller.sees_all_tickets)
