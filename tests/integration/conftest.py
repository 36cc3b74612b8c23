"""Fixtures for the integration tests: a migrated DB, a tiny base model, a Ray cluster."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from storage import registry, tickets
from storage.db import make_engine, make_session_factory, transaction
from storage.migrate import upgrade
from storage.models import TicketKind
from tests.fixtures.training import FORGET_QA



@dataclass
class Flow:
    settings: Settings
    sessions: sessionmaker[Session]

    def submit(self, *, key: str, qa: list[dict[str, str]] = FORGET_QA, engine: str = "npo",
               texts: list[str] | None = None) -> uuid.UUID:
        with transaction(self.sessions) as s:
            request = tickets.TicketRequest(
                kind=TicketKind.forget, lineage="default", engine=engine, target="Zorblat",
                payload={"target": "Zorblat", "forget": {"texts": texts or [], "qa": qa},
                         "retain": None})
            return tickets.submit(s, request=request, requester="test",
                                  idempotency_key=key).id


@pytest.fixture
def flow(tmp_path: Path, tiny_model_dir: Path, ray_cluster) -> Flow:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        object_store=f"file://{tmp_path / 'objects'}", base_model=str(tiny_model_dir),
        num_workers=2, zero_stage=2, batch_window_seconds=0.0, lease_seconds=120,
        retry_backoff_seconds=1.0,
        recipe={"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                "retain_max_new_tokens": 8})
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=settings.base_model)
    yield Flow(settings, sessions)
    engine.dispose()
