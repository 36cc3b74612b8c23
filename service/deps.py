"""Request dependencies: settings, a DB session per request, and the authenticated caller."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.rate_limit import retry_after_header
from service.settings import Settings
from storage import tokens
from storage.models import Role
from storage.sealing import PayloadCipher, cipher_from_config


def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]


def payload_cipher(app: Any) -> PayloadCipher:
    """The app's forget-set cipher, made on first use (it may create the key file)."""
    with app.state.payload_cipher_lock:
        if app.state.payload_cipher is None:
            settings = app.state.settings
            app.state.payload_cipher = cipher_from_config(settings.payload_key_text,
                                                          settings.payload_key_file)
        return app.state.payload_cipher


def get_payload_cipher(request: Request) -> PayloadCipher:
    return payload_cipher(request.app)


CipherDep = Annotated[PayloadCipher, Depends(get_payload_cipher)]


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back on error."""
    with request.app.state.sessions() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# scope="function": commit *before* the response is sent, so a client that gets a 202 can
# immediately read what it created, and a failed commit becomes an error response.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An oblivio API token: `obl_...`")

_RANK = {Role.submitter: 0, Role.operator: 1, Role.admin: 2}


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token and its role."""

    token_id: uuid.UUID
    name: str
    role: Role

    @property
    def principal(self) -> str:
        """The requester/actor string stored on tickets and audit events."""
        return tokens.principal(self.token_id)

    @property
    def sees_all_tickets(self) -> bool:
        return _RANK[self.role] >= _RANK[Role.operator]

    @property
    def ticket_owner_filter(self) -> str | None:
        """Submitters only ever see their own tickets; None means no restriction."""
        return None if self.sees_all_tickets else self.principal


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status_code=401, detail=message,
                         headers={"WWW-Authenticate": "Bearer"})


def get_caller(request: Request, session: SessionDep,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
               ) -> Caller:
    """The authenticated caller, or 401; 429 once the token is over its rate limit.

    The secret is never logged or echoed: error messages say only what kind of problem it is.
    """
    if credentials is None:
        raise _unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    token = tokens.authenticate(session, credentials.credentials)
    if token is None:
        raise _unauthorized("invalid or revoked token")
    limiter = getattr(request.app.state, "rate_limiter", None)
    wait = limiter.acquire(str(token.id)) if limiter is not None else None
    if wait is not None:
        raise HTTPException(status_code=429, headers={"Retry-After": retry_after_header(wait)},
                            detail=f"rate limit of {limiter.rate:g} requests per second for "
                                   f"this token exceeded; retry in {retry_after_header(wait)} s")
    return Caller(token_id=token.id, name=token.name, role=token.role)


def require(role: Role) -> Callable[[Caller], Caller]:
    """A dependency that admits callers with `role` or a higher one."""

    def check(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        if _RANK[caller.role] < _RANK[role]:
            raise HTTPException(status_code=403,
                                detail=f"this needs the {role.value} role; your token is "
                                       f"{caller.role.value}")
        return caller

    return check


SubmitterDep = Annotated[Caller, Depends(require(Role.submitter))]
OperatorDep = Annotated[Caller, Depends(require(Role.operator))]
AdminDep = Annotated[Caller, Depends(require(Role.admin))]
