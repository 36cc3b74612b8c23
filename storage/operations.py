"""What operators read and do beyond the ticket API: timelines, retries, an overview.

Functions never commit: the caller owns the transaction (as in storage.registry).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.errors import Conflict, NotFound
from storage.models import AuditEvent, Job, Lineage, Ticket, TicketStatus, utcnow

# Tickets an operator may send back to the queue: they ended without a result and still
# hold their forget set (done and cancelled tickets have had it purged).
RETRYABLE = (TicketStatus.failed, TicketStatus.rejected)


def ticket_timeline(session: Session, ticket_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every audit event of a ticket, oldest first, plus those of the versions it made."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise NotFound(f"unknown ticket {ticket_id}")
    subjects = [("ticket", str(ticket_id))]
    if ticket.result_version_id is not None:
        subjects.append(("version", str(ticket.result_version_id)))
    events = session.scalars(
        select(AuditEvent)
        .where(or_(*[(AuditEvent.subject_type == kind) & (AuditEvent.subject_id == sid)
                     for kind, sid in subjects]))
        .order_by(AuditEvent.at, AuditEvent.id))
    timeline = [{"at": ticket.created_at.isoformat(), "action": "ticket.submitted",
                 "actor": ticket.requester, "detail": None}]
    timeline += [{"at": e.at.isoformat(), "action": e.action, "actor": e.actor,
                  "detail": e.detail} for e in events if e.action != "ticket.submitted"]
    return timeline


def retry_ticket(session: Session, *, ticket_id: uuid.UUID, actor: str) -> Ticket:
    """Put a failed or rejected ticket back in the queue with a fresh attempt budget."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise NotFound(f"unknown ticket {ticket_id}")
    if ticket.status not in RETRYABLE:
        raise Conflict(f"ticket {ticket_id} is {ticket.status.value}; only failed or rejected "
                       "tickets can be retried")
    if ticket.payload is None:
        raise Conflict(f"ticket {ticket_id} no longer holds its request (purged); file a new "
                       "ticket instead")
    previous = {"from": ticket.status.value, "attempts": ticket.attempts, "error": ticket.error}
    # Conditional: a concurrent retry (or anything else) that moved it first wins.
    changed = session.execute(
        update(Ticket).where(Ticket.id == ticket_id, Ticket.status.in_(RETRYABLE))
        .values(status=TicketStatus.queued, attempts=0, error=None, progress=None,
                lease_owner=None, lease_expires_at=None, not_before=None, job_id=None,
                updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount
    session.refresh(ticket)
    if not changed:
        raise Conflict(f"ticket {ticket_id} changed meanwhile; it is {ticket.status.value}")
    audit.record(session, actor=actor, action="ticket.retried", subject_type="ticket",
                 subject_id=ticket_id, detail=previous)
    return ticket


@dataclass(frozen=True)
class JobRow:
    job: Job
    lineage: str


def recent_jobs(session: Session, *, limit: int = 50) -> list[JobRow]:
    names = {i: n for i, n in session.execute(select(Lineage.id, Lineage.name))}
    jobs = session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit))
    return [JobRow(job=j, lineage=names.get(j.lineage_id, "?")) for j in jobs]


def tickets_by_lineage(session: Session) -> dict[str, int]:
    rows = session.execute(select(Lineage.name, func.count(Ticket.id))
                           .join(Ticket, Ticket.lineage_id == Lineage.id)
                           .where(Ticket.status == TicketStatus.queued)
                           .group_by(Lineage.name)).tuples()
    return {name: n for name, n in rows}
