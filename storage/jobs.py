"""Reading jobs: one training/deletion run serving one or more tickets of a lineage."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import NotFound
from storage.models import Job, JobStatus, Lineage, Ticket


def get_job(session: Session, job_id: uuid.UUID, *, requester: str | None = None) -> Job:
    """The job; with `requester`, only if it serves one of their tickets (else it looks absent)."""
    job = session.get(Job, job_id)
    if job is None or (requester is not None and not _serves(session, job, requester)):
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, *, status: JobStatus | None = None,
              lineage: str | None = None, limit: int = 50) -> list[Job]:
    """Newest first."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if lineage is not None:
        query = query.join(Lineage, Lineage.id == Job.lineage_id).where(Lineage.name == lineage)
    return list(session.scalars(query))


def lineage_name(session: Session, job: Job) -> str:
    return session.get_one(Lineage, job.lineage_id).name


def _serves(session: Session, job: Job, requester: str) -> bool:
    ids = [uuid.UUID(str(i)) for i in job.ticket_ids or []]
    if not ids:
        return False
    owned = session.scalars(select(Ticket.id).where(Ticket.id.in_(ids),
                                                    Ticket.requester == requester)).first()
    return owned is not None
