"""The adapter registry: lineages, their immutable adapter versions, and aliases.

A lineage is a base model plus the chain of adapter versions trained on it. A version is
numbered 1, 2, 3... within its lineage (label `lineage@vN`), starts `training`, and becomes
`ready` only once its files are stored and verified in the object store (object key +
sha256). From then on it never changes, except for its status: `superseded` when another
version goes live, `revoked` when an operator withdraws it.

Aliases (`live`, `candidate`) point at versions; serving follows `live`. They move only
inside the caller's transaction, with the lineage row locked on PostgreSQL, so two
operators promoting at once are serialised and never leave two versions marked live.
A lineage with no `live` alias serves its base model. Every move of `live` also moves the
lineage's finished tickets between done / awaiting_review / reopened in the same
transaction (storage.ticket_states): a ticket is done only while live contains it.

Functions here never commit: the caller owns the transaction. Every change writes an audit
event into that same transaction.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import audit, datasets, ticket_states
from storage.errors import Conflict, InvalidRequest, NotFound
from storage.models import AdapterVersion, Alias, Lineage, VersionStatus, utcnow

LIVE = "live"
CANDIDATE = "candidate"
ALIASES = (LIVE, CANDIDATE)
# Versions that may be pointed at: ready ones, and superseded ones (rolling back/forward).
SERVABLE = (VersionStatus.ready, VersionStatus.superseded)
_UNFINISHED = (VersionStatus.training, VersionStatus.validating)
# Key in an S3T version's training metrics: {"dataset": name, "prefix_hashes": [the groups
# it serves]}; see deleted_records_served.
S3T_SERVED = "s3t_served"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION_REF = re.compile(r"v?(\d+)")
# The UNIQUE (lineage_id, version) constraint is the last guard against two versions taking
# one number; the loser of such a race (which the lineage lock should prevent) counts again.
_CREATE_VERSION_TRIES = 8


def version_label(lineage_name: str, version: int) -> str:
    return f"{lineage_name}@v{version}"


# --- lineages -----------------------------------------------------------------------------

def ensure_lineage(session: Session, *, name: str, base_model: str,
                   base_model_sha256: str | None = None, engine: str = "o3") -> Lineage:
    """The lineage called `name`, created if missing.

    Raises Conflict if it exists on a different base model: its adapters would not fit.
    """
    if not name or len(name) > 64:
        raise InvalidRequest("a lineage name must have 1 to 64 characters")
    lineage = session.scalar(select(Lineage).where(Lineage.name == name))
    if lineage is None:
        try:
            # A savepoint: losing a creation race rolls back only this insert.
            with session.begin_nested():
                lineage = Lineage(name=name, base_model=base_model,
                                  base_model_sha256=base_model_sha256, engine=engine)
                session.add(lineage)
                session.flush()
        except IntegrityError:
            lineage = session.scalar(select(Lineage).where(Lineage.name == name)
                                     .execution_options(populate_existing=True))
            if lineage is None:
                raise
        else:
            audit.record(session, actor="registry", action="lineage.created",
                         subject_type="lineage", subject_id=lineage.id,
                         detail={"name": name, "base_model": base_model, "engine": engine})
            return lineage
    if lineage.base_model != base_model:
        raise Conflict(f"lineage {name!r} exists on base model {lineage.base_model!r}, "
                       f"not {base_model!r}")
    return lineage


def get_lineage(session: Session, name: str) -> Lineage:
    lineage = session.scalar(select(Lineage).where(Lineage.name == name))
    if lineage is None:
        raise NotFound(f"unknown lineage {name!r}")
    return lineage


def list_lineages(session: Session) -> list[Lineage]:
    return list(session.scalars(select(Lineage).order_by(Lineage.name)))


# --- versions -----------------------------------------------------------------------------

def create_version(session: Session, *, lineage: Lineage, parent_id: uuid.UUID | None,
                   ticket_ids: Sequence[uuid.UUID | str], job_id: uuid.UUID | None,
                   peft_config: dict[str, Any] | None, base_model_sha256: str | None,
                   actor: str) -> AdapterVersion:
    """A new `training` version numbered one above the lineage's highest."""
    if parent_id is not None:
        parent = session.get(AdapterVersion, parent_id)
        if parent is None or parent.lineage_id != lineage.id:
            raise InvalidRequest(f"parent version {parent_id} is not a version of lineage "
                                 f"{lineage.name!r}")
    # Serialise numbering per lineage (PostgreSQL): the next creator waits for this
    # transaction and then counts past our number instead of colliding with it.
    _locked_lineage_by_id(session, lineage.id)
    for _ in range(_CREATE_VERSION_TRIES):
        number = (session.scalar(select(func.max(AdapterVersion.version))
                                 .where(AdapterVersion.lineage_id == lineage.id)) or 0) + 1
        version = AdapterVersion(lineage_id=lineage.id, version=number, parent_id=parent_id,
                                 ticket_ids=[str(t) for t in ticket_ids], job_id=job_id,
                                 peft_config=peft_config, base_model_sha256=base_model_sha256,
                                 status=VersionStatus.training)
        try:
            with session.begin_nested():
                session.add(version)
                session.flush()
        except IntegrityError:
            continue  # another transaction took this number first; count again
        audit.record(session, actor=actor, action="version.created", subject_type="version",
                     subject_id=version.id,
                     detail={"label": version_label(lineage.name, number),
                             "parent_id": str(parent_id) if parent_id else None,
                             "ticket_ids": version.ticket_ids,
                             "job_id": str(job_id) if job_id else None})
        return version
    raise Conflict(f"could not allocate a version number for lineage {lineage.name!r} after "
                   f"{_CREATE_VERSION_TRIES} tries; too many concurrent jobs")


def get_version(session: Session, version_id: uuid.UUID) -> AdapterVersion:
    version = session.get(AdapterVersion, version_id)
    if version is None:
        raise NotFound(f"unknown adapter version {version_id}")
    return version


def list_versions(session: Session, *, lineage_name: str) -> list[AdapterVersion]:
    lineage = get_lineage(session, lineage_name)
    return list(session.scalars(select(AdapterVersion)
                                .where(AdapterVersion.lineage_id == lineage.id)
                                .order_by(AdapterVersion.version)))


def mark_ready(session: Session, *, version_id: uuid.UUID, object_key: str, sha256: str,
               size: int, metrics: dict[str, Any] | None, actor: str,
               peft_config: dict[str, Any] | None = None) -> AdapterVersion:
    """Make a version `ready`: only once its files are uploaded and verified (key + sha256).

    After this the version's content fields never change.
    """
    version = _locked_version(session, version_id)
    if version.status not in _UNFINISHED:
        raise Conflict(f"version {version_id} is {version.status.value}; only a training or "
                       "validating version can become ready (versions are immutable)")
    if not object_key:
        raise InvalidRequest("a ready version needs the object key of its stored files")
    if not _SHA256.fullmatch(sha256 or ""):
        raise InvalidRequest(f"sha256 must be 64 lowercase hex characters, not {sha256!r}")
    if size < 0:
        raise InvalidRequest(f"size must not be negative, not {size}")
    version.object_key, version.sha256, version.size = object_key, sha256, size
    version.metrics = metrics
    if peft_config is not None:
        version.peft_config = peft_config
    version.status = VersionStatus.ready
    audit.record(session, actor=actor, action="version.ready", subject_type="version",
                 subject_id=version.id,
                 detail={"object_key": object_key, "sha256": sha256, "size": size})
    return version


def mark_failed(session: Session, *, version_id: uuid.UUID, actor: str, reason: str,
                metrics: dict[str, Any] | None = None) -> AdapterVersion:
    """A version whose training, upload or evaluation failed; it can never be served."""
    version = _locked_version(session, version_id)
    if version.status not in _UNFINISHED:
        raise Conflict(f"version {version_id} is {version.status.value}; only a training or "
                       "validating version can be marked failed")
    version.status = VersionStatus.failed
    version.metrics = {**(metrics or {}), "error": reason}
    audit.record(session, actor=actor, action="version.failed", subject_type="version",
                 subject_id=version.id, detail={"reason": reason})
    return version


# --- aliases ------------------------------------------------------------------------------

def get_aliases(session: Session, *, lineage_name: str) -> dict[str, AdapterVersion]:
    """Alias name -> version for one lineage (absent aliases are absent keys)."""
    lineage = get_lineage(session, lineage_name)
    rows = session.execute(select(Alias.name, AdapterVersion)
                           .join(AdapterVersion, AdapterVersion.id == Alias.version_id)
                           .where(Alias.lineage_id == lineage.id)).tuples()
    return {name: version for name, version in rows}


def promote(session: Session, *, lineage_name: str, version: int, actor: str,
            alias: str = LIVE) -> AdapterVersion:
    """Point `alias` (default `live`) of the lineage at version number `version`.

    Only a ready or superseded version can be promoted (superseded: re-promoting an older
    version); training, validating, failed and revoked ones are refused with Conflict.
    Moving `live` marks the previously live version superseded, and clears `candidate` if
    it pointed at the version just promoted. Promoting the version already there is a no-op.
    """
    if alias not in ALIASES:
        raise InvalidRequest(f"unknown alias {alias!r}; use one of {', '.join(ALIASES)}")
    lineage = _locked_lineage(session, lineage_name)
    target = _version_by_number(session, lineage, version)
    if target.status not in SERVABLE:
        raise Conflict(f"{version_label(lineage.name, target.version)} is "
                       f"{target.status.value}; only a ready or superseded version can be "
                       f"made {alias}")
    if alias == LIVE and (gone := deleted_records_served(session, target)):
        raise Conflict(f"{version_label(lineage.name, target.version)} serves layers trained "
                       f"on {len(gone)} record(s) deleted since ({_few(gone)}); making it "
                       "live would undo their deletion")
    _move_alias(session, lineage, alias, target, actor=actor, action="promote")
    return target


def set_candidate(session: Session, *, lineage_name: str, version: int,
                  actor: str) -> AdapterVersion:
    """Point the `candidate` alias at a version (waiting for an operator to promote it)."""
    return promote(session, lineage_name=lineage_name, version=version, actor=actor,
                   alias=CANDIDATE)


def rollback(session: Session, *, lineage_name: str, actor: str) -> AdapterVersion:
    """Move `live` to the nearest earlier servable version; Conflict if there is none."""
    lineage = _locked_lineage(session, lineage_name)
    current = _alias_target(session, lineage, LIVE)
    if current is None:
        raise Conflict(f"lineage {lineage.name!r} has no live version to roll back from")
    previous = _servable_before(session, lineage, current.version)
    if previous is None:
        raise Conflict(f"{version_label(lineage.name, current.version)} is the earliest "
                       "servable version that serves no deleted record; there is nothing "
                       "to roll back to")
    _move_alias(session, lineage, LIVE, previous, actor=actor, action="rollback")
    return previous


def revoke(session: Session, *, version_id: uuid.UUID, actor: str, reason: str,
           tickets: ticket_states.RevokedTickets = "requeue") -> AdapterVersion:
    """Withdraw a version for good. If it was live, live falls back to the nearest earlier
    servable version, or is removed (the lineage then serves its base model), and its done
    tickets are reopened. Its tickets awaiting review go back to the queue
    (`tickets="requeue"`) or fail (`"fail"`), with `reason`. Revoking a revoked version
    changes nothing.
    """
    version = get_version(session, version_id)
    lineage = _locked_lineage_by_id(session, version.lineage_id)
    # Re-read under the lock: another transaction may have changed it since.
    session.refresh(version, with_for_update={"key_share": True} if _pg(session) else None)
    if version.status is VersionStatus.revoked:
        return version
    label = version_label(lineage.name, version.version)
    detail: dict[str, Any] = {"label": label, "reason": reason, "from": version.status.value}
    version.status = VersionStatus.revoked
    _withdraw(session, lineage, version, detail, actor=actor, action="revoke", tickets=tickets)
    audit.record(session, actor=actor, action="version.revoked", subject_type="version",
                 subject_id=version.id, detail=detail)
    return version


def _withdraw(session: Session, lineage: Lineage, version: AdapterVersion,
              detail: dict[str, Any], *, actor: str, action: ticket_states.Withdrawal,
              tickets: ticket_states.RevokedTickets = "requeue") -> None:
    """What revoking a version and finding it corrupt share: it stops being the candidate;
    if it was live, live falls back (`_live_falls_back`) and the lineage's tickets follow
    live; then the version's own waiting tickets are requeued, failed or left reopened
    (`ticket_states.after_withdrawal`). Records what changed in `detail` (the caller's
    audit event).
    """
    label, reason = detail["label"], detail["reason"]
    if _alias_target(session, lineage, CANDIDATE) is version:
        _drop_alias(session, lineage, CANDIDATE)
        detail["candidate_cleared"] = True
    if _alias_target(session, lineage, LIVE) is version:
        detail["live"] = _live_falls_back(session, lineage, version)
        audit.record(session, actor=actor, action="alias.moved", subject_type="lineage",
                     subject_id=lineage.id,
                     detail={"alias": LIVE, "action": action, "from": label,
                             "to": detail["live"]})
        ticket_states.sync_with_live(session, lineage=lineage, actor=actor,
                                     cause={"action": action, "from": label,
                                            "to": detail["live"], "reason": reason})
    moved = ticket_states.after_withdrawal(session, version=version, label=label, actor=actor,
                                           reason=reason, action=action, tickets=tickets)
    detail["tickets"] = {k: [str(i) for i in v] for k, v in moved.items() if v}


def _live_falls_back(session: Session, lineage: Lineage, version: AdapterVersion
                     ) -> str | None:
    """Point live at the nearest earlier servable version before `version` (or drop it:
    the base model answers); returns the new live label."""
    fallback = _servable_before(session, lineage, version.version)
    if fallback is None:
        _drop_alias(session, lineage, LIVE)
        return None
    _point(session, lineage, LIVE, fallback)
    fallback.status = VersionStatus.ready
    return version_label(lineage.name, fallback.version)


def mark_corrupt(session: Session, *, version_id: uuid.UUID, actor: str,
                 reason: str) -> AdapterVersion:
    """A stored version whose files fail their sha256 check at load: it becomes `failed`
    (never served again) and, if it was live, live falls back to the nearest earlier
    servable version (or the base model), exactly as for a revocation: the lineage's
    tickets follow live (done ones whose version left the live chain are reopened), and
    the version's tickets awaiting review go back to the queue (the fault is in storage,
    not in the request). Idempotent."""
    version = get_version(session, version_id)
    lineage = _locked_lineage_by_id(session, version.lineage_id)
    session.refresh(version, with_for_update={"key_share": True} if _pg(session) else None)
    if version.status in (VersionStatus.failed, VersionStatus.revoked):
        return version
    label = version_label(lineage.name, version.version)
    detail: dict[str, Any] = {"label": label, "reason": reason, "from": version.status.value}
    version.status = VersionStatus.failed
    version.metrics = {**(version.metrics or {}), "error": reason}
    _withdraw(session, lineage, version, detail, actor=actor, action="corrupt")
    audit.record(session, actor=actor, action="version.corrupt", subject_type="version",
                 subject_id=version.id, detail=detail)
    return version


def resolve(session: Session, *, lineage_name: str, ref: str | None) -> AdapterVersion | None:
    """The version `ref` names in the lineage: None/"live"/"candidate" (None if the alias is
    unset), a number "3" or "v3", or a version UUID. Unknown numbers/ids raise NotFound.
    """
    lineage = get_lineage(session, lineage_name)
    ref = (ref or LIVE).strip()
    if ref in ALIASES:
        return _alias_target(session, lineage, ref)
    number = _VERSION_REF.fullmatch(ref)
    if number:
        return _version_by_number(session, lineage, int(number.group(1)))
    try:
        version_id = uuid.UUID(ref)
    except ValueError:
        raise InvalidRequest(f"cannot read version reference {ref!r}: use live, candidate, "
                             "a number (3 or v3) or a version id") from None
    version = session.get(AdapterVersion, version_id)
    if version is None or version.lineage_id != lineage.id:
        raise NotFound(f"no version {ref} in lineage {lineage.name!r}")
    return version


# --- helpers ------------------------------------------------------------------------------

def _pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _locked_lineage(session: Session, name: str) -> Lineage:
    # The lineage row is the lock for all of its aliases and version numbers: it exists even
    # when an alias row does not yet (a first promotion), where locking that would lock
    # nothing. FOR NO KEY UPDATE (key_share): unlike FOR UPDATE it does not block the
    # foreign-key checks of tickets being inserted for this lineage meanwhile.
    query = select(Lineage).where(Lineage.name == name)
    if _pg(session):
        query = query.with_for_update(key_share=True)
    lineage = session.scalar(query)
    if lineage is None:
        raise NotFound(f"unknown lineage {name!r}")
    return lineage


def _locked_lineage_by_id(session: Session, lineage_id: uuid.UUID) -> Lineage:
    query = select(Lineage).where(Lineage.id == lineage_id)
    if _pg(session):
        query = query.with_for_update(key_share=True)
    return session.scalars(query).one()


def _locked_version(session: Session, version_id: uuid.UUID) -> AdapterVersion:
    query = select(AdapterVersion).where(AdapterVersion.id == version_id)
    if _pg(session):
        query = query.with_for_update(key_share=True)
    version = session.scalar(query)
    if version is None:
        raise NotFound(f"unknown adapter version {version_id}")
    return version


def _version_by_number(session: Session, lineage: Lineage, number: int) -> AdapterVersion:
    version = session.scalar(select(AdapterVersion).where(AdapterVersion.lineage_id == lineage.id,
                                                          AdapterVersion.version == number))
    if version is None:
        raise NotFound(f"no version {version_label(lineage.name, number)}")
    return version


def _alias_target(session: Session, lineage: Lineage, alias: str) -> AdapterVersion | None:
    row = session.get(Alias, (lineage.id, alias), populate_existing=True)
    return session.get(AdapterVersion, row.version_id) if row else None


def _servable_before(session: Session, lineage: Lineage, number: int) -> AdapterVersion | None:
    """The nearest earlier servable version that serves no deleted record (`None`: only
    the base model is safe to fall back to)."""
    earlier = session.scalars(select(AdapterVersion)
                              .where(AdapterVersion.lineage_id == lineage.id,
                                     AdapterVersion.version < number,
                                     AdapterVersion.status.in_(SERVABLE))
                              .order_by(AdapterVersion.version.desc()))
    return next((v for v in earlier if not deleted_records_served(session, v)), None)


def deleted_records_served(session: Session, version: AdapterVersion) -> list[str]:
    """Record ids deleted (delete_records tickets) since `version` was built that its
    layer groups were trained on. Only S3T versions say which groups they serve
    (`metrics["training"]["s3t_served"]`, from the engine's metrics); pointing `live` at
    a version for which this is not empty would undo an exact deletion, so promote,
    rollback and fallback refuse it."""
    served = ((version.metrics or {}).get("training") or {}).get(S3T_SERVED)
    if not served:
        return []
    return datasets.deleted_ids_served(session, dataset_name=served["dataset"],
                                       prefix_hashes=served["prefix_hashes"])


def _few(ids: Sequence[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _point(session: Session, lineage: Lineage, alias: str, version: AdapterVersion) -> None:
    row = session.get(Alias, (lineage.id, alias))
    if row is None:
        session.add(Alias(lineage_id=lineage.id, name=alias, version_id=version.id,
                          updated_at=utcnow()))
    else:
        row.version_id = version.id
        row.updated_at = utcnow()
    session.flush()


def _drop_alias(session: Session, lineage: Lineage, alias: str) -> None:
    row = session.get(Alias, (lineage.id, alias))
    if row is not None:
        session.delete(row)
        session.flush()


def _move_alias(session: Session, lineage: Lineage, alias: str, target: AdapterVersion, *,
                actor: str, action: str) -> None:
    current = _alias_target(session, lineage, alias)
    if current is target:
        return
    _point(session, lineage, alias, target)
    detail: dict[str, Any] = {
        "alias": alias, "action": action,
        "from": version_label(lineage.name, current.version) if current else None,
        "to": version_label(lineage.name, target.version),
        "from_id": str(current.id) if current else None, "to_id": str(target.id),
    }
    if alias == LIVE:
        if current is not None and current.status is VersionStatus.ready:
            current.status = VersionStatus.superseded
        # The live version reads `ready` again, also when an older one comes back.
        target.status = VersionStatus.ready
        if _alias_target(session, lineage, CANDIDATE) is target:
            _drop_alias(session, lineage, CANDIDATE)
            detail["candidate_cleared"] = True
    audit.record(session, actor=actor, action="alias.moved", subject_type="lineage",
                 subject_id=lineage.id, detail=detail)
    if alias == LIVE:
        ticket_states.sync_with_live(session, lineage=lineage, actor=actor,
                                     cause={"action": action, "from": detail["from"],
                                            "to": detail["to"]})
