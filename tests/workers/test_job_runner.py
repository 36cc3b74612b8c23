"""The job runner's decisions and failure paths, with a stand-in engine (no Ray, no training).

The engine is the plug-in seam (workers/engines/base.py): this one writes a small version
directory and returns the evaluation the test asks for, so each case is decided by the
job runner's own code, on a real SQLite database and a real local object store. What the
real engines train is tests/integration's and tests/workers/test_engines.py's business.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service.settings import Settings
from storage import registry, tickets
from storage.db import make_engine, make_session_factory, transaction
from storage.objectstore import StoreUnavailable
from storage.migrate import upgrade
from storage.models import (
    AdapterVersion,
    Job,
    JobStatus,
    Lineage,
    Ticket,
    TicketKind,
    TicketStatus,
    VersionStatus,
)

ENGINE = "fake_test_engine"


class FakeServable:
    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
        return ["" for _ in prompts]


@dataclass
class FakeEngine:
    """An engine whose training and evaluation outcome each test sets."""

    name: str = ENGINE
    ticket_kinds: frozenset[str] = frozenset({"forget", "revoke"})
    metrics: dict[str, Any] = field(default_factory=lambda: {"verdict": "pass"})
    during_training: Callable[[Any, Callable[[dict[str, Any]], None]], None] | None = None
    trained: list[list[str]] = field(default_factory=list)

    def validate(self, request: Any) -> None:
        return None

    def train(self, job: Any, progress: Callable[[dict[str, Any]], None]) -> Any:
        from workers.engines.base import Artifacts

        self.trained.append(list(job.ticket_ids))
        progress({"phase": "training", "step": 1, "max_steps": 1})
        if self.during_training is not None:
            self.during_training(job, progress)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "weights.bin").write_bytes(uuid.uuid4().bytes)  # a new version
        return Artifacts(version_dir=job.output_dir, metrics={"steps": 1},
                         withdrawn=[r.revokes for r in job.requests if r.kind == "revoke"])

    def load_servable(self, version_dir: Path | None, **_kw: Any) -> FakeServable:
        return FakeServable()

    def evaluate(self, job: Any, *, before: Any, after: Any) -> dict[str, Any]:
        return dict(self.metrics)


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    from workers.engines.registry import get_engine, register_engine

    try:
        engine = get_engine(ENGINE)
    except Exception:
        engine = register_engine(FakeEngine())
    return engine


@dataclass
class Runner:
    settings: Settings
    sessions: Any
    engine: FakeEngine

    def submit(self, key: str, lineage: str = "default") -> uuid.UUID:
        with transaction(self.sessions) as s:
            request = tickets.TicketRequest(
                kind=TicketKind.forget, lineage=lineage, engine=ENGINE, target="Zorblat",
                payload={"target": "Zorblat", "retain": None,
                         "forget": {"texts": [], "qa": [{"question": "Where does Zorblat "
                                                                     "live?",
                                                         "answer": "Quimby."}]}})
            return tickets.submit(s, request=request, requester="test",
                                  idempotency_key=key).id

    def loop(self, **changes: Any) -> Any:
        from workers.dispatcher import DispatcherLoop

        return DispatcherLoop(self.settings.model_copy(update=changes).worker_config(),
                              poll_seconds=0.05)

    def ticket(self, ticket_id: uuid.UUID) -> Ticket:
        with self.sessions() as s:
            ticket = s.get_one(Ticket, ticket_id)
            s.expunge(ticket)
            return ticket

    def versions(self, lineage: str = "default") -> list[AdapterVersion]:
        with self.sessions() as s:
            found = registry.list_versions(s, lineage_name=lineage)
            s.expunge_all()
            return found


@pytest.fixture
def runner(tmp_path: Path, tiny_model_dir: Path, fake_engine: FakeEngine) -> Runner:
    settings = Settings(data_dir=tmp_path / "data",
                        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        object_store=f"file://{tmp_path / 'objects'}",
                        base_model=str(tiny_model_dir), batch_window_seconds=0.0,
                        lease_seconds=60, max_attempts=2,
                        # The stand-in engine trains nothing: no warm Ray ranks to start.
                        trainer="plain")
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as s:
        for name in ("default", "other"):
            registry.ensure_lineage(s, name=name, base_model=settings.base_model)
    fake_engine.metrics = {"verdict": "pass"}
    fake_engine.during_training = None
    fake_engine.trained.clear()
    try:
        yield Runner(settings, sessions, fake_engine)
    finally:
        engine.dispose()


def test_the_verdict_and_auto_promote_decide_where_the_version_goes(runner: Runner) -> None:
    """pass -> live; pass without auto_promote and hold -> candidate; reject -> not kept."""
    cases = [  # (verdict, auto_promote, version status, aliases it gets, ticket status)
        ("pass", True, VersionStatus.ready, {"live"}, TicketStatus.done),
        ("pass", False, VersionStatus.ready, {"candidate"}, TicketStatus.awaiting_review),
        ("hold", True, VersionStatus.ready, {"candidate"}, TicketStatus.awaiting_review),
        ("reject", True, VersionStatus.failed, set(), TicketStatus.rejected),
    ]
    for n, (verdict, auto_promote, status, aliases, ticket_status) in enumerate(cases, 1):
        runner.engine.metrics = {"verdict": verdict, "verdict_reason": f"the test said {verdict}",
                                 "forget_ratio": 0.1, "utility_ratio": 0.95}
        ticket_id = runner.submit(f"verdict-{n}")
        assert runner.loop(auto_promote=auto_promote).run_once() == 1
        version = runner.versions()[-1]
        with runner.sessions() as s:
            held = {name for name, v in registry.get_aliases(s, lineage_name="default").items()
                    if v.id == version.id}
        ticket = runner.ticket(ticket_id)
        case = (verdict, auto_promote)
        assert (version.version, version.status, held) == (n, status, aliases), case
        assert ticket.status == ticket_status, (case, ticket.status, ticket.error)
        assert version.metrics["verdict"] == verdict, case
        if verdict == "reject":
            assert "the test said reject" in ticket.error
        else:
            assert ticket.result_version_id == version.id
    # The live version is still the one that passed with auto_promote on.
    with runner.sessions() as s:
        assert registry.resolve(s, lineage_name="default", ref="live").version == 1


def test_a_revocation_reopens_just_the_revoked_ticket_until_live_moves_back(runner: Runner
                                                                          ) -> None:
    """A revoke ticket's version withdraws one done ticket: that ticket is reopened (live
    no longer contains its forgetting), the others stay done; rolling live back to before
    the revocation makes it done again, promoting the revocation reopens it again."""
    from storage.errors import Conflict

    kept, revoked = runner.submit("kept"), runner.submit("revoked")
    assert runner.loop().run_once() == 1 and runner.loop().run_once() == 1
    with transaction(runner.sessions) as s:
        revoke_id = tickets.submit_revoke(s, ticket_id=revoked, reason="filed in error",
                                          actor="op").id
    with transaction(runner.sessions) as s, pytest.raises(Conflict, match="pending"):
        tickets.submit_revoke(s, ticket_id=revoked, reason="twice", actor="op")
    with transaction(runner.sessions) as s, pytest.raises(Conflict, match="only forget"):
        tickets.submit_revoke(s, ticket_id=revoke_id, reason="a revoke ticket", actor="op")
    assert runner.loop().run_once() == 1
    v3 = runner.versions()[-1]
    assert (v3.version, v3.status, v3.metrics["withdrawn_tickets"]) == \
        (3, VersionStatus.ready, [str(revoked)])
    assert v3.parent_id == runner.versions()[1].id
    assert runner.ticket(revoke_id).status == TicketStatus.done
    assert runner.ticket(kept).status == TicketStatus.done
    gone = runner.ticket(revoked)
    assert gone.status == TicketStatus.reopened and "revoked" in gone.error, gone.error
    with transaction(runner.sessions) as s:
        events = [e["event"] for e in tickets.timeline(s, s.get_one(Ticket, revoked))]
    assert events[-2:] == ["revoke_requested", "reopened"], events
    with transaction(runner.sessions) as s, pytest.raises(Conflict, match="reopened"):
        tickets.submit_revoke(s, ticket_id=revoked, reason="again", actor="op")

    with transaction(runner.sessions) as s:
        registry.rollback(s, lineage_name="default", actor="op")
    assert runner.ticket(revoked).status == TicketStatus.done
    with transaction(runner.sessions) as s:
        registry.promote(s, lineage_name="default", version=3, actor="op")
    assert runner.ticket(revoked).status == TicketStatus.reopened
    assert runner.ticket(kept).status == TicketStatus.done


def test_a_lost_lease_stops_the_job_without_writing_over_the_new_owner(runner: Runner) -> None:
    from workers.job_runner import LeaseLost

    ticket_id = runner.submit("lease")

    def steal(job: Any, progress: Callable[[dict[str, Any]], None]) -> None:
        with runner.sessions.begin() as s:  # another dispatcher took the ticket over
            s.execute(update(Ticket).where(Ticket.id == ticket_id).values(
                lease_owner="dispatcher:thief"))
        time.sleep(1.5)  # the lease keeper renews every second at this lease length
        progress({"phase": "training", "step": 2})

    runner.engine.during_training = steal
    loop = runner.loop(lease_seconds=1.5)
    from storage import queue
    from workers.job_runner import JobContext, run_job

    claimed = queue.claim(loop.sessions, owner=loop.owner, lease_seconds=1.5, max_attempts=2,
                          engines=(ENGINE,))
    ctx = JobContext(config=loop.config, sessions=loop.sessions, store=loop.store,
                     owner=loop.owner)
    with pytest.raises(LeaseLost):
        run_job(ctx, claimed)
    ticket = runner.ticket(ticket_id)
    assert (ticket.status, ticket.lease_owner, ticket.attempts) == (
        TicketStatus.running, "dispatcher:thief", 1)
    assert ticket.error is None and ticket.result_version_id is None
    with runner.sessions() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.failed and "lease lost" in job.error
    assert all(v.status is not VersionStatus.ready for v in runner.versions())


def test_a_base_model_that_changed_under_a_lineage_is_refused(runner: Runner) -> None:
    with runner.sessions.begin() as s:
        s.execute(update(Lineage).where(Lineage.name == "default").values(
            base_model_sha256="ab" * 32))
    ticket_id = runner.submit("hash")
    assert runner.loop().run_once() == 1
    ticket = runner.ticket(ticket_id)
    assert "refusing to mix" in (ticket.error or ""), ticket.error
    assert ticket.status in (TicketStatus.queued, TicketStatus.failed)
    assert runner.engine.trained == []  # nothing was trained on the wrong weights
    assert runner.versions() == []


class FailingUploads:
    """The object store, except that storing a version fails (S3 down mid-job)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def put_directory_content_addressed(self, *_a: Any, **_kw: Any) -> Any:
        raise StoreUnavailable("object store unavailable: connection refused")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_failed_upload_fails_the_version_and_the_last_attempt_gives_up(runner: Runner
                                                                         ) -> None:
    ticket_id = runner.submit("upload")
    loop = runner.loop(max_attempts=2)
    loop.store = FailingUploads(loop.store)
    assert loop.run_once() == 1
    ticket = runner.ticket(ticket_id)
    assert ticket.status == TicketStatus.queued and ticket.attempts == 1  # retried later
    assert "unavailable" in ticket.error
    (first,) = runner.versions()
    assert first.status == VersionStatus.failed and "unavailable" in first.metrics["error"]

    with runner.sessions.begin() as s:  # skip any retry back-off: the next claim is now
        s.execute(update(Ticket).where(Ticket.id == ticket_id).values(not_before=None))
    assert loop.run_once() == 1
    ticket = runner.ticket(ticket_id)
    # The job's own max_attempts (2), not the process's settings, decides: it gives up.
    assert ticket.status == TicketStatus.failed and ticket.attempts == 2
    assert "gave up after 2 attempt(s)" in ticket.error
    assert [v.status for v in runner.versions()] == [VersionStatus.failed] * 2
    with runner.sessions() as s:
        assert registry.resolve(s, lineage_name="default", ref="live") is None


def test_run_forever_batches_a_lineage_s_tickets_into_one_job_until_stopped(runner: Runner
                                                                            ) -> None:
    a, b = runner.submit("batch-a"), runner.submit("batch-b")
    elsewhere = runner.submit("batch-other", lineage="other")
    loop = runner.loop(batch_window_seconds=0.5)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                runner.ticket(t).status == TicketStatus.done for t in (a, b, elsewhere)):
            time.sleep(0.1)
    finally:
        loop.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()  # stop() ends the loop
    tickets_ = [runner.ticket(t) for t in (a, b, elsewhere)]
    assert [t.status for t in tickets_] == [TicketStatus.done] * 3
    # a and b (one lineage, one engine) were one job and one version; the other lineage's
    # ticket its own.
    assert tickets_[0].job_id == tickets_[1].job_id != tickets_[2].job_id
    assert tickets_[0].result_version_id == tickets_[1].result_version_id
    assert sorted(map(sorted, runner.engine.trained)) == sorted(
        [sorted([str(a), str(b)]), [str(elsewhere)]])
    assert loop.jobs_run == 2
