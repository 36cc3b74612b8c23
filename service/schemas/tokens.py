"""Bodies of /v1/tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import NonBlank
from storage.models import ApiToken, Role


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    name: NonBlank = Field(max_length=128)


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def build(cls, token: ApiToken) -> TokenOut:
        return cls(id=token.id, name=token.name, role=token.role, created_at=token.created_at,
                   revoked_at=token.revoked_at)


class NewTokenOut(TokenOut):
    token: str = Field(description="The secret. Shown only this once; store it now.")
