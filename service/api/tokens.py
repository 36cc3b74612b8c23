"""/v1/tokens: create (the secret is shown once), list and revoke API tokens (admins)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from service.deps import AdminDep, SessionDep
from service.schemas.tokens import NewTokenOut, TokenIn, TokenOut
from storage import tokens

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=NewTokenOut)
def create_token(body: TokenIn, session: SessionDep, caller: AdminDep) -> NewTokenOut:
    token, secret = tokens.create_token(session, role=body.role, name=body.name,
                                        actor=caller.principal)
    return NewTokenOut(**TokenOut.build(token).model_dump(), token=secret)


@router.get("", response_model=list[TokenOut])
def list_tokens(session: SessionDep, _caller: AdminDep) -> list[TokenOut]:
    return [TokenOut.build(t) for t in tokens.list_tokens(session)]


@router.delete("/{token_id}", response_model=TokenOut)
def revoke_token(token_id: uuid.UUID, session: SessionDep, caller: AdminDep) -> TokenOut:
    """Revoke a token; it stops working immediately."""
    return TokenOut.build(tokens.revoke_token(session, token_id=token_id, actor=caller.principal))
