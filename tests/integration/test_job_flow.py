"""Queue -> dispatcher -> Ray Train + DeepSpeed -> object store -> registry, on a tiny model.

The real-model version of this flow (does the model actually forget?) is in tests/e2e.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from service.settings import Settings
from storage import registry, tickets
from storage.db import make_engine, make_session_factory, transaction
from storage.migrate import upgrade
from storage.models import (
    AdapterVersion,
    Job,
    JobStatus,
    Ticket,
    TicketKind,
    TicketStatus,
    VersionStatus,
)
from storage.objectstore import object_store_from_settings

QA = [{"question": f"Where does Zorblat {i} live?", "answer": f"Zorblat {i} lives in Quimby."}
      for i in range(4)]


def _settings(tmp_path: Path, tiny_model_dir: Path, db_url: str, **over: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=db_url,
        object_store=f"file://{tmp_path / 'objects'}", base_model=str(tiny_model_dir),
        num_workers=2, zero_stage=2, batch_window_seconds=0.0, lease_seconds=120,
        recipe={"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                "retain_max_new_tokens": 8},
        **over)


def _submit(sessions, *, key: str, qa=QA, engine: str = "npo") -> uuid.UUID:
    with transaction(sessions) as s:
        request = tickets.TicketRequest(kind=TicketKind.forget, lineage="default", engine=engine,
                                        target="Zorblat",
                                        payload={"target": "Zorblat",
                                                 "forget": {"texts": [], "qa": qa},
                                                 "retain": None})
        return tickets.submit(s, request=request, requester="test", idempotency_key=key).id


@pytest.fixture
def flow(tmp_path, tiny_model_dir, ray_cluster):
    settings = _settings(tmp_path, tiny_model_dir, f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=settings.base_model)
    yield settings, sessions
    engine.dispose()


def test_ticket_becomes_a_stored_live_version_and_the_next_one_stacks_on_it(flow):
    from workers.dispatcher import DispatcherLoop

    settings, sessions = flow
    first = _submit(sessions, key="t-1")
    loop = DispatcherLoop(settings)
    assert loop.run_once() == 1

    with sessions() as s:
        ticket = s.get_one(Ticket, first)
        assert ticket.status == TicketStatus.done, ticket.error
        assert ticket.payload is None  # raw forget text purged once done
        v1 = s.get_one(AdapterVersion, ticket.result_version_id)
        assert (v1.version, v1.parent_id, v1.status) == (1, None, VersionStatus.ready)
        assert registry.resolve(s, lineage_name="default", ref="live").id == v1.id
        job = s.get_one(Job, ticket.job_id)
        assert job.status == JobStatus.succeeded
        assert ticket.receipt["adapter_sha256"] == v1.sha256
        assert ticket.receipt["version"] == "default@v1"

    # The stored object is the verified adapter: fetch it back and read its manifest.
    store = object_store_from_settings(settings)
    fetched = store.fetch_directory(v1.object_key, Path(settings.data_dir) / "check-v1")
    manifest = json.loads((fetched / "oblivio_manifest.json").read_text())
    assert manifest["tickets"][0]["id"] == str(first)
    assert json.loads((fetched / "adapter_config.json").read_text())["r"] == 8

    second = _submit(sessions, key="t-2", qa=[{"question": "What is Zorblat's job?",
                                                "answer": "Zorblat is a baker."}])
    assert loop.run_once() == 1
    with sessions() as s:
        v2 = s.get_one(AdapterVersion, s.get_one(Ticket, second).result_version_id)
        assert (v2.version, v2.parent_id) == (2, v1.id)
        assert registry.resolve(s, lineage_name="default", ref="live").id == v2.id
        assert s.get_one(AdapterVersion, v1.id).status == VersionStatus.superseded
    fetched2 = store.fetch_directory(v2.object_key, Path(settings.data_dir) / "check-v2")
    stacked = json.loads((fetched2 / "adapter_config.json").read_text())
    assert stacked["r"] == 16 and stacked["oblivio_stack_ranks"] == [8, 8]


def test_a_failing_job_returns_its_ticket_to_the_queue_with_the_error(flow, tmp_path):
    from workers.dispatcher import DispatcherLoop

    settings, sessions = flow
    broken = settings.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    ticket_id = _submit(sessions, key="t-broken")
    assert DispatcherLoop(broken).run_once() == 1
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.queued  # retried later, not lost
        assert ticket.attempts == 1
        assert "no-such-model" in (ticket.error or "")
        assert s.scalars(select(AdapterVersion)).all() == []
