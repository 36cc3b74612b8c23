"""Scheduled batch work: schedules, held tickets, windows, and one leader.

A schedule's `action` says what its windows do:
- `unlearn`: while a lineage has one, each new deletion ticket of it (forget,
  delete_records) is *held*: queued, with `not_before` set to `HOLD_UNTIL` (far future), so
  no dispatcher claims it one by one, and `progress.phase = "waiting_for_schedule"`. At the
  window the leader claims up to `max_tickets` held tickets in one transaction (leases and
  attempts as any claim, so a crash puts them back, still held, for the next window) and
  they are unlearned together in one job. Fewer than `min_tickets` waiting: the window
  passes and they wait for the next.
- `retrain` (S3T lineages): the background retrain an S3T deletion queues is held the same
  way, and the deletions of a whole period share one held retrain (a deletion never waits:
  its version is published at once by switching slices off; only the retraining that
  restores the cut layers waits for the window, e.g. a quiet night).
- `evaluate`: nothing is held; each window re-runs the evaluation of the lineage's live
  version (its utility: forget sets are gone once their tickets are done) as a job of its
  own (workers/reevaluation.py), and records the verdict. min/max tickets are not used.

A window that was missed (the service was down) runs once when the service is back, not
once per missed window: `next_run_at` always moves to the first cron time after *now*.

Leadership: a `leader_leases` row per role, taken with a conditional write and held by
renewal; with several API replicas exactly one runs the windows at a time. Windows are
taken under the schedule row's lock (SKIP LOCKED on PostgreSQL, the write lock on SQLite),
so even two leaders (an expired lease still finishing) never run one window twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import audit
from storage.db import transaction
from storage.errors import Conflict, InvalidRequest, NotFound
from storage.models import (
    LeaderLease,
    Lineage,
    Schedule,
    Ticket,
    TicketKind,
    TicketStatus,
    utcnow,
)
from storage.queue import ClaimedTicket

HOLD_UNTIL = datetime(9999, 12, 31, tzinfo=timezone.utc)
ACTIONS = ("unlearn", "retrain", "evaluate")
# The ticket kinds each action's windows hold and claim (`evaluate` holds none).
HELD_KINDS: dict[str, tuple[TicketKind, ...]] = {
    "unlearn": (TicketKind.forget, TicketKind.delete_records),
    "retrain": (TicketKind.finetune,),
    "evaluate": (),
}
SCHEDULER_ROLE = "scheduler"


def next_window(cron: str, after: datetime) -> datetime:
    """The first time matching `cron` (5 fields, UTC) strictly after `after`."""
    from croniter import croniter

    try:
        itr = croniter(cron, after.astimezone(timezone.utc))
    except (ValueError, KeyError) as exc:
        raise InvalidRequest(f"invalid cron expression {cron!r}: {exc}") from None
    nxt = itr.get_next(datetime)
    return nxt if nxt.tzinfo else nxt.replace(tzinfo=timezone.utc)


def validate_cron(cron: str) -> None:
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise InvalidRequest(f"invalid cron expression {cron!r}: use 5 fields, e.g. "
                             "\"0 2 * * *\" (02:00 UTC every day)")


# --- schedules ------------------------------------------------------------------------------

def create_schedule(session: Session, *, lineage_name: str, cron: str, min_tickets: int,
                    max_tickets: int, actor: str, action: str = "unlearn",
                    now: datetime | None = None) -> Schedule:
    validate_cron(cron)
    if action not in ACTIONS:
        raise InvalidRequest(f"unknown schedule action {action!r}; use one of "
                             f"{', '.join(ACTIONS)}")
    if min_tickets < 1 or max_tickets < min_tickets:
        raise InvalidRequest(f"need 1 <= min_tickets <= max_tickets, got {min_tickets} and "
                             f"{max_tickets}")
    lineage = session.scalar(select(Lineage).where(Lineage.name == lineage_name))
    if lineage is None:
        raise NotFound(f"unknown lineage {lineage_name!r}")
    _check_action_fits(lineage, action)
    if session.scalar(select(Schedule.id).where(Schedule.lineage_id == lineage.id,
                                                Schedule.action == action)) is not None:
        raise Conflict(f"lineage {lineage_name!r} already has a {action} schedule; remove it "
                       "first")
    now = now or utcnow()
    schedule = Schedule(lineage_id=lineage.id, action=action, cron=cron,
                        min_tickets=min_tickets, max_tickets=max_tickets, enabled=True,
                        next_run_at=next_window(cron, now), created_by=actor, created_at=now)
    try:
        with session.begin_nested():
            session.add(schedule)
            session.flush()
    except IntegrityError:
        raise Conflict(f"lineage {lineage_name!r} already has a {action} schedule") from None
    held = _hold_queued(session, schedule)
    audit.record(session, actor=actor, action="schedule.created", subject_type="schedule",
                 subject_id=schedule.id,
                 detail={"lineage": lineage_name, "action": action, "cron": cron,
                         "min_tickets": min_tickets, "max_tickets": max_tickets,
                         "held_tickets": held})
    return schedule


def _check_action_fits(lineage: Lineage, action: str) -> None:
    s3t = lineage.engine == "s3t"  # set by the lineage's fine-tune (storage.tickets)
    if action == "retrain" and not s3t:
        raise InvalidRequest(f"lineage {lineage.name!r} is not fine-tuned with S3T (its "
                             f"engine is {lineage.engine!r}); only S3T lineages retrain")
    if action == "evaluate" and s3t:
        raise InvalidRequest(f"lineage {lineage.name!r} is an S3T lineage: its deletions are "
                             "exact by construction (their evidence is in each receipt); "
                             "schedule `retrain` for it instead")


def list_schedules(session: Session) -> list[tuple[Schedule, str, int]]:
    """(schedule, lineage name, tickets waiting for it), by lineage name."""
    rows = session.execute(select(Schedule, Lineage.name)
                           .join(Lineage, Lineage.id == Schedule.lineage_id)
                           .order_by(Lineage.name, Schedule.action)).tuples()
    return [(s, name, waiting_count(session, s)) for s, name in rows]


def get_schedule(session: Session, schedule_id: uuid.UUID) -> Schedule:
    schedule = session.get(Schedule, schedule_id)
    if schedule is None:
        raise NotFound(f"unknown schedule {schedule_id}")
    return schedule


def delete_schedule(session: Session, *, schedule_id: uuid.UUID, actor: str) -> int:
    """Remove a schedule; its held tickets go back to the normal queue. Returns how many."""
    schedule = get_schedule(session, schedule_id)
    released = session.execute(
        update(Ticket).where(*_held_by(schedule))
        .values(not_before=None, progress=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount
    session.delete(schedule)
    audit.record(session, actor=actor, action="schedule.deleted", subject_type="schedule",
                 subject_id=schedule_id, detail={"released_tickets": released})
    return released


def waiting_count(session: Session, schedule: Schedule,
                  engines: Sequence[str] | None = None) -> int:
    """Tickets held for the schedule's next window (of `engines` only, if given)."""
    query = select(func.count()).select_from(Ticket).where(*_held_by(schedule))
    if engines is not None:
        query = query.where(Ticket.engine.in_(list(engines)))
    return session.scalar(query) or 0


def _held_by(schedule: Schedule) -> tuple[Any, ...]:
    """The WHERE clauses of the tickets `schedule` holds (its action's kinds only: an
    S3T lineage's unlearn and retrain schedules hold different tickets)."""
    return (Ticket.lineage_id == schedule.lineage_id, Ticket.status == TicketStatus.queued,
            Ticket.not_before == HOLD_UNTIL, Ticket.kind.in_(HELD_KINDS[schedule.action]))


# --- holding tickets ------------------------------------------------------------------------

def _waiting_progress(schedule: Schedule) -> dict[str, Any]:
    return {"phase": "waiting_for_schedule", "schedule_id": str(schedule.id),
            "next_window": schedule.next_run_at.isoformat()}


def hold_if_scheduled(session: Session, ticket: Ticket) -> bool:
    """Called on submission: hold a new ticket of a scheduled lineage for the window.
    (A user's fine-tune is never held; only the retrain an S3T deletion queues is.)"""
    action = {TicketKind.forget: "unlearn", TicketKind.delete_records: "unlearn",
              TicketKind.finetune: "retrain"}.get(ticket.kind)
    if action == "retrain" and not is_retrain(ticket):
        return False
    schedule = session.scalar(select(Schedule).where(Schedule.lineage_id == ticket.lineage_id,
                                                     Schedule.action == action,
                                                     Schedule.enabled.is_(True)))
    if schedule is None or ticket.status is not TicketStatus.queued:
        return False
    ticket.not_before = HOLD_UNTIL
    ticket.progress = _waiting_progress(schedule)
    return True


def is_retrain(ticket: Ticket) -> bool:
    return ticket.kind is TicketKind.finetune and bool((ticket.payload or {}).get("retrain"))


def held_retrain(session: Session, lineage_id: uuid.UUID) -> Ticket | None:
    """The retrain already waiting for the lineage's retrain window, if any: a later
    deletion shares it (a retrain reads the dataset's deletions when it runs)."""
    held = session.scalars(select(Ticket).where(
        Ticket.lineage_id == lineage_id, Ticket.kind == TicketKind.finetune,
        Ticket.status == TicketStatus.queued, Ticket.not_before == HOLD_UNTIL))
    return next((t for t in held if is_retrain(t)), None)


def _hold_queued(session: Session, schedule: Schedule) -> int:
    # Conditional on `queued`: a dispatcher claiming one of them at this moment either won
    # (it runs alone) or lost (it never sees a queued row).
    query = update(Ticket).where(Ticket.lineage_id == schedule.lineage_id,
                                 Ticket.status == TicketStatus.queued,
                                 Ticket.kind.in_(HELD_KINDS[schedule.action]))
    if schedule.action == "retrain":  # retrains only, not a user's fine-tune
        retrains = [t.id for t in session.scalars(select(Ticket).where(
            Ticket.lineage_id == schedule.lineage_id, Ticket.status == TicketStatus.queued,
            Ticket.kind == TicketKind.finetune)) if is_retrain(t)]
        query = query.where(Ticket.id.in_(retrains))
    return session.execute(
        query.values(not_before=HOLD_UNTIL, progress=_waiting_progress(schedule),
                     updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount


# --- windows --------------------------------------------------------------------------------

@dataclass
class Window:
    """One schedule's window that came due, and the tickets claimed for it."""

    schedule_id: uuid.UUID
    lineage: str
    due_at: datetime
    action: str = "unlearn"
    tickets: list[ClaimedTicket] = field(default_factory=list)
    skipped: str | None = None


def take_due_windows(sessions: sessionmaker[Session], *, owner: str, lease_seconds: float,
                     engines: Sequence[str] | None = None,
                     now: datetime | None = None) -> list[Window]:
    """Claim the held tickets of every schedule whose window has come, and advance it.

    `engines`: only tickets of these engines are claimed (those this release can train);
    the others stay held.
    """
    now = now or utcnow()
    windows: list[Window] = []
    with transaction(sessions) as session:
        query = select(Schedule, Lineage.name).join(Lineage, Lineage.id == Schedule.lineage_id) \
            .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=Schedule)
        for schedule, lineage_name in session.execute(query).tuples():
            window = Window(schedule.id, lineage_name, schedule.next_run_at,
                            action=schedule.action)
            waiting = waiting_count(session, schedule, engines)
            if schedule.action == "evaluate":
                pass  # nothing held: the scheduler evaluates the live version
            elif waiting < schedule.min_tickets:
                window.skipped = (f"{waiting} ticket(s) waiting, fewer than min_tickets "
                                  f"{schedule.min_tickets}")
            else:
                window.tickets = _claim_held(session, schedule, owner=owner, engines=engines,
                                             lease_seconds=lease_seconds, now=now)
            schedule.last_run_at = now
            schedule.next_run_at = next_window(schedule.cron, now)  # missed windows: once
            schedule.last_result = {"window": window.due_at.isoformat(),
                                    "tickets": [str(t.id) for t in window.tickets],
                                    "skipped": window.skipped}
            audit.record(session, actor=owner, action="schedule.window", subject_type="schedule",
                         subject_id=schedule.id, detail=schedule.last_result)
            # Tickets that stay held show the new window.
            session.execute(update(Ticket).where(*_held_by(schedule))
                            .values(progress=_waiting_progress(schedule))
                            .execution_options(synchronize_session=False))
            windows.append(window)
    return windows


def record_outcome(sessions: sessionmaker[Session], window: Window,
                   outcome: dict[str, Any]) -> None:
    """Add what the window's work came to (its jobs, an evaluation's verdict) to the
    schedule's `last_result`, once it is known (after the window was taken)."""
    with transaction(sessions) as session:
        schedule = session.get(Schedule, window.schedule_id)
        if schedule is None:  # removed meanwhile
            return
        schedule.last_result = {**(schedule.last_result or {}), **outcome}


def _claim_held(session: Session, schedule: Schedule, *, owner: str, lease_seconds: float,
                engines: Sequence[str] | None, now: datetime) -> list[ClaimedTicket]:
    query = (select(Ticket).where(*_held_by(schedule))
             .order_by(Ticket.priority.desc(), Ticket.created_at.asc())
             .limit(schedule.max_tickets))
    if engines is not None:
        query = query.where(Ticket.engine.in_(list(engines)))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    expires = now + timedelta(seconds=lease_seconds)
    claimed = []
    for t in session.scalars(query):
        t.status, t.lease_owner, t.lease_expires_at = TicketStatus.running, owner, expires
        t.attempts += 1
        t.progress = {"phase": "claimed", "schedule_id": str(schedule.id)}
        t.updated_at = now
        audit.record(session, actor=owner, action="ticket.claimed", subject_type="ticket",
                     subject_id=t.id, detail={"attempt": t.attempts, "schedule_id":
                                              str(schedule.id),
                                              "lease_expires_at": expires.isoformat()})
        claimed.append(ClaimedTicket(
            id=t.id, lineage_id=t.lineage_id, kind=t.kind, engine=t.engine, target=t.target,
            payload=t.payload, payload_sha256=t.payload_sha256, priority=t.priority,
            attempts=t.attempts, requester=t.requester, created_at=t.created_at,
            lease_owner=owner, lease_expires_at=expires))
    return claimed


# --- leadership -----------------------------------------------------------------------------

def acquire_leadership(sessions: sessionmaker[Session], *, owner: str, ttl_seconds: float,
                       role: str = SCHEDULER_ROLE, now: datetime | None = None) -> bool:
    """Take or renew the `role` lease for `owner`; False while another owner holds it."""
    now = now or utcnow()
    expires = now + timedelta(seconds=ttl_seconds)
    with transaction(sessions) as session:
        # A conditional UPDATE is atomic on both backends: renew our lease, or take an
        # expired one; exactly one of several replicas racing for it sees rowcount 1.
        taken = session.execute(
            update(LeaderLease).where(LeaderLease.name == role,
                                      (LeaderLease.owner == owner)
                                      | (LeaderLease.expires_at < now))
            .values(owner=owner, expires_at=expires)
            .execution_options(synchronize_session=False)).rowcount
        if taken:
            return True
        if session.get(LeaderLease, role) is not None:
            return False
        try:
            with session.begin_nested():
                session.add(LeaderLease(name=role, owner=owner, expires_at=expires))
                session.flush()
        except IntegrityError:  # another replica inserted it first
            return False
        return True


def release_leadership(sessions: sessionmaker[Session], *, owner: str,
                       role: str = SCHEDULER_ROLE) -> None:
    with transaction(sessions) as session:
        session.execute(update(LeaderLease).where(LeaderLease.name == role,
                                                  LeaderLease.owner == owner)
                        .values(expires_at=utcnow() - timedelta(seconds=1))
                        .execution_options(synchronize_session=False))
