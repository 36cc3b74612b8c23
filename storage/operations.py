"""What operators read and do beyond the ticket API: retries and the overview's queries.

Functions never commit: the caller owns the transaction (as in storage.registry).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.errors import Conflict, NotFound
from storage.models import Job, Lineage, Ticket, TicketStatus, utcnow

# A final ticket has had its forget set deleted (data minimisation), so it cannot be trained
# again; what an operator can retry is a queued ticket whose last attempt failed and that
# waits out its back-off (or its attempt budget): "retry now, with a fresh budget".


def retry_ticket(session: Session, *, ticket_id: uuid.UUID, actor: str) -> Ticket:
    """Retry a queued ticket whose last attempt failed: now, with a fresh attempt budget."""
    from storage.schedules import HOLD_UNTIL

    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise NotFound(f"unknown ticket {ticket_id}")
    if ticket.status.is_final:
        raise Conflict(f"ticket {ticket_id} is {ticket.status.value}: its forget set was "
                       "deleted when it ended, so it cannot be retried; file the request "
                       "again")
    if ticket.status is not TicketStatus.queued or not (ticket.error or ticket.attempts):
        raise Conflict(f"ticket {ticket_id} is {ticket.status.value} with no failed attempt; "
                       "only a queued ticket whose last attempt failed can be retried")
    previous = {"attempts": ticket.attempts, "error": ticket.error,
                "not_before": ticket.not_before.isoformat() if ticket.not_before else None}
    held = ticket.not_before == HOLD_UNTIL  # waiting for a schedule: keep it waiting
    # Conditional: a dispatcher that claims it at this moment wins, and we report that.
    changed = session.execute(
        update(Ticket).where(Ticket.id == ticket_id, Ticket.status == TicketStatus.queued)
        .values(attempts=0, error=None, not_before=HOLD_UNTIL if held else None,
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
