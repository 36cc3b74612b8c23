"""Shared test setup: environment, real-part fixtures, and the `db` fixture on both backends.

Use the database on both backends with
    @pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
    def test_x(db): ...
(`db` alone means SQLite). PostgreSQL cases are marked `postgres` automatically, so
`-m "not postgres"` runs without a server.
"""

from __future__ import annotations

import os

# Before anything imports ray: token auth is on by default in Ray 2.5x and tests run a
# throw-away local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import shutil  # noqa: E402
import sqlite3  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy import Engine  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from tests.fixtures.postgres import *  # noqa: E402,F401,F403
from tests.fixtures.s3 import s3_server  # noqa: E402,F401
from tests.fixtures.workers import (  # noqa: E402,F401
    bundled_model,
    ray_cluster,
    taught_model_dir,
    tiny_model_dir,
)

BACKENDS = ("sqlite", "postgresql")


@dataclass
class Database:
    """A migrated, empty database for one test."""

    backend: str  # "sqlite" or "postgresql"
    url: str
    engine: Engine
    sessions: sessionmaker[Session]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, made once; each test copies it (faster than migrating)."""
    from storage.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    # Fold the WAL into the main file so that copying the main file copies everything.
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
    return path


@pytest.fixture
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A freshly migrated database: SQLite file in tmp_path, or the test PostgreSQL server."""
    from storage.db import make_engine, make_session_factory

    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        path = tmp_path / "oblivio.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    elif backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        raise ValueError(f"unknown db backend {backend!r}; use one of {BACKENDS}")
    engine = make_engine(url)
    try:
        yield Database(backend=backend, url=url, engine=engine,
                       sessions=make_session_factory(engine))
    finally:
        engine.dispose()


@pytest.fixture
def db_url(db: Database) -> str:
    """The URL of the `db` fixture's database (for code that makes its own engine)."""
    return db.url


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml, whose hash is bootstrap.sh's install stamp.
    config.addinivalue_line("markers", "tour: the README's quick tour, walked by "
                                       "tests/test_quick_tour.py (make test-tour)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("db") == "postgresql":
            item.add_marker(pytest.mark.postgres)
