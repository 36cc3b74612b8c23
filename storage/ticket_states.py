"""A ticket's state after its job: it says whether the *live* model contains its forgetting.

`done` must mean that the model answering requests no longer states what the ticket asked
to forget, so it is derived from the `live` alias, never from "the job finished":

- A version contains the forgetting of its own tickets and of every ancestor's tickets
  (version N is the stack of its parent's blocks plus its own; `parent_id` links them).
  The *live chain* of a lineage is the live version and its ancestors.
- When a job finishes (`settle`), its tickets become `done` if their version is in the
  live chain, else `awaiting_review` (the version is a candidate, held back by its
  evaluation or waiting because auto-promotion is off).
- Whenever `live` moves (promote, rollback, revoke, a live version found corrupt:
  `sync_with_live`), tickets waiting on a version now in the live chain become `done`, and
  `done` tickets whose version left it become `reopened`. Each move is an audit event, so it shows in the ticket's timeline, and
  the time is kept in the ticket's receipt (`done_at` / `reopened_at`).
- A version may withdraw earlier tickets (an operator's `POST /v1/tickets/{id}/revoke`:
  O3 drops that request's block, no training); it lists them in its metrics
  (`withdrawn_tickets`). The live model contains a ticket iff its version is in the live
  chain and no version of the chain withdrew it, so a withdrawn ticket is `reopened` when
  such a version goes live, and done again if live is rolled back to before it.
- When a version is withdrawn (`after_withdrawal`): revoked by an operator, or found corrupt
  (its stored files fail their sha256, so it can never be served or promoted again), its
  tickets that still hold their forget set (awaiting review) go back to the queue or to
  `failed` (an operator's revocation chooses; a corrupt version always requeues them: the
  fault is in storage, not in the request), with the reason. A ticket that was done has had
  its forget set purged, so oblivio cannot train it again: it stays `reopened`, with the
  reason and what to do (file the request again) in its error, unless a version that
  contains it is promoted later.

Functions here never commit: they run inside the caller's transaction (the one that moved
the alias), so the alias and the tickets' states change together or not at all.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage import audit
from storage.models import AdapterVersion, Alias, Lineage, Ticket, TicketStatus, utcnow

LIVE = "live"
# Tickets whose job finished and whose version is not (or no longer) live.
WAITING_FOR_LIVE = (TicketStatus.awaiting_review, TicketStatus.reopened)
RevokedTickets = Literal["requeue", "fail"]
# Why a version was withdrawn, as the audit action and as the words in the tickets' errors.
Withdrawal = Literal["revoke", "corrupt"]
_WITHDRAWN: dict[str, str] = {"revoke": "was revoked",
                              "corrupt": "is corrupt (its stored files failed their checksum)"}

_WITHDRAWN_MESSAGE = ("reopened: an operator revoked this ticket (see its timeline for why); "
                      "live ({to}) no longer contains its forgetting")


def live_chain(session: Session, lineage_id: uuid.UUID) -> set[uuid.UUID]:
    """Ids of the live version of a lineage and all its ancestors (empty: no live version)."""
    alias = session.get(Alias, (lineage_id, LIVE), populate_existing=True)
    if alias is None:
        return set()
    parents = {vid: parent for vid, parent in session.execute(
        select(AdapterVersion.id, AdapterVersion.parent_id)
        .where(AdapterVersion.lineage_id == lineage_id)).tuples()}
    chain: set[uuid.UUID] = set()
    current: uuid.UUID | None = alias.version_id
    while current is not None and current not in chain:  # (a cycle cannot happen; be safe)
        chain.add(current)
        current = parents.get(current)
    return chain


def withdrawn_along(session: Session, chain: set[uuid.UUID]) -> set[uuid.UUID]:
    """Tickets that some version of `chain` withdrew (metrics["withdrawn_tickets"])."""
    if not chain:
        return set()
    rows = session.scalars(select(AdapterVersion.metrics)
                           .where(AdapterVersion.id.in_(chain))).all()
    return {uuid.UUID(str(t)) for m in rows for t in (m or {}).get("withdrawn_tickets") or []}


def settle(session: Session, ticket: Ticket, *, version_id: uuid.UUID | None,
           actor: str, now: Any = None) -> TicketStatus:
    """The state a ticket whose job just finished takes: done iff its version is live.

    The caller holds the ticket (and has locked the lineage, so `live` cannot move under
    us); it sets the lease, receipt and result version. A job without a version (nothing
    to serve) is done at once.
    """
    now = now or utcnow()
    chain = live_chain(session, ticket.lineage_id)
    if version_id is None or (version_id in chain
                              and ticket.id not in withdrawn_along(session, chain)):
        ticket.status = TicketStatus.done
        ticket.receipt = {**(ticket.receipt or {}), "done_at": now.isoformat()}
        ticket.payload = None  # the raw forget set goes once the live model has forgotten
        ticket.error = None
        ticket.progress = {**(ticket.progress or {}), "phase": "done"}
        audit.record(session, actor=actor, action="ticket.done", subject_type="ticket",
                     subject_id=ticket.id,
                     detail={"version_id": str(version_id) if version_id else None,
                             "attempts": ticket.attempts, "live": True})
    else:
        # The forget set is kept: a reviewer may send the ticket back to the queue.
        ticket.status = TicketStatus.awaiting_review
        ticket.progress = {**(ticket.progress or {}), "phase": "awaiting_review"}
        audit.record(session, actor=actor, action="ticket.awaiting_review",
                     subject_type="ticket", subject_id=ticket.id,
                     detail={"version_id": str(version_id), "attempts": ticket.attempts,
                             "live": False})
    return ticket.status


def sync_with_live(session: Session, *, lineage: Lineage, actor: str,
                   cause: dict[str, Any]) -> dict[str, list[uuid.UUID]]:
    """Bring every finished ticket of `lineage` in line with its `live` alias (just moved).

    `cause` says why (e.g. {"action": "rollback", "from": "default@v2", "to": "default@v1"})
    and goes into each changed ticket's timeline. Returns the ids moved to done / reopened.
    """
    now = utcnow()
    chain = live_chain(session, lineage.id)
    withdrawn = withdrawn_along(session, chain)
    moved: dict[str, list[uuid.UUID]] = {"done": [], "reopened": []}
    if chain:
        waiting = session.scalars(select(Ticket).where(
            Ticket.lineage_id == lineage.id, Ticket.status.in_(WAITING_FOR_LIVE),
            Ticket.result_version_id.in_(chain))).all()
        for ticket in waiting:
            if ticket.id in withdrawn:
                continue
            previous = ticket.status
            ticket.status = TicketStatus.done
            receipt = {k: v for k, v in (ticket.receipt or {}).items()
                       if k not in ("reopened_at", "reopened_because")}
            ticket.receipt = {**receipt, "done_at": now.isoformat()}
            ticket.payload = None
            ticket.error = None
            ticket.progress = {**(ticket.progress or {}), "phase": "done"}
            ticket.updated_at = now
            audit.record(session, actor=actor, action="ticket.done", subject_type="ticket",
                         subject_id=ticket.id,
                         detail={**cause, "from_status": previous.value, "live": True,
                                 "version_id": str(ticket.result_version_id)})
            moved["done"].append(ticket.id)
    left = select(Ticket).where(Ticket.lineage_id == lineage.id,
                                Ticket.status == TicketStatus.done,
                                Ticket.result_version_id.is_not(None))
    if chain:
        left = left.where(or_(Ticket.result_version_id.not_in(chain),
                              Ticket.id.in_(withdrawn)))
    for ticket in session.scalars(left).all():
        ticket.status = TicketStatus.reopened
        ticket.receipt = {**(ticket.receipt or {}), "reopened_at": now.isoformat(),
                          "reopened_because": cause}
        ticket.progress = {**(ticket.progress or {}), "phase": "reopened"}
        ticket.error = (_WITHDRAWN_MESSAGE.format(to=cause.get("to"))
                        if ticket.id in withdrawn else _reopen_message(cause))
        ticket.updated_at = now
        audit.record(session, actor=actor, action="ticket.reopened", subject_type="ticket",
                     subject_id=ticket.id,
                     detail={**cause, "live": False,
                             "version_id": str(ticket.result_version_id)})
        moved["reopened"].append(ticket.id)
    return moved


def after_withdrawal(session: Session, *, version: AdapterVersion, label: str, actor: str,
                     reason: str, action: Withdrawal = "revoke",
                     tickets: RevokedTickets = "requeue") -> dict[str, list[uuid.UUID]]:
    """Tickets of a version just revoked or found corrupt (`action`), after `sync_with_live`
    has run if it was live.

    Those that still hold their forget set go back to `queued` (`tickets="requeue"`, to be
    trained again on top of what is live now) or to `failed` (`"fail"`), with the reason.
    Reopened ones (forget set purged when they were done) stay reopened, saying why.
    """
    now = utcnow()
    moved: dict[str, list[uuid.UUID]] = {"queued": [], "failed": [], "reopened": []}
    rows = session.scalars(select(Ticket).where(Ticket.result_version_id == version.id,
                                                Ticket.status.in_(WAITING_FOR_LIVE))).all()
    why = f"version {label} {_WITHDRAWN[action]}: {reason}"
    for ticket in rows:
        previous = ticket.status
        detail: dict[str, Any] = {"action": action, "version": label, "reason": reason,
                                  "from_status": previous.value}
        ticket.updated_at = now
        if ticket.payload is None:
            ticket.error = (f"{why}; its forget set was purged when the ticket was done, so "
                            "it cannot be trained again: file the request again")
            audit.record(session, actor=actor, action="ticket.reopened", subject_type="ticket",
                         subject_id=ticket.id, detail={**detail, "live": False})
            moved["reopened"].append(ticket.id)
        elif tickets == "requeue":
            ticket.status = TicketStatus.queued
            ticket.result_version_id = None
            ticket.progress = None
            ticket.error = f"{why}; queued to be trained again"
            audit.record(session, actor=actor, action="ticket.requeued", subject_type="ticket",
                         subject_id=ticket.id, detail=detail)
            moved["queued"].append(ticket.id)
        else:
            ticket.status = TicketStatus.failed
            ticket.payload = None  # final: the forget set is deleted
            ticket.error = why
            audit.record(session, actor=actor, action="ticket.failed", subject_type="ticket",
                         subject_id=ticket.id, detail=detail)
            moved["failed"].append(ticket.id)
    return moved


def _reopen_message(cause: dict[str, Any]) -> str:
    action = cause.get("action")
    if action in _WITHDRAWN:
        return (f"reopened: live no longer contains this ticket's version ({cause.get('from')} "
                f"{_WITHDRAWN[action]}: {cause.get('reason')})")
    return (f"reopened: live moved from {cause.get('from')} to {cause.get('to')} "
            f"({action}), which does not contain this ticket's version")
