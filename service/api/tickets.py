"""/v1/tickets: submit, read, list, cancel, revoke (operators), receipt."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse

from service.deps import CipherDep, OperatorDep, SessionDep, SettingsDep, SubmitterDep
from service.receipt_keys import receipt_key
from service.schemas.common import NAME_PATTERN, PLAIN_TEXT_PATTERN
from service.schemas.tickets import (
    ReceiptOut,
    TicketIn,
    TicketOut,
    TicketPageOut,
    TicketRevokeIn,
    check_limits,
    to_request,
)
from storage import receipts, tickets
from storage.errors import Conflict
from storage.models import TicketStatus

router = APIRouter(prefix="/v1/tickets", tags=["tickets"])

IdempotencyKey = Annotated[str | None, Header(
    min_length=1, max_length=128,
    description="Retrying with the same key returns the first ticket instead of a new one.")]


@router.post("", status_code=202, response_model=TicketOut)
def submit(body: TicketIn, session: SessionDep, settings: SettingsDep, caller: SubmitterDep,
           cipher: CipherDep, response: Response,
           idempotency_key: IdempotencyKey = None) -> TicketOut:
    """File a deletion ticket; it is queued and processed in the background.

    The forget set is stored encrypted and deleted once the ticket is final; only its
    sha256 and item counts stay."""
    check_limits(body, settings)
    result = tickets.submit_or_replay(session, request=to_request(body),
                                      requester=caller.principal,
                                      idempotency_key=idempotency_key, cipher=cipher)
    if not result.created:
        response.headers["Idempotent-Replayed"] = "true"
    return TicketOut.from_view(tickets.describe(session, [result.ticket])[0])


@router.get("", response_model=TicketPageOut)
def list_tickets(session: SessionDep, settings: SettingsDep, caller: SubmitterDep,
                 status: TicketStatus | None = None,
                 lineage: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
                 requester: Annotated[str | None, Query(max_length=128,
                                                        pattern=PLAIN_TEXT_PATTERN)] = None,
                 limit: Annotated[int, Query(ge=1)] = 50,
                 cursor: Annotated[str | None, Query(max_length=512)] = None) -> TicketPageOut:
    """Newest first. Submitters see only their own tickets. `status=awaiting_review` lists
    tickets whose version waits for an operator."""
    owner = caller.ticket_owner_filter
    if owner is not None and requester not in (None, owner):
        return TicketPageOut(items=[], next_cursor=None)
    page = tickets.list_tickets(session, status=status, lineage=lineage,
                                requester=owner or requester,
                                limit=min(limit, settings.max_page_size), cursor=cursor)
    return TicketPageOut(items=[TicketOut.from_view(v) for v in page.items],
                         next_cursor=page.next_cursor)


@router.get("/{ticket_id}", response_model=TicketOut)
def get_ticket(ticket_id: uuid.UUID, session: SessionDep, caller: SubmitterDep) -> TicketOut:
    """One ticket with its timeline (and, while awaiting_review, why its version waits)."""
    ticket = tickets.get_ticket(session, ticket_id, requester=caller.ticket_owner_filter)
    return TicketOut.from_view(tickets.describe(session, [ticket])[0],
                               timeline=tickets.timeline(session, ticket))


@router.post("/{ticket_id}/cancel", response_model=TicketOut)
def cancel(ticket_id: uuid.UUID, session: SessionDep, caller: SubmitterDep) -> TicketOut:
    """Cancel a ticket that no worker has started; a running one answers 409."""
    ticket = tickets.cancel(session, ticket_id=ticket_id, actor=caller.principal,
                            requester=caller.ticket_owner_filter)
    return TicketOut.from_view(tickets.describe(session, [ticket])[0])


@router.post("/{ticket_id}/revoke", status_code=202, response_model=TicketOut)
def revoke(ticket_id: uuid.UUID, body: TicketRevokeIn, session: SessionDep,
           caller: OperatorDep) -> TicketOut:
    """Withdraw a done ticket's forgetting without touching the other requests: queues a
    `revoke` ticket (returned) whose version drops that request's block and detector, with
    no training (engines with separable requests: o3). When it goes live the revoked
    ticket is `reopened`. 409 for a ticket that is not done, or whose engine cannot."""
    from workers.engines import get_engine

    original = tickets.get_ticket(session, ticket_id)
    if not hasattr(get_engine(original.engine), "without_request"):
        raise Conflict(f"engine {original.engine!r} cannot remove one request without "
                       "retraining; revoke the version instead (POST /v1/versions/{id}/revoke)")
    revoke_ticket = tickets.submit_revoke(session, ticket_id=ticket_id, reason=body.reason,
                                          actor=caller.principal)
    return TicketOut.from_view(tickets.describe(session, [revoke_ticket])[0])


@router.get("/{ticket_id}/receipt", response_model=ReceiptOut)
def receipt(ticket_id: uuid.UUID, session: SessionDep, settings: SettingsDep,
            caller: SubmitterDep) -> JSONResponse:
    """What was done, signed: versions and artifact hashes, evaluation with pass/fail,
    phase timestamps. 409 until the ticket is done. Verify with `oblivio receipt verify`."""
    body = receipts.build_receipt(session, ticket_id=ticket_id,
                                  requester=caller.ticket_owner_filter)
    ReceiptOut.model_validate(body)  # the documented shape, checked before it is signed
    # Returned as signed, byte for byte: re-serialising through the model would reformat
    # timestamps and break the signature.
    return JSONResponse(receipts.sign_receipt(body, receipt_key(settings)))
