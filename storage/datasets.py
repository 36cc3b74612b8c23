"""Fine-tuning datasets and their records (S3T), and the checkpoints trained on them.

A record is {"id", "subject_id"?, "text"} or {"id", "subject_id"?, "prompt", "response"}.
Its content hash is the sha256 of the canonical JSON of its content fields, so a receipt
can name exactly which content a layer group saw, also after the content is purged.

Functions here never commit: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage import audit
from storage.errors import Conflict, InvalidRequest, NotFound
from storage.models import Dataset, Record, S3TCheckpoint, utcnow

CONTENT_FIELDS = ("text", "prompt", "response")
# At most this many ids are quoted in an error message (the rest are counted).
_QUOTED = 10


def content_of(record: dict[str, Any]) -> dict[str, str]:
    """The content part of a record: {"text"} or {"prompt", "response"}."""
    return {k: record[k] for k in CONTENT_FIELDS if record.get(k) is not None}


def content_sha256(content: dict[str, Any]) -> str:
    raw = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def _quote(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_QUOTED])
    return shown + (f" and {len(ids) - _QUOTED} more" if len(ids) > _QUOTED else "")


def get_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFound(f"unknown dataset {name!r}")
    return dataset


def add_records(session: Session, *, name: str, records: Sequence[dict[str, Any]],
                actor: str) -> tuple[Dataset, bool]:
    """Register `records` under dataset `name` (created if new); returns (dataset, created).

    A record id given twice in `records` raises InvalidRequest (422); one the dataset
    already has raises Conflict (409); both name the ids. Records can only be added until
    the dataset's first fine-tune fixes its placement into shards and slices.
    """
    ids = [str(r["id"]) for r in records]
    seen: set[str] = set()
    repeated = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if repeated:
        raise InvalidRequest(f"duplicate record id(s) in the upload: "
                             f"{_quote(sorted(set(repeated)))}")
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    created = dataset is None
    if dataset is None:
        dataset = Dataset(name=name, created_by=actor)
        session.add(dataset)
        session.flush()
    elif dataset.shards is not None:
        raise Conflict(f"dataset {name!r} has been fine-tuned; register new records as a "
                       "new dataset")
    else:
        existing = sorted(session.scalars(select(Record.record_id).where(
            Record.dataset_id == dataset.id, Record.record_id.in_(ids))))
        if existing:
            raise Conflict(f"dataset {name!r} already has record id(s) {_quote(existing)}")
    for r in records:
        content = content_of(r)
        session.add(Record(dataset_id=dataset.id, record_id=str(r["id"]),
                           subject_id=r.get("subject_id"), content=content,
                           content_sha256=content_sha256(content)))
    session.flush()
    audit.record(session, actor=actor, action="dataset.records_added", subject_type="dataset",
                 subject_id=dataset.id, detail={"name": name, "records": len(records)})
    return dataset, created


def summary(session: Session, dataset: Dataset) -> dict[str, Any]:
    """Counts, and per shard its records per slice once placed."""
    rows = session.execute(select(Record.shard, Record.slice, Record.deleted_at.is_(None),
                                  func.count()).where(Record.dataset_id == dataset.id)
                           .group_by(Record.shard, Record.slice, Record.deleted_at.is_(None))
                           ).tuples()
    total = deleted = 0
    shards: dict[int, dict[str, Any]] = {}
    for shard, slice_, live, n in rows:
        total += n
        if not live:
            deleted += n
            continue
        if shard is not None:
            entry = shards.setdefault(shard, {"shard": shard, "records": 0, "slices": {}})
            entry["records"] += n
            entry["slices"][str(slice_)] = entry["slices"].get(str(slice_), 0) + n
    subjects = session.scalar(select(func.count(func.distinct(Record.subject_id))).where(
        Record.dataset_id == dataset.id, Record.deleted_at.is_(None))) or 0
    return {"name": dataset.name, "records": total - deleted, "deleted_records": deleted,
            "subjects": subjects, "num_shards": dataset.shards, "num_slices": dataset.slices,
            "shards": [shards[k] for k in sorted(shards)],
            "created_at": dataset.created_at}


def all_records(session: Session, dataset: Dataset) -> list[Record]:
    return list(session.scalars(select(Record).where(Record.dataset_id == dataset.id)
                                .order_by(Record.record_id)))


def place(session: Session, dataset: Dataset, *, shards: int, slices: int,
          placement: dict[str, tuple[int, int]]) -> None:
    """Fix the dataset's placement (record id -> (shard, slice)); once, for good."""
    if dataset.shards is not None:
        if (dataset.shards, dataset.slices) != (shards, slices):
            raise Conflict(f"dataset {dataset.name!r} is placed into {dataset.shards} shard(s) "
                           f"x {dataset.slices} slice(s); fine-tune it with those")
        return
    for record in all_records(session, dataset):
        record.shard, record.slice = placement[record.record_id]
    dataset.shards, dataset.slices = shards, slices
    session.flush()


def check_placement(session: Session, name: str, *, shards: int, slices: int) -> Dataset:
    """At fine-tune submission: the dataset exists, has live records, and fits S x L."""
    dataset = get_dataset(session, name)
    live = session.scalar(select(func.count()).select_from(Record).where(
        Record.dataset_id == dataset.id, Record.deleted_at.is_(None))) or 0
    if live == 0:
        raise InvalidRequest(f"dataset {name!r} has no records to fine-tune on")
    if dataset.shards is not None and (dataset.shards, dataset.slices) != (shards, slices):
        raise Conflict(f"dataset {name!r} is placed into {dataset.shards} shard(s) x "
                       f"{dataset.slices} slice(s); fine-tune it with those")
    return dataset


@dataclass(frozen=True)
class Deletion:
    dataset: str
    record_ids: list[str]          # every record the request selects (sorted)
    already_deleted: list[str]     # of those, the ones deleted by an earlier ticket


def resolve_deletion(session: Session, *, dataset: str, record_ids: Sequence[str] | None,
                     subject_id: str | None) -> Deletion:
    """The records a delete_records request selects; InvalidRequest (422) naming the record
    ids or the subject that were never registered in the dataset."""
    ds = get_dataset(session, dataset)
    if record_ids:
        wanted = sorted(set(record_ids))
        rows = list(session.scalars(select(Record).where(Record.dataset_id == ds.id,
                                                         Record.record_id.in_(wanted))))
        unknown = sorted(set(wanted) - {r.record_id for r in rows})
        if unknown:
            raise InvalidRequest(f"unknown record id(s) in dataset {dataset!r}: "
                                 f"{_quote(unknown)}")
    elif subject_id:
        rows = list(session.scalars(select(Record).where(Record.dataset_id == ds.id,
                                                         Record.subject_id == subject_id)))
        if not rows:
            raise InvalidRequest(f"unknown subject_id {subject_id!r} in dataset {dataset!r}")
    else:
        raise InvalidRequest("give record_ids or subject_id")
    return Deletion(dataset=dataset, record_ids=sorted(r.record_id for r in rows),
                    already_deleted=sorted(r.record_id for r in rows
                                           if r.deleted_at is not None))


def mark_deleted(session: Session, *, dataset: str, record_ids: Iterable[str], ticket_id: str,
                 actor: str) -> list[str]:
    """Mark records deleted and purge their content (the hash stays); idempotent.
    Returns the ids newly deleted."""
    ds = get_dataset(session, dataset)
    ids = sorted(set(record_ids))
    now = utcnow()
    newly = []
    for record in session.scalars(select(Record).where(Record.dataset_id == ds.id,
                                                       Record.record_id.in_(ids))):
        if record.deleted_at is None:
            record.deleted_at, record.deleted_by_ticket, record.content = now, ticket_id, None
            newly.append(record.record_id)
    session.flush()
    if newly:
        audit.record(session, actor=actor, action="dataset.records_deleted",
                     subject_type="dataset", subject_id=ds.id,
                     detail={"ticket_id": ticket_id, "record_ids": sorted(newly)})
    return sorted(newly)


def deleted_ids(session: Session, dataset: Dataset) -> list[str]:
    return sorted(session.scalars(select(Record.record_id).where(
        Record.dataset_id == dataset.id, Record.deleted_at.is_not(None))))


def deleted_ids_served(session: Session, *, dataset_name: str,
                       prefix_hashes: Sequence[str]) -> list[str]:
    """Deleted record ids that any of these layer groups was trained on (empty: serving
    them cannot bring a deleted record back). An unknown dataset has deleted nothing."""
    ds = session.scalar(select(Dataset).where(Dataset.name == dataset_name))
    if ds is None or not prefix_hashes:
        return []
    gone = set(deleted_ids(session, ds))
    seen: set[str] = set()
    for ids in session.scalars(select(S3TCheckpoint.record_ids).where(
            S3TCheckpoint.prefix_hash.in_(list(prefix_hashes)))):
        seen.update(ids)
    return sorted(gone & seen)


def checkpoint(session: Session, prefix_hash: str) -> S3TCheckpoint | None:
    return session.scalar(select(S3TCheckpoint).where(S3TCheckpoint.prefix_hash == prefix_hash))


def add_checkpoint(session: Session, **fields: Any) -> S3TCheckpoint:
    """Record a trained prefix; an identical prefix stored meanwhile wins (same content)."""
    existing = checkpoint(session, fields["prefix_hash"])
    if existing is not None:
        return existing
    row = S3TCheckpoint(**fields)
    session.add(row)
    session.flush()
    return row


def verify_groups(session: Session, *, dataset: Dataset, prefix_hashes: Sequence[str],
                  deleted: Iterable[str]) -> dict[str, Any]:
    """Exactness evidence from the database alone, for the layer groups a version serves.

    For each group: its checkpoint row's training-record ids, whether any deleted id is
    among them, and whether the record-set hash recomputed from the records table's stored
    content hashes equals the one the checkpoint was trained under.
    """
    gone = set(deleted)
    hashes = {r.record_id: r.content_sha256 for r in all_records(session, dataset)}
    groups = []
    for prefix in prefix_hashes:
        row = checkpoint(session, prefix)
        if row is None:
            groups.append({"prefix_hash": prefix, "found": False})
            continue
        lines = sorted(f"{i}:{hashes.get(i, '?')}" for i in row.record_ids)
        recomputed = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        groups.append({"prefix_hash": prefix, "found": True, "shard": row.shard,
                       "position": row.position, "records": len(row.record_ids),
                       "record_set_sha256": row.record_set_sha256,
                       "hash_matches_records": recomputed == row.record_set_sha256,
                       "deleted_ids_trained_on": sorted(gone.intersection(row.record_ids))})
    exact = all(g["found"] and g["hash_matches_records"] and not g["deleted_ids_trained_on"]
                for g in groups)
    return {"served_groups": groups, "exact": exact}
