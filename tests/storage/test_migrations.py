"""Alembic owns the schema: upgrade builds it from nothing, twice is harmless, models match."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from storage.db import make_engine
from storage.migrate import MIGRATIONS_DIR, alembic_config, current_revision, upgrade
from storage.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A database with no tables at all."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def test_upgrade_builds_the_whole_schema_idempotently_and_matches_the_models(empty_db_url):
    head = ScriptDirectory.from_config(alembic_config(empty_db_url)).get_current_head()
    assert MIGRATIONS_DIR.is_dir() and head is not None
    assert current_revision(empty_db_url) is None

    upgrade(empty_db_url)
    upgrade(empty_db_url)  # a second run (every service start does it) changes nothing

    assert current_revision(empty_db_url) == head
    engine = make_engine(empty_db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == [], f"models and migrations disagree: {diffs}"
        claim_index = {i["name"]: i for i in inspect(engine).get_indexes("tickets")}
        assert claim_index["ix_tickets_claim"]["column_names"] == [
            "status", "priority", "created_at"]
    finally:
        engine.dispose()
