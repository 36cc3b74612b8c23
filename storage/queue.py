"""The durable ticket queue: claim with leases, heartbeat, finish. The database is the queue.

A ticket moves received -> queued -> running -> evaluating -> done | awaiting_review |
failed | rejected | cancelled (what happens after a job, and when `live` moves, is in
storage/ticket_states.py). A claimer owns a ticket through its *lease* (`lease_owner`,
`lease_expires_at`), not through a lock: a claimer that dies simply stops renewing, the lease expires, and the
next `claim` (of anyone) puts the ticket back in the queue, or fails it for good once it
has used up its attempts. Every operation of a claimer checks that it still owns the lease
and changes nothing otherwise, so a slow worker that lost its tickets cannot overwrite the
work of the one that took them over.

Each function here runs its own transaction (the caller passes a `sessionmaker`), because a
claim must commit before the work starts, and a worker's writes must not wait for each other.

Atomicity of `claim`:
- PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on
  each other's rows and never see the same one.
- SQLite: `storage.db` starts every transaction with `BEGIN IMMEDIATE` (the database write
  lock), so the select and the update of one claim run with no other writer in between.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage import audit, ticket_states
from storage.db import transaction
from storage.errors import InvalidRequest
from storage.models import (
    AdapterVersion,
    Job,
    JobStatus,
    Lineage,
    Ticket,
    TicketKind,
    TicketStatus,
    VersionStatus,
    utcnow,
)

if TYPE_CHECKING:
    from storage.sealing import PayloadCipher

log = logging.getLogger(__name__)

# States in which a claimer holds the ticket's lease.
ACTIVE_STATES = (TicketStatus.running, TicketStatus.evaluating)
_FINISHED_JOBS = (JobStatus.succeeded, JobStatus.failed)


@dataclass(frozen=True)
class ClaimedTicket:
    """A snapshot of a claimed ticket, detached from any session (safe to send to Ray).

    `attempts` counts this claim; `lease_expires_at` is when the claim is lost unless
    renewed with `renew_lease`.
    """

    id: uuid.UUID
    lineage_id: uuid.UUID
    kind: TicketKind
    engine: str
    target: str | None
    payload: dict[str, Any] | None
    payload_sha256: str
    priority: int
    attempts: int
    requester: str
    created_at: datetime
    lease_owner: str
    lease_expires_at: datetime


def claim(sessions: sessionmaker[Session], *, owner: str, lease_seconds: float,
          max_attempts: int, limit: int = 1, lineage_id: uuid.UUID | None = None,
          kinds: Iterable[TicketKind | str] | None = None,
          engines: Iterable[str] | None = None,
          now: datetime | None = None) -> list[ClaimedTicket]:
    """Claim up to `limit` queued tickets for `owner`, highest priority then oldest first.

    Only tickets whose `not_before` has passed are claimed; `lineage_id`, `kinds` and
    `engines` narrow the choice (e.g. to batch companions of a first ticket). Expired leases
    are recovered first (see `requeue_expired`), in the same transaction, so a ticket of a
    dead claimer is never lost. Claimed tickets are `running`, with `attempts` incremented.
    """
    _check_owner(owner)
    if limit < 1:
        raise InvalidRequest(f"limit must be at least 1, not {limit}")
    if lease_seconds <= 0:
        raise InvalidRequest(f"lease_seconds must be positive, not {lease_seconds}")
    now = now or utcnow()
    with transaction(sessions) as session:
        _requeue_expired(session, max_attempts=max_attempts, now=now)
        query = claim_query(now=now, limit=limit, lineage_id=lineage_id, kinds=kinds,
                            engines=engines)
        tickets = list(session.scalars(_skip_locked(session, query)))
        expires = now + timedelta(seconds=lease_seconds)
        claimed = []
        for ticket in tickets:
            ticket.status = TicketStatus.running
            ticket.lease_owner = owner
            ticket.lease_expires_at = expires
            ticket.attempts += 1
            ticket.progress = {"phase": "claimed"}
            ticket.updated_at = now
            audit.record(session, actor=owner, action="ticket.claimed", subject_type="ticket",
                         subject_id=ticket.id,
                         detail={"attempt": ticket.attempts,
                                 "lease_expires_at": expires.isoformat()})
            claimed.append(_snapshot(ticket))
        return claimed


def claim_query(*, now: datetime, limit: int, lineage_id: uuid.UUID | None = None,
                kinds: Iterable[TicketKind | str] | None = None,
                engines: Iterable[str] | None = None) -> Select[tuple[Ticket]]:
    """The SELECT behind `claim` (without the row lock), for EXPLAIN in tests and benchmarks.

    Its ORDER BY matches the `ix_tickets_claim` index (status, priority DESC, created_at), so
    the next ticket is the first index entry, however many are queued.
    """
    query = (select(Ticket)
             .where(Ticket.status == TicketStatus.queued,
                    or_(Ticket.not_before.is_(None), Ticket.not_before <= now))
             .order_by(Ticket.priority.desc(), Ticket.created_at.asc())
             .limit(limit))
    if lineage_id is not None:
        query = query.where(Ticket.lineage_id == lineage_id)
    if kinds is not None:
        query = query.where(Ticket.kind.in_([TicketKind(k) for k in kinds]))
    if engines is not None:
        query = query.where(Ticket.engine.in_(list(engines)))
    return query


def requeue_expired(sessions: sessionmaker[Session], *, max_attempts: int,
                    now: datetime | None = None) -> int:
    """Recover tickets whose lease expired; returns how many were requeued or failed.

    A running/evaluating ticket whose lease expired goes back to `queued` (lease cleared),
    or to `failed` once it has been claimed `max_attempts` times, keeping its last error.
    """
    with transaction(sessions) as session:
        return _requeue_expired(session, max_attempts=max_attempts, now=now or utcnow())


def _requeue_expired(session: Session, *, max_attempts: int, now: datetime) -> int:
    if max_attempts < 1:
        raise InvalidRequest(f"max_attempts must be at least 1, not {max_attempts}")
    query = select(Ticket).where(Ticket.status.in_(ACTIVE_STATES), Ticket.lease_expires_at < now)
    expired = list(session.scalars(_skip_locked(session, query)))
    for ticket in expired:
        last_owner = ticket.lease_owner
        detail: dict[str, Any] = {"attempts": ticket.attempts, "last_owner": last_owner,
                                  "lease_expired_at": _iso(ticket.lease_expires_at)}
        _clear_lease(ticket, now)
        if ticket.attempts >= max_attempts:
            message = (f"lease expired after {ticket.attempts} attempt(s) "
                       f"(last owner {last_owner})")
            ticket.error = f"{message}; previous error: {ticket.error}" if ticket.error else message
            ticket.status = TicketStatus.failed
            ticket.payload = None  # final: the forget set is deleted (data minimisation)
            action = "ticket.failed"
            detail["error"] = ticket.error
        else:
            ticket.status = TicketStatus.queued
            ticket.progress = None
            action = "ticket.requeued"
            detail["reason"] = "lease expired"
        audit.record(session, actor="queue", action=action, subject_type="ticket",
                     subject_id=ticket.id, detail=detail)
    if expired:
        _abandon_jobs(session, {t.job_id for t in expired if t.job_id is not None}, now=now)
        log.warning("recovered %d ticket(s) with expired leases", len(expired))
    return len(expired)


def _abandon_jobs(session: Session, job_ids: set[uuid.UUID], *, now: datetime) -> None:
    """The jobs of expired leases died with their claimer: mark them failed, and the
    versions they were still building (training/validating) failed too, so that nothing
    half-written stays in the registry looking as if it might still finish."""
    if not job_ids:
        return
    reason = "abandoned: the job's claimer stopped renewing its lease (crashed or killed)"
    jobs = session.scalars(select(Job).where(Job.id.in_(job_ids),
                                             Job.status.notin_(_FINISHED_JOBS))).all()
    for job in jobs:
        job.status, job.error, job.finished_at = JobStatus.failed, reason, now
    versions = session.scalars(select(AdapterVersion).where(
        AdapterVersion.job_id.in_(job_ids),
        AdapterVersion.status.in_((VersionStatus.training, VersionStatus.validating)))).all()
    for version in versions:
        version.status = VersionStatus.failed
        version.metrics = {**(version.metrics or {}), "error": reason}
        audit.record(session, actor="queue", action="version.failed", subject_type="version",
                     subject_id=version.id, detail={"reason": reason})


def renew_lease(sessions: sessionmaker[Session], *, ticket_ids: Sequence[uuid.UUID], owner: str,
                lease_seconds: float, now: datetime | None = None) -> list[uuid.UUID]:
    """Heartbeat: extend `owner`'s lease on `ticket_ids`; returns the ids it still owns.

    A worker whose ticket is missing from the result has lost it (requeued, claimed by
    another owner, or finished) and must stop working on it.
    """
    _check_owner(owner)
    if lease_seconds <= 0:
        raise InvalidRequest(f"lease_seconds must be positive, not {lease_seconds}")
    if not ticket_ids:
        return []
    now = now or utcnow()
    with transaction(sessions) as session:
        rows = session.execute(
            update(Ticket)
            .where(Ticket.id.in_(list(ticket_ids)), Ticket.lease_owner == owner,
                   Ticket.status.in_(ACTIVE_STATES))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
            .returning(Ticket.id)
            .execution_options(synchronize_session=False))
        kept = set(rows.scalars())
    return [i for i in ticket_ids if i in kept]


def set_progress(sessions: sessionmaker[Session], *, ticket_ids: Sequence[uuid.UUID], owner: str,
                 progress: dict[str, Any], status: TicketStatus | None = None,
                 now: datetime | None = None) -> list[uuid.UUID]:
    """Merge `progress` (phase, step, loss...) into the tickets `owner` still holds.

    `status` may move a ticket between running and evaluating. Returns the ids updated.
    """
    _check_owner(owner)
    if status is not None and TicketStatus(status) not in ACTIVE_STATES:
        raise InvalidRequest(f"set_progress can only set running or evaluating, not {status}")
    if not ticket_ids:
        return []
    now = now or utcnow()
    with transaction(sessions) as session:
        query = select(Ticket).where(Ticket.id.in_(list(ticket_ids)), Ticket.lease_owner == owner,
                                     Ticket.status.in_(ACTIVE_STATES))
        tickets = list(session.scalars(_for_update(session, query)))
        for ticket in tickets:
            ticket.progress = {**(ticket.progress or {}), **progress}
            ticket.updated_at = now
            if status is not None and ticket.status is not TicketStatus(status):
                audit.record(session, actor=owner, action=f"ticket.{TicketStatus(status).value}",
                             subject_type="ticket", subject_id=ticket.id,
                             detail={"from": ticket.status.value})
                ticket.status = TicketStatus(status)
        updated = {t.id for t in tickets}
    return [i for i in ticket_ids if i in updated]


def complete(sessions: sessionmaker[Session], *, ticket_id: uuid.UUID, owner: str,
             version_id: uuid.UUID | None, receipt: dict[str, Any],
             now: datetime | None = None) -> bool:
    """Finish a ticket `owner` holds with its result version and receipt.

    It becomes `done` only if that version is in the lineage's live chain (storage.
    ticket_states), else `awaiting_review`; `done` purges the raw forget set (payload),
    `payload_sha256` stays as proof of what was asked. Returns False, changing nothing, if
    `owner` no longer holds the ticket.
    """
    with transaction(sessions) as session:
        return complete_in(session, ticket_id=ticket_id, owner=owner, version_id=version_id,
                           receipt=receipt, now=now)


def complete_in(session: Session, *, ticket_id: uuid.UUID, owner: str,
                version_id: uuid.UUID | None, receipt: dict[str, Any],
                now: datetime | None = None) -> bool:
    """`complete` inside the caller's transaction (a job publishes its version, moves the
    aliases and settles its tickets in one commit)."""
    now = now or utcnow()
    ticket = _owned(session, ticket_id, owner)
    if ticket is None:
        return False
    # Lock the lineage (the lock every alias move takes) before reading `live`, so an
    # operator's rollback cannot slip between our reading live and our writing done.
    _lock_lineage(session, ticket.lineage_id)
    _clear_lease(ticket, now)
    ticket.result_version_id = version_id
    ticket.receipt = receipt
    ticket.error = None
    ticket_states.settle(session, ticket, version_id=version_id, actor=owner, now=now)
    return True


def open_or_fail(sessions: sessionmaker[Session], cipher: PayloadCipher,
                 claimed: Sequence[ClaimedTicket], *, owner: str,
                 max_attempts: int) -> list[ClaimedTicket]:
    """Claimed tickets with their forget sets opened in memory; one that cannot be opened
    (another key, tampered) fails for good with the reason: retrying cannot help."""
    from storage.sealing import open_tickets

    opened, unreadable = open_tickets(cipher, claimed)
    for ticket, exc in unreadable:
        log.error("ticket %s: %s", ticket.id, exc)
        fail(sessions, ticket_id=ticket.id, owner=owner, error=str(exc), retry=False,
             max_attempts=max_attempts)
    return opened


def fail(sessions: sessionmaker[Session], *, ticket_id: uuid.UUID, owner: str, error: str,
         retry: bool, max_attempts: int, retry_delay_seconds: float = 0.0,
         now: datetime | None = None) -> bool:
    """Record a failed attempt of a ticket `owner` holds.

    With `retry`, the ticket goes back to `queued` (not before `retry_delay_seconds`) while
    it has attempts left, else it is `failed` for good; the error is kept either way.
    `max_attempts` is the job's retry policy (the caller's configuration). Returns False,
    changing nothing, if `owner` no longer holds the ticket.
    """
    now = now or utcnow()
    with transaction(sessions) as session:
        ticket = _owned(session, ticket_id, owner)
        if ticket is None:
            return False
        _clear_lease(ticket, now)
        ticket.error = error
        detail: dict[str, Any] = {"error": error, "attempts": ticket.attempts}
        if retry and ticket.attempts < max_attempts:
            ticket.status = TicketStatus.queued
            ticket.progress = None
            if retry_delay_seconds > 0:
                ticket.not_before = now + timedelta(seconds=retry_delay_seconds)
                detail["not_before"] = ticket.not_before.isoformat()
            action = "ticket.retry"
        else:
            if retry:
                ticket.error = f"{error} (gave up after {ticket.attempts} attempt(s))"
                detail["error"] = ticket.error
            ticket.status = TicketStatus.failed
            ticket.payload = None  # final: the forget set is deleted (data minimisation)
            action = "ticket.failed"
        audit.record(session, actor=owner, action=action, subject_type="ticket",
                     subject_id=ticket.id, detail=detail)
        return True


def reject(sessions: sessionmaker[Session], *, ticket_id: uuid.UUID, owner: str, error: str,
           now: datetime | None = None) -> bool:
    """Finish a ticket `owner` holds as `rejected` (e.g. its evaluation failed); final.

    Returns False, changing nothing, if `owner` no longer holds the ticket.
    """
    with transaction(sessions) as session:
        return reject_in(session, ticket_id=ticket_id, owner=owner, error=error, now=now)


def reject_in(session: Session, *, ticket_id: uuid.UUID, owner: str, error: str,
              now: datetime | None = None) -> bool:
    """`reject` inside the caller's transaction."""
    now = now or utcnow()
    ticket = _owned(session, ticket_id, owner)
    if ticket is None:
        return False
    _clear_lease(ticket, now)
    ticket.status = TicketStatus.rejected
    ticket.error = error
    ticket.payload = None  # final: the forget set is deleted (data minimisation)
    ticket.progress = {**(ticket.progress or {}), "phase": "rejected"}
    audit.record(session, actor=owner, action="ticket.rejected", subject_type="ticket",
                 subject_id=ticket.id, detail={"error": error, "attempts": ticket.attempts})
    return True


def queue_depth(session: Session) -> int:
    """Tickets waiting to be claimed (including those whose not_before lies ahead)."""
    return session.scalar(select(func.count()).select_from(Ticket)
                          .where(Ticket.status == TicketStatus.queued)) or 0


def count_by_status(session: Session) -> dict[str, int]:
    """Number of tickets in every state (zero included), for metrics and the dashboard."""
    counts = {status.value: 0 for status in TicketStatus}
    rows = session.execute(select(Ticket.status, func.count()).group_by(Ticket.status)).tuples()
    for status, n in rows:
        counts[TicketStatus(status).value] = n
    return counts


# --- helpers ------------------------------------------------------------------------------

def _check_owner(owner: str) -> None:
    if not owner:
        raise InvalidRequest("a lease owner name is required")


def _skip_locked(session: Session, query: Select[Any]) -> Select[Any]:
    # Claim with SKIP LOCKED so that concurrent claimers never wait on each other's rows;
    # the lease, not the lock, is what survives a crash. SQLite has no row locks: its
    # BEGIN IMMEDIATE already excludes every other writer.
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _for_update(session: Session, query: Select[Any]) -> Select[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update()
    return query


def _owned(session: Session, ticket_id: uuid.UUID, owner: str) -> Ticket | None:
    """The ticket if `owner` holds its lease (row locked on PostgreSQL), else None."""
    _check_owner(owner)
    query = select(Ticket).where(Ticket.id == ticket_id, Ticket.lease_owner == owner,
                                 Ticket.status.in_(ACTIVE_STATES))
    ticket = session.scalar(_for_update(session, query))
    if ticket is None:
        log.warning("%s no longer holds ticket %s; leaving it unchanged", owner, ticket_id)
    return ticket


def _lock_lineage(session: Session, lineage_id: uuid.UUID) -> None:
    query = select(Lineage.id).where(Lineage.id == lineage_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(key_share=True)
    session.execute(query)


def _clear_lease(ticket: Ticket, now: datetime) -> None:
    ticket.lease_owner = None
    ticket.lease_expires_at = None
    ticket.updated_at = now


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _snapshot(ticket: Ticket) -> ClaimedTicket:
    if ticket.lease_owner is None or ticket.lease_expires_at is None:
        raise RuntimeError(f"ticket {ticket.id} has no lease to snapshot")
    return ClaimedTicket(
        id=ticket.id, lineage_id=ticket.lineage_id, kind=TicketKind(ticket.kind),
        engine=ticket.engine, target=ticket.target, payload=ticket.payload,
        payload_sha256=ticket.payload_sha256, priority=ticket.priority,
        attempts=ticket.attempts, requester=ticket.requester, created_at=ticket.created_at,
        lease_owner=ticket.lease_owner, lease_expires_at=ticket.lease_expires_at)
