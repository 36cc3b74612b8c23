"""Fixtures for the integration tests: a migrated DB, a store, a tiny base model, Ray."""

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
from tests.fixtures.taught import taught_qa


@dataclass
class Flow:
    settings: Settings
    sessions: sessionmaker[Session]

    def submit(self, *, key: str, qa: list[dict[str, str]] | None = None,
               engine: str = "idk", texts: list[str] | None = None) -> uuid.UUID:
        """A forget ticket; by default for the first four facts the taught model knows."""
        qa = taught_qa(0, 4) if qa is None else qa
        with transaction(self.sessions) as s:
            request = tickets.TicketRequest(
                kind=TicketKind.forget, lineage="default", engine=engine, target="Zorblat",
                payload={"target": "Zorblat", "forget": {"texts": texts or [], "qa": qa},
                         "retain": None})
            return tickets.submit(s, request=request, requester="test",
                                  idempotency_key=key).id


# The job recipe for the taught tiny model: strong enough that refusals replace its taught
# answers within 20-40 steps, with the product's early stopping on the ticket's questions; a
# heavy retain term, because a 64-wide model's answers all share the few weights a LoRA
# moves (measured in process: forget 0.00 of base on held-out forms, utility 0.93-1.00).
TAUGHT_RECIPE = {"max_steps": 40, "eval_every": 5, "min_steps": 20, "lr": 5e-3,
                 "retain_weight": 50.0, "retain_prompts": 24, "retain_max_new_tokens": 8}


def _settings(tmp_path: Path, base_model: Path, **values: object) -> Settings:
    defaults: dict[str, object] = {
        "data_dir": tmp_path / "data", "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "object_store": f"file://{tmp_path / 'objects'}", "base_model": str(base_model),
        "num_workers": 2, "zero_stage": 2, "batch_window_seconds": 0.0, "lease_seconds": 120,
        "retry_backoff_seconds": 1.0,
        "recipe": {"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                   "retain_max_new_tokens": 8}}
    return Settings(**{**defaults, **values})


def _open_flow(settings: Settings) -> tuple[Flow, object]:
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=settings.base_model)
    return Flow(settings, sessions), engine


@pytest.fixture
def flow(request: pytest.FixtureRequest, tmp_path: Path, taught_model_dir: Path,
         ray_cluster) -> Flow:
    """The production combination: PostgreSQL + the S3 server, and a base model that knows
    its probes (tests/fixtures/taught.py), so evaluations and promotions are real."""
    server = request.getfixturevalue("s3_server")
    settings = _settings(
        tmp_path, taught_model_dir, database_url=request.getfixturevalue("postgres_url"),
        object_store=server.url(f"flow-{uuid.uuid4().hex[:12]}"),
        s3_endpoint_url=server.endpoint_url, s3_access_key_id=server.access_key_id,
        s3_secret_access_key=server.secret_access_key, s3_region=server.region,
        recipe=dict(TAUGHT_RECIPE))
    flow, engine = _open_flow(settings)
    try:
        yield flow
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_flow(tmp_path: Path, tiny_model_dir: Path, ray_cluster) -> Flow:
    """The embedded defaults (SQLite + a local store) on the random-weight tiny model: for
    tests about the job machinery, not about what the model learns."""
    flow, engine = _open_flow(_settings(tmp_path, tiny_model_dir))
    try:
        yield flow
    finally:
        engine.dispose()
