"""SQLAlchemy 2 typed tables. Alembic (storage/migrations) owns the schema; keep both in step."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings with a CHECK-free VARCHAR: adding a state later needs no
    # ALTER TYPE on PostgreSQL.
    return Enum(cls, native_enum=False, create_constraint=False, length=32,
                values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class TicketKind(str, enum.Enum):
    forget = "forget"
    delete_records = "delete_records"
    # Internal (POST /v1/lineages/{name}/finetune, and S3T's retrain after a deletion):
    # fine-tunes go through the same durable queue, leases and job runner as deletions.
    finetune = "finetune"
    # Internal (POST /v1/tickets/{id}/revoke): an operator withdraws a done ticket's
    # forgetting; engines with separable requests (O3) publish a version without it.
    revoke = "revoke"


class TicketStatus(str, enum.Enum):
    """Where a ticket stands; `done` means the live model no longer states what it asked.

    received -> queued -> running -> evaluating, then:
      done             a version containing the ticket's forgetting is `live`
      awaiting_review  its version was held back by its evaluation (or auto-promotion is
                       off): a `candidate` an operator may promote (-> done) or revoke
                       (-> queued or failed)
      reopened         it was done, but `live` no longer contains its version (rolled back
                       past it, or the version was revoked); promoting a version that
                       contains it makes it done again
      failed, rejected, cancelled   final, with the reason in `error`
    See storage/ticket_states.py for every move after a job.
    """

    received = "received"
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    awaiting_review = "awaiting_review"
    done = "done"
    reopened = "reopened"
    failed = "failed"
    rejected = "rejected"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_TICKET_STATES


_FINAL_TICKET_STATES = {TicketStatus.done, TicketStatus.failed, TicketStatus.rejected,
                        TicketStatus.cancelled}


class JobStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    evaluating = "evaluating"
    succeeded = "succeeded"
    failed = "failed"


class VersionStatus(str, enum.Enum):
    training = "training"
    validating = "validating"
    ready = "ready"
    failed = "failed"
    superseded = "superseded"
    revoked = "revoked"


class Role(str, enum.Enum):
    submitter = "submitter"
    operator = "operator"
    admin = "admin"


class Lineage(Base):
    """A base model plus the chain of adapter versions trained on it, one engine."""

    __tablename__ = "lineages"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    base_model: Mapped[str] = mapped_column(String(512))
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(32), default="o3")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ticket(Base):
    """A deletion request; the row *is* the durable queue entry."""

    __tablename__ = "tickets"
    __table_args__ = (
        # ix_tickets_claim is declared below the class: it needs the column objects.
        Index("ix_tickets_lineage_created", "lineage_id", "created_at"),
    )
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[TicketKind] = mapped_column(_enum(TicketKind))
    lineage_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("lineages.id"))
    engine: Mapped[str] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(512))
    # The forget set / record selection. Raw forget text is purged (set to null) once the
    # ticket is done; payload_sha256 keeps proof of what was asked.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    payload_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[TicketStatus] = mapped_column(_enum(TicketStatus), default=TicketStatus.queued)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    requester: Mapped[str] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    result_version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapter_versions.id"))
    receipt: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# The claim query: queued tickets, highest priority first, oldest first within a priority.
# The index must carry the same mixed order (priority DESC, created_at ASC), otherwise both
# backends sort every queued ticket on each claim instead of reading the first index entry.
Index("ix_tickets_claim", Ticket.status, Ticket.priority.desc(), Ticket.created_at)


class Job(Base):
    """One training run that serves one or more tickets of a lineage."""

    __tablename__ = "jobs"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    lineage_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("lineages.id"))
    ticket_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    engine: Mapped[str] = mapped_column(String(32))
    method_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.pending)
    ray_job_id: Mapped[str | None] = mapped_column(String(128))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    logs_uri: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class AdapterVersion(Base):
    """An immutable adapter: its files live in the object store under `object_key`."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("lineage_id", "version"),)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    lineage_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("lineages.id"))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapter_versions.id"))
    ticket_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    object_key: Mapped[str | None] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    peft_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[VersionStatus] = mapped_column(
        _enum(VersionStatus), default=VersionStatus.training
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    """`live` / `candidate` pointers; moved only inside one transaction."""

    __tablename__ = "aliases"
    lineage_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("lineages.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    # sha256 of the secret; the secret itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_subject", "subject_type", "subject_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Schedule(Base):
    """A recurring window (cron, UTC) in which a lineage's waiting tickets become one job.

    While a lineage has an enabled `unlearn` schedule, its new tickets are held (see
    storage.schedules) instead of being claimed one by one by the dispatcher.
    """

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("lineage_id", "action"),)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    lineage_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("lineages.id"))
    action: Mapped[str] = mapped_column(String(32), default="unlearn")
    cron: Mapped[str] = mapped_column(String(128))
    min_tickets: Mapped[int] = mapped_column(Integer, default=1)
    max_tickets: Mapped[int] = mapped_column(Integer, default=64)
    enabled: Mapped[bool] = mapped_column(default=True)
    next_run_at: Mapped[datetime]
    last_run_at: Mapped[datetime | None]
    last_result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaderLease(Base):
    """One row per singleton role (e.g. `scheduler`): who holds it and until when."""

    __tablename__ = "leader_leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]


# --- S3T: fine-tuning datasets, their records, and content-addressed prefix checkpoints ---

class Dataset(Base):
    """A registered fine-tuning dataset. `shards`/`slices` are set by its first S3T
    fine-tune (record placement is then fixed, so later retrains reuse prefixes)."""

    __tablename__ = "datasets"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    shards: Mapped[int | None] = mapped_column(Integer)
    slices: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Record(Base):
    """One training record. `content` (text or prompt/response) is purged on deletion;
    `content_sha256` stays, so receipts can prove which content a layer group saw."""

    __tablename__ = "records"
    __table_args__ = (UniqueConstraint("dataset_id", "record_id"),
                      Index("ix_records_subject", "dataset_id", "subject_id"))
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    record_id: Mapped[str] = mapped_column(String(256))
    subject_id: Mapped[str | None] = mapped_column(String(256))
    content: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(String(64))
    shard: Mapped[int | None] = mapped_column(Integer)
    slice: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]
    deleted_by_ticket: Mapped[str | None] = mapped_column(String(64))


class S3TCheckpoint(Base):
    """One trained layer group: prefix (hash of base, config and the ordered record sets
    of its slices) -> the object holding its LoRA weights. Never changes once written."""

    __tablename__ = "s3t_checkpoints"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    prefix_hash: Mapped[str] = mapped_column(String(64), unique=True)
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    shard: Mapped[int] = mapped_column(Integer)
    sequence: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    slices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    layers: Mapped[list[Any]] = mapped_column(JSON, default=list)
    record_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    record_set_sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
