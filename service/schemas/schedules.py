"""Bodies of /v1/schedules."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas.common import LineageName, NonBlank
from storage.models import Schedule


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: NonBlank = Field(..., max_length=128, description='5-field cron in UTC, e.g. '
                           '"0 2 * * *" (every day at 02:00).')
    lineage: LineageName = "default"
    min_tickets: int = Field(1, ge=1, le=10_000, description="Fewer waiting: the window "
                             "passes and they wait for the next.")
    max_tickets: int = Field(64, ge=1, le=10_000, description="At most this many tickets "
                             "in the window's job; the rest wait for the next window.")
    action: Literal["unlearn", "retrain", "evaluate"] = Field(
        "unlearn", description="What the window does: `unlearn` the waiting tickets in one "
        "job; `retrain` the cut layers of an S3T lineage once for all the deletions since the "
        "last window; `evaluate` the live version again (utility, neighbours, general "
        "benchmark; forget sets are deleted once their tickets are done, so forgetting "
        "keeps its figures from publication); min/max tickets are not used.")

    @model_validator(mode="after")
    def _bounds(self) -> ScheduleIn:
        if self.max_tickets < self.min_tickets:
            raise ValueError(f"max_tickets ({self.max_tickets}) must be at least min_tickets "
                             f"({self.min_tickets})")
        return self


class ScheduleOut(BaseModel):
    id: uuid.UUID
    lineage: str
    action: str
    cron: str
    min_tickets: int
    max_tickets: int
    enabled: bool
    next_run_at: datetime
    last_run_at: datetime | None
    last_result: dict[str, Any] | None
    waiting_tickets: int = Field(description="Tickets held for the next window.")
    created_by: str
    created_at: datetime

    @classmethod
    def build(cls, s: Schedule, lineage: str, waiting: int) -> ScheduleOut:
        return cls(id=s.id, lineage=lineage, action=s.action, cron=s.cron,
                   min_tickets=s.min_tickets, max_tickets=s.max_tickets, enabled=s.enabled,
                   next_run_at=s.next_run_at, last_run_at=s.last_run_at,
                   last_result=s.last_result, waiting_tickets=waiting,
                   created_by=s.created_by, created_at=s.created_at)
