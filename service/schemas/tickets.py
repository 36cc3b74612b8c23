"""Request and response bodies of /v1/tickets."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from service.schemas.common import DatasetName, LineageName, NonBlank
from service.settings import Settings
from storage.models import TicketKind, TicketStatus
from storage.sealing import payload_summary
from storage.tickets import TicketRequest, TicketView

# Hard caps independent of settings; the configurable limits are checked in `check_limits`.
Text = Annotated[NonBlank, StringConstraints(max_length=100_000)]
RecordId = Annotated[NonBlank, StringConstraints(max_length=256)]
Engine = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Priority = Annotated[int, Field(ge=-100, le=100, description="Higher is claimed first.")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QAPair(_Strict):
    question: Text
    answer: Text


class RetainSet(_Strict):
    """Examples whose behaviour must not change (optional; O3 needs none)."""

    texts: list[Text] = Field(default_factory=list)
    qa: list[QAPair] = Field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.texts) + len(self.qa)


class ForgetSet(RetainSet):
    """What the model must forget: passages of text and/or question/answer pairs."""

    @model_validator(mode="after")
    def _not_empty(self) -> ForgetSet:
        if self.size == 0:
            raise ValueError("the forget set is empty: give at least one text or "
                             "question/answer pair")
        return self


class _TicketBase(_Strict):
    lineage: LineageName = "default"
    engine: Engine | None = Field(None, description="o3, ga, graddiff, npo, idk (forget); s3t "
                                                    "(delete_records). Default by kind.")
    priority: Priority = 0
    not_before: AwareDatetime | None = Field(
        None, description="Do not start before this instant (ISO 8601 with a time zone).")


class ForgetTicketIn(_TicketBase):
    """Forget knowledge or text, e.g. everything the model says about a person."""

    kind: Literal["forget"]
    target: Annotated[NonBlank, StringConstraints(max_length=512)] | None = Field(
        None, description="Who or what is forgotten, e.g. a person's name.")
    forget: ForgetSet
    retain: RetainSet | None = None

    def payload(self) -> dict[str, Any]:
        return {"target": self.target, "forget": self.forget.model_dump(),
                "retain": self.retain.model_dump() if self.retain else None}


class DeleteRecordsTicketIn(_TicketBase):
    """Delete fine-tuning records, by id or by data subject, exactly (S3T)."""

    kind: Literal["delete_records"]
    dataset: DatasetName = Field(description="Registered dataset name: letters, digits, "
                                 "'.', '_', '-' (at most 128).")
    record_ids: Annotated[list[RecordId], Field(min_length=1)] | None = None
    subject_id: Annotated[NonBlank, StringConstraints(max_length=256)] | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> DeleteRecordsTicketIn:
        if (self.record_ids is None) == (self.subject_id is None):
            raise ValueError("give exactly one of record_ids or subject_id")
        return self

    def payload(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "record_ids": self.record_ids,
                "subject_id": self.subject_id}


TicketIn = Annotated[ForgetTicketIn | DeleteRecordsTicketIn, Field(discriminator="kind")]


class TicketRevokeIn(_Strict):
    """POST /v1/tickets/{id}/revoke: withdraw a done ticket's forgetting (operators)."""

    reason: Text = Field(max_length=2000, description="Why, kept in the ticket's timeline.")


def check_limits(body: ForgetTicketIn | DeleteRecordsTicketIn, settings: Settings) -> None:
    """Apply the configurable limits; violations are 422s shaped like pydantic's own."""
    errors: list[dict[str, Any]] = []

    def too_long(loc: tuple[Any, ...], value: str) -> None:
        if len(value) > settings.max_text_chars:
            errors.append({"type": "string_too_long", "loc": ("body", *loc),
                           "msg": f"text has {len(value)} characters; the limit is "
                                  f"{settings.max_text_chars} (OBLIVIO_MAX_TEXT_CHARS)"})

    if isinstance(body, ForgetTicketIn):
        for name, items in (("forget", body.forget), ("retain", body.retain)):
            if items is None:
                continue
            if items.size > settings.max_forget_items:
                errors.append({"type": "too_long", "loc": ("body", name),
                               "msg": f"{name} set has {items.size} items; the limit is "
                                      f"{settings.max_forget_items} (OBLIVIO_MAX_FORGET_ITEMS)"})
            for i, text in enumerate(items.texts):
                too_long((name, "texts", i), text)
            for i, pair in enumerate(items.qa):
                too_long((name, "qa", i, "question"), pair.question)
                too_long((name, "qa", i, "answer"), pair.answer)
    elif body.record_ids is not None and len(body.record_ids) > settings.max_record_ids:
        errors.append({"type": "too_long", "loc": ("body", "record_ids"),
                       "msg": f"{len(body.record_ids)} record ids; the limit is "
                              f"{settings.max_record_ids} (OBLIVIO_MAX_RECORD_IDS)"})
    if errors:
        raise RequestValidationError(errors)


def to_request(body: ForgetTicketIn | DeleteRecordsTicketIn) -> TicketRequest:
    """The ticket to store, with its engine resolved and its request checked by that engine.

    The engine registry (workers.engines) is the one table of engines: an unknown engine,
    one that cannot serve the kind, or a request the engine cannot do is an InvalidRequest
    (422, saying why) here, at submission, never a job that fails later.
    """
    from workers.engines import get_engine, request_from_payload, resolve_engine

    target = getattr(body, "target", None)
    engine = resolve_engine(body.kind, body.engine)
    get_engine(engine).validate(request_from_payload(kind=body.kind, engine=engine,
                                                     payload=body.payload(), target=target))
    return TicketRequest(kind=TicketKind(body.kind), payload=body.payload(), lineage=body.lineage,
                         engine=engine, target=target, priority=body.priority,
                         not_before=body.not_before)


class VersionRefOut(BaseModel):
    id: uuid.UUID
    label: str = Field(description="`lineage@vN`")


class ReviewOut(BaseModel):
    """Why a ticket's version waits for an operator instead of being live."""

    version_id: uuid.UUID
    version_status: str
    verdict: str | None = Field(description="pass, hold (or reject) from its evaluation")
    reason: str = Field(description="One readable line: the checks it failed, with figures.")
    held_back_by: list[dict[str, Any]] = Field(
        description="The failed checks: name, before, after, value, op, threshold, passed.")
    checks: list[dict[str, Any]] = Field(description="Every check of its evaluation.")


class TimelineEventOut(BaseModel):
    at: datetime
    event: str = Field(description="submitted, claimed, evaluating, awaiting_review, done, "
                                   "reopened, requeued, retry, failed, rejected, cancelled")
    actor: str
    detail: dict[str, Any] = Field(default_factory=dict)


class TicketOut(BaseModel):
    """A ticket as callers see it. The raw forget text is never echoed back, only its size
    and hash: the point of the ticket is to make that text go away."""

    id: uuid.UUID
    kind: TicketKind
    lineage: str
    engine: str
    target: str | None
    status: TicketStatus
    priority: int
    attempts: int
    not_before: datetime | None
    created_at: datetime
    updated_at: datetime
    error: str | None
    progress: dict[str, Any] | None
    result_version: VersionRefOut | None
    requester: str
    idempotency_key: str | None
    payload_sha256: str
    summary: dict[str, Any] | None = Field(
        description="Sizes of the request (item counts, dataset); null once purged.")
    review: ReviewOut | None = Field(
        None, description="While awaiting_review: the version's verdict and the evaluation "
                          "figures that held it back.")
    timeline: list[TimelineEventOut] | None = Field(
        None, description="Every change of the ticket, oldest first (GET of one ticket only).")

    @classmethod
    def from_view(cls, view: TicketView,
                  timeline: list[dict[str, Any]] | None = None) -> TicketOut:
        t = view.ticket
        ref = view.result_version
        return cls(
            review=ReviewOut.model_validate(view.review) if view.review else None,
            timeline=[TimelineEventOut.model_validate(e) for e in timeline]
            if timeline is not None else None,
            id=t.id, kind=t.kind, lineage=view.lineage, engine=t.engine, target=t.target,
            status=t.status, priority=t.priority, attempts=t.attempts, not_before=t.not_before,
            created_at=t.created_at, updated_at=t.updated_at, error=t.error,
            progress=t.progress, requester=t.requester, idempotency_key=t.idempotency_key,
            result_version=VersionRefOut(id=ref.id, label=ref.label) if ref else None,
            payload_sha256=t.payload_sha256, summary=payload_summary(t.payload))


class TicketPageOut(BaseModel):
    items: list[TicketOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at "
                                                "the end.")


class ReceiptOut(BaseModel):
    """What was done for a ticket; `live` says whether the model that answers requests
    contains it. Extra fields written by the worker are passed through."""

    model_config = ConfigDict(extra="allow")

    ticket_id: uuid.UUID
    kind: TicketKind
    lineage: str
    engine: str
    status: TicketStatus
    payload_sha256: str
    requested_at: datetime
    completed_at: datetime | None = Field(
        None, description="When the live model came to contain the ticket; null until then.")
    live: bool = Field(False, description="Whether the live model contains this ticket's "
                                          "forgetting now (the ticket is done).")
    live_version: str | None = Field(None, description="`lineage@vN` live now.")
    done_at: datetime | None = None
    review: dict[str, Any] | None = Field(
        None, description="While awaiting_review: the figures that held its version back.")
    version: str | None = None
    version_id: uuid.UUID | None = None
    adapter_sha256: str | None = None
    base_model: str | None = None
    base_model_sha256: str | None = None
    metrics: dict[str, Any] | None = None
    format: str | None = Field(None, description="`oblivio-receipt/1`")
    requester: str | None = None
    forget_set_sha256: str | None = Field(
        None, description="sha256 of the request's canonical JSON; the text itself is purged")
    method_config: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] = Field(
        default_factory=list, description="{name, object_key, sha256} of every artifact")
    evaluation: dict[str, Any] | None = Field(
        None, description="verdict, and checks: {name, before, after, value, op, threshold, "
                          "passed}")
    phases: dict[str, Any] | None = Field(None, description="timestamps of each phase")
    exactness_proof: dict[str, Any] | None = Field(
        None, description="exact deletion (S3T): what was cut and why that is exact")
    signature: dict[str, Any] | None = Field(
        None, description="{algorithm: HMAC-SHA256, key_id, value} over the canonical JSON "
                          "of every other field")
