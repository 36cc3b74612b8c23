"""API test setup: a real app (create_app) on the `db` fixture's database, real tokens."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction

ROLES = ("submitter", "operator", "admin")


@dataclass
class Api:
    """A running app (TestClient), its settings, and one token secret per role."""

    client: TestClient
    settings: Settings
    db: object  # tests.conftest.Database
    secrets: dict[str, str]

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[role]}"}

    def new_token(self, role: str, name: str) -> str:
        with transaction(self.db.sessions) as session:
            _token, secret = tokens.create_token(session, role=role, name=name)
        return secret


def make_settings(tmp_path: Path, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "object_store": f"file://{tmp_path / 'objects'}",
        "base_model": "tiny-test-model",
    }
    values.update(overrides)
    return Settings(**values)


def start_api(db: object, settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    with TestClient(app) as client:  # runs the lifespan: migrations, default lineage
        secrets = {}
        with transaction(db.sessions) as session:
            for role in ROLES:
                secrets[role] = tokens.create_token(session, role=role, name=f"test-{role}")[1]
        yield Api(client=client, settings=settings, db=db, secrets=secrets)


@pytest.fixture
def api(db: object, tmp_path: Path) -> Iterator[Api]:
    yield from start_api(db, make_settings(tmp_path, db.url))


def free_socket() -> socket.socket:
    """A listening-ready socket on a free loopback port (no race for the port number)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    api: Api


@pytest.fixture
def live_server(api: Api) -> Iterator[LiveServer]:
    """The same app served by a real uvicorn on 127.0.0.1 (for the CLI and HTTP clients)."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api.client.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", api=api)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
