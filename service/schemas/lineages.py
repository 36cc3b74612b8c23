"""Bodies of /v1/lineages and /v1/versions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.schemas.common import LineageName, NonBlank
from storage.models import AdapterVersion, Lineage, VersionStatus


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LineageIn(_Strict):
    name: LineageName
    base_model: NonBlank | None = Field(None, max_length=512,
                                        description="Default: the service's base model.")
    engine: str = Field("o3", max_length=32, description="A registered engine's name.")

    @field_validator("engine")
    @classmethod
    def _registered_engine(cls, value: str) -> str:
        from workers.engines import list_engines  # the registry is the one list of engines

        known = list_engines()
        if value not in known:
            raise ValueError(f"unknown engine {value!r}; choose one of {', '.join(known)}")
        return value


class LineageOut(BaseModel):
    id: uuid.UUID
    name: str
    base_model: str
    base_model_sha256: str | None
    engine: str
    created_at: datetime
    aliases: dict[str, str] = Field(default_factory=dict,
                                    description="alias name -> `lineage@vN`")

    @classmethod
    def build(cls, lineage: Lineage, aliases: dict[str, str]) -> LineageOut:
        return cls(id=lineage.id, name=lineage.name, base_model=lineage.base_model,
                   base_model_sha256=lineage.base_model_sha256, engine=lineage.engine,
                   created_at=lineage.created_at, aliases=aliases)


class VersionOut(BaseModel):
    id: uuid.UUID
    lineage: str
    version: int
    label: str = Field(description="`lineage@vN`")
    status: VersionStatus
    parent_id: uuid.UUID | None
    ticket_ids: list[Any]
    job_id: uuid.UUID | None
    object_key: str | None
    sha256: str | None
    size: int | None
    base_model_sha256: str | None
    metrics: dict[str, Any] | None
    created_at: datetime
    aliases: list[str] = Field(default_factory=list, description="e.g. ['live']")

    @classmethod
    def build(cls, version: AdapterVersion, lineage_name: str, aliases: list[str]) -> VersionOut:
        return cls(id=version.id, lineage=lineage_name, version=version.version,
                   label=f"{lineage_name}@v{version.version}", status=version.status,
                   parent_id=version.parent_id, ticket_ids=list(version.ticket_ids or []),
                   job_id=version.job_id, object_key=version.object_key, sha256=version.sha256,
                   size=version.size, base_model_sha256=version.base_model_sha256,
                   metrics=version.metrics, created_at=version.created_at, aliases=aliases)


class PromoteIn(_Strict):
    version: int = Field(ge=1)
    alias: str = Field("live", pattern=r"^[a-z][a-z0-9_-]{0,31}$")


class RevokeIn(_Strict):
    reason: NonBlank = Field(max_length=2000)
    tickets: Literal["requeue", "fail"] = Field(
        "requeue", description="What happens to the version's tickets still awaiting review: "
                               "back to the queue (trained again on what is live) or failed, "
                               "with the reason. Done tickets it served are reopened either "
                               "way when it was live.")
