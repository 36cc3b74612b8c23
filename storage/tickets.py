"""Deletion tickets: submit (idempotently), read, page through, cancel, and fetch receipts.

The payload stored on a ticket is what the workers read, in one of two shapes:

    forget:          {"target": str | None,
                      "forget": {"texts": [str], "qa": [{"question": str, "answer": str}]},
                      "retain": {"texts": [...], "qa": [...]} | None}
    delete_records:  {"dataset": str, "record_ids": [str] | None, "subject_id": str | None}
    finetune:        {"dataset": str, "options": {S3T plan and training options},
                      "retrain": bool}   (internal: see `submit_finetune`)

`payload_sha256` is the sha256 of its canonical JSON (sorted keys, no whitespace, UTF-8),
so a receipt can prove what was asked even after the raw text has been purged.

Functions here never commit: the caller owns the transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import audit, schedules
from storage.errors import Conflict, InvalidRequest, NotFound
from storage.models import (
    AdapterVersion,
    Alias,
    AuditEvent,
    Job,
    JobStatus,
    Lineage,
    Ticket,
    TicketKind,
    TicketStatus,
    utcnow,
)
from storage.sealing import PayloadCipher

# Tickets in these states have not been claimed yet, so cancelling cannot race a job.
CANCELLABLE = (TicketStatus.received, TicketStatus.queued)


@dataclass(frozen=True)
class TicketRequest:
    """A validated ticket request, independent of how it arrived (HTTP, CLI, Python).

    Args:
        kind: what to do: forget knowledge/text, or delete fine-tuning records.
        payload: the forget set or record selection, in the shape described above.
        lineage: name of the lineage (model + adapter chain) the request is for.
        engine: the unlearning engine's registry name, already resolved and validated by
            the caller (workers.engines: storage keeps no list of engines).
        target: who or what is forgotten (e.g. a person's name), for people and probes.
        priority: higher is claimed first (bounded by the API, -100..100).
        not_before: do not start before this (timezone-aware) instant.
    """

    kind: TicketKind
    payload: dict[str, Any]
    lineage: str = "default"
    engine: str | None = None
    target: str | None = None
    priority: int = 0
    not_before: datetime | None = None


@dataclass(frozen=True)
class SubmitResult:
    ticket: Ticket
    created: bool  # False when an earlier submission with the same idempotency key is returned


@dataclass(frozen=True)
class VersionRef:
    id: uuid.UUID
    label: str  # "lineage@vN"


@dataclass(frozen=True)
class TicketView:
    """A ticket plus the names that make it readable (lineage name, result version label)."""

    ticket: Ticket
    lineage: str
    result_version: VersionRef | None = None
    # awaiting_review only: the verdict and the evaluation figures that held it back.
    review: dict[str, Any] | None = None


@dataclass(frozen=True)
class TicketPage:
    items: list[TicketView] = field(default_factory=list)
    next_cursor: str | None = None


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def payload_sha256(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _lineage_by_name(session: Session, name: str) -> Lineage:
    lineage = session.scalar(select(Lineage).where(Lineage.name == name))
    if lineage is None:
        raise NotFound(f"unknown lineage {name!r}")
    return lineage


def submit(session: Session, *, request: TicketRequest, requester: str,
           idempotency_key: str | None = None, cipher: PayloadCipher | None = None) -> Ticket:
    """Queue a ticket; see `submit_or_replay` for the idempotency rules."""
    return submit_or_replay(session, request=request, requester=requester,
                            idempotency_key=idempotency_key, cipher=cipher).ticket


def submit_or_replay(session: Session, *, request: TicketRequest, requester: str,
                     idempotency_key: str | None = None,
                     cipher: PayloadCipher | None = None) -> SubmitResult:
    """Queue a ticket, or return the one an earlier call with the same idempotency key made.

    The same key with a different request (kind, lineage, engine or payload) raises
    Conflict; so does a key already used by another requester (without saying whose ticket
    it is). With `cipher`, a forget ticket's payload is stored sealed (storage.sealing);
    `payload_sha256` is always the hash of the plaintext.
    """
    kind = TicketKind(request.kind)
    lineage = _lineage_by_name(session, request.lineage)
    engine = request.engine
    if not engine:
        raise InvalidRequest("a ticket needs an engine (the caller resolves the default)")
    digest = payload_sha256(request.payload)
    if kind is TicketKind.delete_records:
        _check_deletion(session, lineage, request.payload, engine)

    def replay(existing: Ticket) -> SubmitResult:
        # What was asked, not how it is scheduled: priority and not_before may have been
        # changed since (a retry with back-off moves not_before), and must not turn an
        # honest retry into a conflict.
        same = (existing.requester == requester and existing.kind == kind
                and existing.lineage_id == lineage.id and existing.engine == engine
                and existing.payload_sha256 == digest)
        if not same:
            raise Conflict(f"idempotency key {idempotency_key!r} was already used for a "
                           "different request")
        return SubmitResult(existing, created=False)

    if idempotency_key is not None:
        existing = _by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return replay(existing)

    not_before = request.not_before
    if not_before is not None:
        if not_before.tzinfo is None:
            raise InvalidRequest("not_before needs a time zone (e.g. 2030-01-01T00:00:00Z)")
        not_before = not_before.astimezone(timezone.utc)
    stored = request.payload
    if cipher is not None and kind is TicketKind.forget:
        stored = cipher.seal(request.payload)
    ticket = Ticket(kind=kind, lineage_id=lineage.id, engine=engine, target=request.target,
                    payload=stored, payload_sha256=digest, status=TicketStatus.queued,
                    priority=request.priority, not_before=not_before,
                    idempotency_key=idempotency_key, requester=requester)
    # A savepoint, so that losing the race for the idempotency key (another transaction
    # inserted it after our check) rolls back only this insert; the UNIQUE constraint, not
    # the check above, is what guarantees a single ticket per key.
    try:
        with session.begin_nested():
            session.add(ticket)
            session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = _by_idempotency_key(session, idempotency_key)
        if existing is None:  # the violation was about something else
            raise
        return replay(existing)
    schedules.hold_if_scheduled(session, ticket)  # a scheduled lineage batches at its window
    audit.record(session, actor=requester, action="ticket.submitted", subject_type="ticket",
                 subject_id=ticket.id,
                 detail={"kind": kind.value, "lineage": lineage.name, "engine": engine,
                         "payload_sha256": digest, "idempotency_key": idempotency_key})
    return SubmitResult(ticket, created=True)


def _check_deletion(session: Session, lineage: Lineage, payload: dict[str, Any],
                    engine: str) -> None:
    """A delete_records ticket names registered records (422 naming the unknown ones) of a
    lineage that was fine-tuned with S3T."""
    from storage import datasets

    datasets.resolve_deletion(session, dataset=payload.get("dataset") or "",
                              record_ids=payload.get("record_ids"),
                              subject_id=payload.get("subject_id"))
    if lineage.engine != engine:
        raise InvalidRequest(f"lineage {lineage.name!r} was not fine-tuned on a dataset with "
                             f"{engine} (its engine is {lineage.engine!r}); fine-tune it with "
                             f"POST /v1/lineages/{lineage.name}/finetune first")


@dataclass(frozen=True)
class FinetuneSubmission:
    ticket: Ticket
    job: Job


def submit_finetune(session: Session, *, lineage_name: str, dataset: str, engine: str,
                    options: dict[str, Any], requester: str) -> FinetuneSubmission:
    """Queue a fine-tune of `lineage_name` on `dataset` as an internal `finetune` ticket
    (`engine` already resolved and validated by the caller, as for every ticket),
    with its job row created now (status pending) so the caller gets a job id at once; the
    job runner adopts that job when it claims the ticket.

    The lineage becomes an S3T lineage; one that already has versions of another engine is
    refused (Conflict): its versions could not be combined with a fine-tune.
    """
    from storage import datasets

    lineage = _lineage_by_name(session, lineage_name)
    has_versions = session.scalar(select(AdapterVersion.id).where(
        AdapterVersion.lineage_id == lineage.id).limit(1)) is not None
    if has_versions and lineage.engine != engine:
        raise Conflict(f"lineage {lineage.name!r} already has {lineage.engine} versions; "
                       "fine-tune a new lineage")
    datasets.check_placement(session, dataset, shards=int(options.get("shards", 0) or 0),
                             slices=int(options.get("slices", 0) or 0))
    lineage.engine = engine
    payload = {"dataset": dataset, "options": options, "retrain": False}
    job = Job(lineage_id=lineage.id, engine=engine, status=JobStatus.pending,
              method_config={"kind": "finetune", "dataset": dataset, "options": options},
              progress={"phase": "queued"})
    session.add(job)
    session.flush()
    ticket = Ticket(kind=TicketKind.finetune, lineage_id=lineage.id, engine=engine,
                    target=None, payload=payload, payload_sha256=payload_sha256(payload),
                    status=TicketStatus.queued, requester=requester, job_id=job.id)
    session.add(ticket)
    session.flush()
    job.ticket_ids = [str(ticket.id)]
    audit.record(session, actor=requester, action="ticket.submitted", subject_type="ticket",
                 subject_id=ticket.id,
                 detail={"kind": "finetune", "lineage": lineage.name, "engine": engine,
                         "dataset": dataset, "job_id": str(job.id)})
    return FinetuneSubmission(ticket=ticket, job=job)


FOLLOW_UP_PRIORITY = -10


def submit_follow_up(session: Session, *, lineage_id: uuid.UUID, kind: str, engine: str,
                     payload: dict[str, Any], requester: str) -> Ticket:
    """A ticket an engine asked for after publishing a version (S3T: the retrain). Queued
    below the default priority, so requests that are waiting (deletions) run first. With a
    retrain schedule the retrain waits for its window, and one already waiting there is
    shared (returned) rather than doubled."""
    if kind == TicketKind.finetune.value and payload.get("retrain"):
        waiting = schedules.held_retrain(session, lineage_id)
        if waiting is not None and waiting.payload == payload:
            audit.record(session, actor=requester, action="ticket.follow_up_shared",
                         subject_type="ticket", subject_id=waiting.id, detail={"kind": kind})
            return waiting
    ticket = Ticket(kind=TicketKind(kind), lineage_id=lineage_id, engine=engine, target=None,
                    payload=payload, payload_sha256=payload_sha256(payload),
                    status=TicketStatus.queued, requester=requester,
                    priority=FOLLOW_UP_PRIORITY)
    session.add(ticket)
    session.flush()
    held = schedules.hold_if_scheduled(session, ticket)
    audit.record(session, actor=requester, action="ticket.submitted", subject_type="ticket",
                 subject_id=ticket.id, detail={"kind": kind, "engine": engine,
                                               "follow_up": True, "held": held})
    return ticket


def submit_revoke(session: Session, *, ticket_id: uuid.UUID, reason: str, actor: str) -> Ticket:
    """Queue the withdrawal of a done ticket's forgetting (an operator's decision).

    The caller has checked that the ticket's engine can drop one request without training
    (O3). The revoke ticket runs through the same queue and job runner as any other; the
    version it publishes lists the revoked ticket in `withdrawn_tickets`, and when that
    version goes live the revoked ticket becomes `reopened` (storage.ticket_states).
    Refused (Conflict) unless the ticket is a done forget ticket, and while another
    revocation of it is still pending.
    """
    original = get_ticket(session, ticket_id)
    if original.kind is not TicketKind.forget:
        raise Conflict(f"ticket {ticket_id} is a {original.kind.value} ticket; only forget "
                       "tickets can be revoked")
    if original.status is not TicketStatus.done:
        raise Conflict(f"ticket {ticket_id} is {original.status.value}; only a done ticket "
                       "(its forgetting is live) can be revoked")
    target = f"ticket {ticket_id}"  # also how a pending revocation of it is found
    pending = session.scalar(select(Ticket.id).where(
        Ticket.kind == TicketKind.revoke, Ticket.target == target,
        Ticket.status.in_([s for s in TicketStatus if not s.is_final])))
    if pending is not None:
        raise Conflict(f"ticket {ticket_id} already has a pending revocation: {pending}")
    payload = {"revokes": str(ticket_id)}
    revoke = Ticket(kind=TicketKind.revoke, lineage_id=original.lineage_id,
                    engine=original.engine, target=target, payload=payload,
                    payload_sha256=payload_sha256(payload), status=TicketStatus.queued,
                    requester=actor)
    session.add(revoke)
    session.flush()
    audit.record(session, actor=actor, action="ticket.submitted", subject_type="ticket",
                 subject_id=revoke.id, detail={"kind": "revoke", "engine": original.engine,
                                               "revokes": str(ticket_id), "reason": reason})
    audit.record(session, actor=actor, action="ticket.revoke_requested",
                 subject_type="ticket", subject_id=ticket_id,
                 detail={"revoke_ticket": str(revoke.id), "reason": reason})
    return revoke


def _by_idempotency_key(session: Session, key: str) -> Ticket | None:
    # populate_existing: after a lost race the row may be stale or absent in the identity map.
    return session.scalar(select(Ticket).where(Ticket.idempotency_key == key)
                          .execution_options(populate_existing=True))


def get_ticket(session: Session, ticket_id: uuid.UUID, *, requester: str | None = None) -> Ticket:
    """The ticket; with `requester`, only if it is theirs (others' tickets look absent)."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None or (requester is not None and ticket.requester != requester):
        raise NotFound(f"ticket {ticket_id} not found")
    return ticket


def encode_cursor(ticket: Ticket) -> str:
    raw = json.dumps([ticket.created_at.isoformat(), ticket.id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ticket_id = json.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        return at, uuid.UUID(hex=ticket_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("invalid cursor: pass back the next_cursor of a previous page") \
            from exc


def list_tickets(session: Session, *, status: TicketStatus | None = None,
                 lineage: str | None = None, requester: str | None = None, limit: int = 50,
                 cursor: str | None = None) -> TicketPage:
    """Newest first; `next_cursor` continues after the last item (None on the last page).

    Ordering on (created_at, id) is total, so pages neither skip nor repeat tickets even
    when new ones arrive between requests.
    """
    if limit < 1:
        raise InvalidRequest("limit must be at least 1")
    query = select(Ticket)
    if status is not None:
        query = query.where(Ticket.status == TicketStatus(status))
    if lineage is not None:
        query = query.join(Lineage, Lineage.id == Ticket.lineage_id).where(Lineage.name == lineage)
    if requester is not None:
        query = query.where(Ticket.requester == requester)
    if cursor:
        at, after_id = decode_cursor(cursor)
        query = query.where(or_(Ticket.created_at < at,
                                and_(Ticket.created_at == at, Ticket.id < after_id)))
    query = query.order_by(Ticket.created_at.desc(), Ticket.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return TicketPage(items=describe(session, rows[:limit]), next_cursor=next_cursor)


def describe(session: Session, tickets: list[Ticket]) -> list[TicketView]:
    """Attach lineage names and result version labels with two queries, not one per ticket."""
    if not tickets:
        return []
    lineage_ids = {t.lineage_id for t in tickets}
    # (dict() of a Result would treat it as a mapping: it has .keys())
    names = {i: n for i, n in session.execute(select(Lineage.id, Lineage.name)
                                              .where(Lineage.id.in_(lineage_ids)))}
    version_ids = {t.result_version_id for t in tickets if t.result_version_id is not None}
    versions: dict[uuid.UUID, int] = {}
    if version_ids:
        versions = {i: v for i, v in session.execute(
            select(AdapterVersion.id, AdapterVersion.version)
            .where(AdapterVersion.id.in_(version_ids)))}
    held_ids = {t.result_version_id for t in tickets
                if t.status is TicketStatus.awaiting_review and t.result_version_id is not None}
    held: dict[uuid.UUID, AdapterVersion] = {}
    if held_ids:
        held = {v.id: v for v in session.scalars(
            select(AdapterVersion).where(AdapterVersion.id.in_(held_ids)))}
    views = []
    for t in tickets:
        lineage = names.get(t.lineage_id, "?")
        ref = None
        if t.result_version_id is not None and t.result_version_id in versions:
            ref = VersionRef(t.result_version_id, f"{lineage}@v{versions[t.result_version_id]}")
        review = None
        if t.status is TicketStatus.awaiting_review and t.result_version_id in held:
            review = review_of(held[t.result_version_id])
        views.append(TicketView(ticket=t, lineage=lineage, result_version=ref, review=review))
    return views


def cancel(session: Session, *, ticket_id: uuid.UUID, actor: str,
           requester: str | None = None) -> Ticket:
    """Cancel a ticket no worker has claimed yet. Cancelling is final and purges the payload.

    Cancelling an already cancelled ticket returns it unchanged; a running or finished one
    raises Conflict.
    """
    ticket = get_ticket(session, ticket_id, requester=requester)
    if ticket.status is TicketStatus.cancelled:
        return ticket
    # A conditional UPDATE, so a dispatcher claiming the ticket at this very moment either
    # wins (we report it running) or loses (it never sees a queued row), never both.
    changed = session.execute(
        update(Ticket)
        .where(Ticket.id == ticket_id, Ticket.status.in_(CANCELLABLE))
        .values(status=TicketStatus.cancelled, payload=None, lease_owner=None,
                lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    session.refresh(ticket)
    if not changed:
        if ticket.status is TicketStatus.cancelled:
            return ticket
        if ticket.status.is_final:
            raise Conflict(f"ticket {ticket_id} is already {ticket.status.value}; "
                           "it cannot be cancelled")
        raise Conflict(f"ticket {ticket_id} is {ticket.status.value}: a worker is processing "
                       "it and it can no longer be cancelled")
    audit.record(session, actor=actor, action="ticket.cancelled", subject_type="ticket",
                 subject_id=ticket_id)
    return ticket


# A receipt exists once a job has produced the ticket's version (even if it is not live).
HAS_RECEIPT = (TicketStatus.done, TicketStatus.awaiting_review, TicketStatus.reopened)


def receipt(session: Session, *, ticket_id: uuid.UUID, requester: str | None = None
            ) -> dict[str, Any]:
    """What was done for a ticket: versions, hashes, metrics, timestamps, and whether the
    live model contains it (`live`; `done_at` is when it went live). 409 before its job
    finished."""
    ticket = get_ticket(session, ticket_id, requester=requester)
    if ticket.status not in HAS_RECEIPT:
        raise Conflict(f"ticket {ticket_id} is {ticket.status.value}; a receipt exists only "
                       "once it is done (or its version awaits review)")
    view = describe(session, [ticket])[0]
    out: dict[str, Any] = {
        "ticket_id": str(ticket.id),
        "kind": ticket.kind.value,
        "lineage": view.lineage,
        "engine": ticket.engine,
        "target": ticket.target,
        "payload_sha256": ticket.payload_sha256,
        "requested_at": ticket.created_at.isoformat(),
    }
    version = (session.get(AdapterVersion, ticket.result_version_id)
               if ticket.result_version_id else None)
    if version is not None:
        lineage = session.get(Lineage, version.lineage_id)
        out.update({
            "version": view.result_version.label if view.result_version else None,
            "version_id": str(version.id),
            "parent_id": str(version.parent_id) if version.parent_id else None,
            "version_status": version.status.value,
            "adapter_sha256": version.sha256,
            "object_key": version.object_key,
            "base_model": lineage.base_model if lineage else None,
            "base_model_sha256": version.base_model_sha256,
            "metrics": version.metrics,
        })
    # What the worker recorded when it finished (plus the done_at / reopened_at of later
    # moves of live)...
    out.update(ticket.receipt or {})
    # ...but whether the live model contains the ticket is read now, not remembered: the
    # job's own "promoted" may have been overtaken by an operator's promote or rollback.
    live = ticket.status is TicketStatus.done
    live_version = _live_label(session, ticket.lineage_id, view.lineage)
    out.update({
        "status": ticket.status.value,
        "live": live,
        "promoted": live,
        "live_version": live_version,
        "done_at": (ticket.receipt or {}).get("done_at") if live else None,
        "completed_at": ((ticket.receipt or {}).get("done_at") or ticket.updated_at.isoformat())
                        if live else None,
        "payload_sha256": ticket.payload_sha256,
    })
    if ticket.status is TicketStatus.awaiting_review:
        out["review"] = review_of(version)
    return out


def review_of(version: AdapterVersion | None) -> dict[str, Any] | None:
    """Why a version waits for an operator: its verdict and the checks it did not pass.

    The job stores `checks` (name, before, after, value, op, threshold, passed) and
    `verdict` in the version's metrics; a held version with every check passed was held
    only because auto-promotion is off.
    """
    if version is None:
        return None
    metrics = version.metrics or {}
    checks = [c for c in metrics.get("checks") or [] if isinstance(c, dict)]
    failed = [c for c in checks if c.get("passed") is False or c.get("passed") is None]
    verdict = metrics.get("verdict")
    if verdict == "pass" and not failed:
        reason = "its evaluation passed; auto-promotion is off, so an operator promotes it"
    elif failed:
        reason = "held back by its evaluation: " + "; ".join(_check_line(c) for c in failed)
    else:
        reason = "held back by its evaluation"
    return {"version_id": str(version.id), "version_status": version.status.value,
            "verdict": verdict, "reason": reason, "held_back_by": failed, "checks": checks}


def _check_line(check: dict[str, Any]) -> str:
    value = check.get("value")
    shown = "n/a" if value is None else f"{value:.2f}"
    line = f"{check.get('name')} {shown} (needs {check.get('op')} {check.get('threshold')})"
    if check.get("before") is not None and check.get("after") is not None:
        line += f", {check['before']:.2f} -> {check['after']:.2f}"
    return line


def _live_label(session: Session, lineage_id: uuid.UUID, lineage_name: str) -> str | None:
    number = session.scalar(select(AdapterVersion.version)
                            .join(Alias, Alias.version_id == AdapterVersion.id)
                            .where(Alias.lineage_id == lineage_id, Alias.name == "live"))
    return f"{lineage_name}@v{number}" if number is not None else None


def timeline(session: Session, ticket: Ticket) -> list[dict[str, Any]]:
    """The ticket's history from the audit trail, oldest first: submitted, claimed,
    evaluating, awaiting_review, done, reopened, requeued... each with when, who and why."""
    events = session.scalars(select(AuditEvent)
                             .where(AuditEvent.subject_type == "ticket",
                                    AuditEvent.subject_id == str(ticket.id))
                             .order_by(AuditEvent.at, AuditEvent.id)).all()
    return [{"at": e.at, "event": e.action.removeprefix("ticket."), "actor": e.actor,
             "detail": e.detail or {}} for e in events]
