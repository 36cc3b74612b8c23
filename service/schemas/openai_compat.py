"""Bodies of the OpenAI-compatible endpoints (/v1/chat/completions, /v1/models).

Only the fields oblivio acts on are typed strictly; the sampling options OpenAI clients send
(temperature, top_p, ...) are accepted and ignored, because serving decodes greedily: the
same question always gets the same answer from the same version, which is what makes an
unlearning result checkable.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.schemas.common import NonBlank

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    # A string, or OpenAI's list of content parts (only `text` parts are read).
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content
                       if part.get("type") == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="End the stream with a chunk holding "
                                "`usage` (and no choices), as OpenAI does.")


class ChatCompletionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NonBlank = Field(..., max_length=200, description="`lineage` (its live version), "
                            "`lineage@vN`, `lineage@candidate` or `lineage@base`.")
    messages: list[ChatMessageIn] = Field(..., min_length=1, max_length=256)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1024)
    n: int = Field(1, ge=1, le=1, description="Only one choice (decoding is greedy).")
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if not any(m.role == "user" and m.text().strip() for m in messages):
            raise ValueError("messages must contain at least one non-empty user message")
        return messages

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "oblivio"
    # oblivio's own fields: what the name points at right now.
    lineage: str
    version: int | None = Field(None, description="Version number; null = the base model.")
    status: str | None = None
    aliases: list[str] = Field(default_factory=list)
    parent: str | None = Field(None, description="The parent version's model id.")


class ModelListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
