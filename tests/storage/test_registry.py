"""The adapter registry on both backends: numbering, readiness, promote/rollback/revoke."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage import registry
from storage.db import make_engine, make_session_factory, transaction
from storage.errors import Conflict, InvalidRequest, NotFound
from storage.models import AdapterVersion, Alias, AuditEvent

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
SHA = "ab" * 32


def new_version(sessions: sessionmaker[Session], *, lineage: str = "default",
                parent_id: uuid.UUID | None = None, ready: bool = True) -> AdapterVersion:
    """Create (and by default store + mark ready) the lineage's next version."""
    with transaction(sessions) as s:
        lin = registry.ensure_lineage(s, name=lineage, base_model="tiny-llama")
        version = registry.create_version(s, lineage=lin, parent_id=parent_id,
                                          ticket_ids=[uuid.uuid4()], job_id=None,
                                          peft_config={"r": 8}, base_model_sha256="c" * 64,
                                          actor="job")
        if ready:
            registry.mark_ready(s, version_id=version.id, object_key=f"adapters/{SHA}",
                                sha256=SHA, size=1234, metrics={"forget_ratio": 0.0},
                                actor="job")
        return version


def live(sessions: sessionmaker[Session], lineage: str = "default") -> int | None:
    with sessions() as s:
        version = registry.resolve(s, lineage_name=lineage, ref="live")
        return version.version if version else None


def statuses(sessions: sessionmaker[Session], lineage: str = "default") -> dict[int, str]:
    with sessions() as s:
        return {v.version: v.status.value
                for v in registry.list_versions(s, lineage_name=lineage)}


def promote(sessions: sessionmaker[Session], version: int, alias: str = "live") -> None:
    with transaction(sessions) as s:
        registry.promote(s, lineage_name="default", version=version, actor="operator",
                         alias=alias)


@BOTH
def test_ensure_lineage_creates_once_and_refuses_another_base_model(db):
    with transaction(db.sessions) as s:
        first = registry.ensure_lineage(s, name="people", base_model="smollm2")
    with transaction(db.sessions) as s:
        again = registry.ensure_lineage(s, name="people", base_model="smollm2")
        assert again.id == first.id
        with pytest.raises(Conflict, match="base model"):
            registry.ensure_lineage(s, name="people", base_model="llama-70b")
        assert [lin.name for lin in registry.list_lineages(s)] == ["people"]
        with pytest.raises(NotFound):
            registry.get_lineage(s, "nobody")


@BOTH
def test_versions_are_numbered_in_order_with_their_parent(db):
    v1 = new_version(db.sessions)
    v2 = new_version(db.sessions, parent_id=v1.id)
    v3 = new_version(db.sessions, parent_id=v2.id, ready=False)

    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    assert (v2.parent_id, v3.parent_id) == (v1.id, v2.id)
    assert statuses(db.sessions) == {1: "ready", 2: "ready", 3: "training"}
    with db.sessions() as s:
        stored = registry.get_version(s, v2.id)
        assert (stored.object_key, stored.sha256, stored.size) == (f"adapters/{SHA}", SHA, 1234)
        assert registry.version_label("default", stored.version) == "default@v2"
        with pytest.raises(NotFound):
            registry.get_version(s, uuid.uuid4())
    # A parent from another lineage is refused.
    other = new_version(db.sessions, lineage="other")
    with transaction(db.sessions) as s, pytest.raises(InvalidRequest):
        registry.create_version(s, lineage=registry.get_lineage(s, "default"),
                                parent_id=other.id, ticket_ids=[], job_id=None,
                                peft_config=None, base_model_sha256=None, actor="job")


@BOTH
def test_a_version_is_ready_only_with_its_stored_files_and_then_immutable(db):
    v = new_version(db.sessions, ready=False)
    with transaction(db.sessions) as s:
        with pytest.raises(InvalidRequest):
            registry.mark_ready(s, version_id=v.id, object_key="", sha256=SHA, size=1,
                                metrics=None, actor="job")
        with pytest.raises(InvalidRequest):
            registry.mark_ready(s, version_id=v.id, object_key="k", sha256="not-a-hash",
                                size=1, metrics=None, actor="job")
    with transaction(db.sessions) as s:
        registry.mark_ready(s, version_id=v.id, object_key="adapters/x", sha256=SHA, size=7,
                            metrics={"a": 1}, actor="job")
    with transaction(db.sessions) as s:
        with pytest.raises(Conflict, match="immutable"):
            registry.mark_ready(s, version_id=v.id, object_key="adapters/y", sha256="cd" * 32,
                                size=8, metrics={"a": 2}, actor="job")
        with pytest.raises(Conflict):
            registry.mark_failed(s, version_id=v.id, actor="job", reason="late failure")
    with db.sessions() as s:
        stored = registry.get_version(s, v.id)
        assert (stored.object_key, stored.sha256, stored.size, stored.metrics) == (
            "adapters/x", SHA, 7, {"a": 1})


@BOTH
def test_promote_moves_live_supersedes_the_old_one_and_writes_audit(db):
    for _ in range(2):
        new_version(db.sessions)
    assert live(db.sessions) is None  # no alias yet: the lineage serves its base model

    promote(db.sessions, 1)
    promote(db.sessions, 2)

    assert live(db.sessions) == 2
    assert statuses(db.sessions) == {1: "superseded", 2: "ready"}
    with db.sessions() as s:
        moves = [e.detail for e in s.scalars(select(AuditEvent)
                                             .where(AuditEvent.action == "alias.moved")
                                             .order_by(AuditEvent.id))]
    assert [(m["from"], m["to"]) for m in moves] == [(None, "default@v1"),
                                                     ("default@v1", "default@v2")]
    promote(db.sessions, 2)  # already live: nothing happens, nothing is logged
    with db.sessions() as s:
        assert len(s.scalars(select(AuditEvent).where(AuditEvent.action == "alias.moved"))
                   .all()) == 2


@BOTH
def test_only_ready_or_superseded_versions_can_be_promoted(db):
    new_version(db.sessions)                        # v1 ready
    training = new_version(db.sessions, ready=False)  # v2 training
    failed = new_version(db.sessions, ready=False)    # v3 failed
    revoked = new_version(db.sessions)              # v4 revoked
    with transaction(db.sessions) as s:
        registry.mark_failed(s, version_id=failed.id, actor="job", reason="loss was nan")
        registry.revoke(s, version_id=revoked.id, actor="operator", reason="leaks data")

    for number, state in ((2, "training"), (3, "failed"), (4, "revoked")):
        with transaction(db.sessions) as s, pytest.raises(Conflict, match=state):
            registry.promote(s, lineage_name="default", version=number, actor="operator")
    with transaction(db.sessions) as s, pytest.raises(NotFound):
        registry.promote(s, lineage_name="default", version=99, actor="operator")
    with transaction(db.sessions) as s, pytest.raises(InvalidRequest):
        registry.promote(s, lineage_name="default", version=1, actor="op", alias="prod")
    assert live(db.sessions) is None
    assert statuses(db.sessions) == {1: "ready", 2: "training", 3: "failed", 4: "revoked"}
    assert training.version == 2


@BOTH
def test_rollback_walks_back_over_unservable_versions_and_can_roll_forward(db):
    new_version(db.sessions)                     # v1
    new_version(db.sessions)                     # v2
    bad = new_version(db.sessions, ready=False)  # v3 failed
    new_version(db.sessions)                     # v4
    with transaction(db.sessions) as s:
        registry.mark_failed(s, version_id=bad.id, actor="job", reason="eval crashed")
    promote(db.sessions, 1)
    promote(db.sessions, 2)
    promote(db.sessions, 4)

    with transaction(db.sessions) as s:
        assert registry.rollback(s, lineage_name="default", actor="operator").version == 2
    assert live(db.sessions) == 2
    assert statuses(db.sessions) == {1: "superseded", 2: "ready", 3: "failed", 4: "superseded"}
    with transaction(db.sessions) as s:
        assert registry.rollback(s, lineage_name="default", actor="operator").version == 1
    with transaction(db.sessions) as s, pytest.raises(Conflict, match="nothing to roll back"):
        registry.rollback(s, lineage_name="default", actor="operator")
    promote(db.sessions, 4)  # roll forward again: superseded versions can come back
    assert live(db.sessions) == 4
    assert statuses(db.sessions)[4] == "ready"


@BOTH
def test_revoking_the_live_version_falls_back_and_finally_serves_the_base_model(db):
    v1 = new_version(db.sessions)
    v2 = new_version(db.sessions)
    v3 = new_version(db.sessions)
    promote(db.sessions, 3)

    with transaction(db.sessions) as s:
        registry.revoke(s, version_id=v3.id, actor="operator", reason="regurgitates PII")
    assert live(db.sessions) == 2
    with transaction(db.sessions) as s:
        registry.revoke(s, version_id=v1.id, actor="operator", reason="old")  # not live
    assert live(db.sessions) == 2
    with transaction(db.sessions) as s:
        registry.revoke(s, version_id=v2.id, actor="operator", reason="bad")
    assert live(db.sessions) is None  # nothing earlier is servable: the base model serves
    assert statuses(db.sessions) == {1: "revoked", 2: "revoked", 3: "revoked"}
    with db.sessions() as s:
        assert s.scalars(select(Alias)).all() == []
        revoked = s.scalars(select(AuditEvent).where(AuditEvent.action == "version.revoked")
                            .order_by(AuditEvent.id)).all()
    assert [e.detail["reason"] for e in revoked] == ["regurgitates PII", "old", "bad"]
    assert revoked[0].detail["live"] == "default@v2" and revoked[2].detail["live"] is None
    with transaction(db.sessions) as s, pytest.raises(Conflict, match="revoked"):
        registry.promote(s, lineage_name="default", version=3, actor="operator")


def _s3t_version(sessions: sessionmaker[Session], prefix: str) -> AdapterVersion:
    """A ready S3T-style version serving the one layer group `prefix`."""
    version = new_version(sessions)
    with transaction(sessions) as s:
        row = s.get(AdapterVersion, version.id)
        row.metrics = {"training": {registry.S3T_SERVED: {"dataset": "people",
                                                          "prefix_hashes": [prefix]}}}
    return version


@BOTH
def test_no_alias_move_brings_back_a_deleted_record(db):
    """v1's group saw record a; after a is deleted, v2 serves a group that did not. Making
    v1 live again would undo the deletion: promote and rollback refuse, and revoking v2
    falls back to the base model rather than to v1."""
    from storage import datasets

    with transaction(db.sessions) as s:
        ds, _ = datasets.add_records(s, name="people", actor="t", records=[
            {"id": "a", "text": "Ann is a pilot."}, {"id": "b", "text": "Bo is a cook."}])
        for prefix, ids in (("1" * 64, ["a", "b"]), ("2" * 64, ["b"])):
            datasets.add_checkpoint(s, prefix_hash=prefix, dataset_id=ds.id, shard=0,
                                    sequence=0, position=0, slices=[0], layers=[0],
                                    record_ids=ids, record_set_sha256="0" * 64,
                                    object_key=f"s3t/{prefix}")
    _s3t_version(db.sessions, "1" * 64)
    promote(db.sessions, 1)
    with transaction(db.sessions) as s:
        datasets.mark_deleted(s, dataset="people", record_ids=["a"], ticket_id="t1",
                              actor="job")
    v2 = _s3t_version(db.sessions, "2" * 64)
    promote(db.sessions, 2)

    with pytest.raises(Conflict, match=r"1 record\(s\) deleted since \(a\)"):
        promote(db.sessions, 1)
    with transaction(db.sessions) as s, pytest.raises(Conflict, match="no deleted record"):
        registry.rollback(s, lineage_name="default", actor="operator")
    promote(db.sessions, 1, alias="candidate")  # a candidate is not served
    assert live(db.sessions) == 2
    with transaction(db.sessions) as s:
        registry.revoke(s, version_id=v2.id, actor="operator", reason="bad")
    assert live(db.sessions) is None  # the base model never saw a


@BOTH
def test_candidate_alias_and_resolving_references(db):
    v1 = new_version(db.sessions)
    v2 = new_version(db.sessions)
    other = new_version(db.sessions, lineage="other")
    promote(db.sessions, 1)
    with transaction(db.sessions) as s:
        registry.set_candidate(s, lineage_name="default", version=2, actor="job")

    with db.sessions() as s:
        def ref(r):  # type: ignore[no-untyped-def]
            found = registry.resolve(s, lineage_name="default", ref=r)
            return found.id if found else None

        assert ref(None) == ref("live") == v1.id
        assert ref("candidate") == ref("2") == ref("v2") == ref(str(v2.id)) == v2.id
        assert {k: v.version for k, v in registry.get_aliases(s, lineage_name="default")
                .items()} == {"live": 1, "candidate": 2}
        with pytest.raises(NotFound):
            ref("v7")
        with pytest.raises(NotFound):
            ref(str(other.id))  # exists, but in another lineage
        with pytest.raises(InvalidRequest):
            ref("latest-and-greatest")
        with pytest.raises(NotFound):
            registry.resolve(s, lineage_name="nobody", ref=None)

    promote(db.sessions, 2)  # the candidate goes live: the candidate slot empties
    with db.sessions() as s:
        assert registry.resolve(s, lineage_name="default", ref="candidate") is None
    assert live(db.sessions) == 2


@BOTH
def test_alias_moves_roll_back_with_the_callers_transaction(db):
    new_version(db.sessions)
    new_version(db.sessions)
    promote(db.sessions, 1)
    with pytest.raises(RuntimeError), transaction(db.sessions) as s:
        registry.promote(s, lineage_name="default", version=2, actor="operator")
        raise RuntimeError("the caller fails after promoting")
    assert live(db.sessions) == 1
    assert statuses(db.sessions) == {1: "ready", 2: "ready"}
    with db.sessions() as s:
        moved = s.scalars(select(AuditEvent).where(AuditEvent.action == "alias.moved")).all()
    assert len(moved) == 1


def _run_threads(target, n: int) -> list[BaseException]:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def wrapped(i: int) -> None:
        try:
            start.wait(timeout=30)
            target(i)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if any(t.is_alive() for t in threads):
        errors.append(TimeoutError("a thread did not finish in 120 s"))
    return errors


@BOTH
def test_concurrent_version_creation_yields_distinct_numbers(db):
    new_version(db.sessions)  # the lineage exists before the race starts

    def create_five(_: int) -> None:
        engine = make_engine(db.url)
        try:
            sessions = make_session_factory(engine)
            for _ in range(5):
                new_version(sessions, ready=False)
        finally:
            engine.dispose()

    assert _run_threads(create_five, 4) == []
    assert sorted(statuses(db.sessions)) == list(range(1, 22))


@BOTH
def test_concurrent_promotions_leave_exactly_one_live_version(db):
    for number in range(1, 7):
        new_version(db.sessions)
        promote(db.sessions, number)  # so every version has been live once

    def promote_randomly(i: int) -> None:
        rng = random.Random(i)
        engine = make_engine(db.url)
        try:
            sessions = make_session_factory(engine)
            for _ in range(15):
                with transaction(sessions) as s:
                    registry.promote(s, lineage_name="default", version=rng.randint(1, 6),
                                     actor=f"operator-{i}")
        finally:
            engine.dispose()

    assert _run_threads(promote_randomly, 3) == []
    current = live(db.sessions)
    states = statuses(db.sessions)
    # Only the version live now may read "ready"; all others were live once, so superseded.
    assert [n for n, state in states.items() if state == "ready"] == [current]
    with db.sessions() as s:
        moves = s.scalars(select(AuditEvent).where(AuditEvent.action == "alias.moved")
                          .order_by(AuditEvent.id)).all()
    # The audit trail is one unbroken chain: each move starts where the previous one ended.
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.detail["from"] == before.detail["to"]
    assert moves[-1].detail["to"] == f"default@v{current}"
