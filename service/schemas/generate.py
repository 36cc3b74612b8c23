"""Bodies of /v1/generate."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import LineageName, NonBlank


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: NonBlank = Field(..., max_length=8000, description="The user turn; the chat "
                             "template is applied for instruct models.")
    lineage: LineageName = "default"
    version: str | None = Field(None, description="live (default), candidate, 3 / v3, or a "
                                "version id. A revoked version is refused.")
    max_new_tokens: int = Field(64, ge=1, le=1024)


class GenerateOut(BaseModel):
    text: str
    lineage: str
    version: str | None = Field(description="lineage@vN that answered; null = base model")
    version_id: str | None
