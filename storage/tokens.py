"""API tokens: created with a role, shown once, stored only as a sha256 hash.

Functions here never commit: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage import audit
from storage.errors import InvalidRequest, NotFound
from storage.models import ApiToken, Role, utcnow

TOKEN_PREFIX = "obl_"
ADMIN_TOKEN_FILE = "admin-token"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def principal(token_id: uuid.UUID) -> str:
    """The requester/actor string for a token: stable and unique even if names repeat."""
    return f"token:{token_id}"


def create_token(session: Session, *, role: Role | str, name: str, actor: str = "system"
                 ) -> tuple[ApiToken, str]:
    """A new token and its secret (`obl_...`); the secret is not stored and cannot be shown again."""
    try:
        role = Role(role)
    except ValueError:
        raise InvalidRequest(f"unknown role {role!r}; choose one of "
                             f"{', '.join(r.value for r in Role)}") from None
    if not name or len(name) > 128:
        raise InvalidRequest("a token name must have 1 to 128 characters")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_hash=hash_secret(secret))
    session.add(token)
    session.flush()
    audit.record(session, actor=actor, action="token.created", subject_type="token",
                 subject_id=token.id, detail={"role": role.value, "name": name})
    return token, secret


def authenticate(session: Session, secret: str) -> ApiToken | None:
    """The active token with this secret, or None.

    The database is searched by the sha256 of the secret, so its index comparison can only
    leak how much of a *hash* matched, which says nothing about the secret; the final check
    compares the full hashes in constant time (hmac.compare_digest) all the same.
    """
    if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
        return None
    digest = hash_secret(secret)
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    if token.revoked_at is not None:
        return None
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)))


def revoke_token(session: Session, *, token_id: uuid.UUID, actor: str) -> ApiToken:
    """Revoke a token (idempotent): it stops working at once."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(session, actor=actor, action="token.revoked", subject_type="token",
                     subject_id=token.id)
    return token


def ensure_bootstrap_admin(session: Session, data_dir: Path) -> Path | None:
    """On first start of an embedded install, create an admin token and write it to a file.

    Returns the file's path when a token was created, None when an active admin token
    already exists. The secret goes only to `<data_dir>/admin-token` (mode 0600), never to
    logs or stdout.
    """
    active_admin = session.scalar(select(ApiToken.id).where(
        ApiToken.role == Role.admin, ApiToken.revoked_at.is_(None)).limit(1))
    if active_admin is not None:
        return None
    _token, secret = create_token(session, role=Role.admin, name="bootstrap-admin",
                                  actor="system:bootstrap")
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    write_secret_file(path, secret)
    return path.resolve()


def write_secret_file(path: Path, secret: str) -> None:
    """Write atomically with mode 0600 from the start (no window where others can read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but an existing file might be wider
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
