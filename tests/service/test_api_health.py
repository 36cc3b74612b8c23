"""/healthz, /readyz and /metrics, and the API's import path staying light."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import Api, closed_port, make_settings, start_api

TICKET = {"kind": "forget", "forget": {"texts": ["a passage to forget"]}}


def test_healthz_needs_no_token(api: Api) -> None:
    r = api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_is_ready_with_a_reachable_db_and_store(api: Api) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "object_store": "ok", "data_dir": "ok"}


@pytest.fixture
def api_with_dead_s3(db: Any, tmp_path: Path) -> Iterator[Api]:
    settings = make_settings(tmp_path, db.url, object_store="s3://oblivio-test/adapters",
                             s3_endpoint_url=f"http://127.0.0.1:{closed_port()}",
                             s3_access_key_id="test", s3_secret_access_key="test-secret",
                             readyz_timeout_seconds=5.0)
    yield from start_api(db, settings)


def test_readyz_is_503_and_names_the_store_when_s3_is_unreachable(api_with_dead_s3: Api) -> None:
    started = time.monotonic()
    r = api_with_dead_s3.client.get("/readyz")
    assert time.monotonic() - started < 10
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["object_store"] != "ok"
    assert "object_store" in body["message"]
    # The API itself keeps working: readiness is about dependencies, not the process.
    assert api_with_dead_s3.client.get("/healthz").status_code == 200
    assert api_with_dead_s3.client.post("/v1/tickets", json=TICKET,
                                        headers=api_with_dead_s3.headers()).status_code == 202


def test_metrics_count_tickets_by_status_and_requests_by_route(api: Api) -> None:
    ids = [api.client.post("/v1/tickets", json=TICKET, headers=api.headers()).json()["id"]
           for _ in range(3)]
    api.client.post(f"/v1/tickets/{ids[0]}/cancel", headers=api.headers())
    api.client.get("/v1/tickets/not-a-uuid", headers=api.headers())

    r = api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        assert match, f"{pattern} not in /metrics"
        return float(match.group(1))

    assert value(r'oblivio_tickets\{status="queued"\}') == 2
    assert value(r'oblivio_tickets\{status="cancelled"\}') == 1
    assert value(r'oblivio_tickets\{status="done"\}') == 0
    assert value("oblivio_queue_depth") == 2
    assert value(r'oblivio_http_requests_total\{method="POST",route="/v1/tickets",'
                 r'status="202"\}') == 3
    # Route templates, not raw paths: label values stay bounded.
    assert value(r'oblivio_http_requests_total\{method="GET",route="/v1/tickets/\{ticket_id\}",'
                 r'status="422"\}') == 1
    assert "oblivio_claim_latency_seconds_bucket" in text


def test_two_apps_in_one_process_keep_separate_registries(db: Any, tmp_path: Path) -> None:
    first = start_api(db, make_settings(tmp_path / "a", db.url))
    second = start_api(db, make_settings(tmp_path / "b", db.url))
    api_a, api_b = next(first), next(second)
    try:
        api_a.client.get("/healthz")
        assert 'route="/healthz"' in api_a.client.get("/metrics").text
        assert 'route="/healthz"' not in api_b.client.get("/metrics").text
    finally:
        first.close()
        second.close()


def test_the_api_import_path_stays_free_of_heavy_packages() -> None:
    code = ("import sys, service.app, service.cli; "
            "service.app.create_app; "
            "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'boto3', "
            "'botocore', 'peft') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "", f"imported: {out.stdout}"


def test_openapi_documents_the_ticket_body_and_the_bearer_scheme(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/tickets"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["discriminator"]["propertyName"] == "kind"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert api.client.get("/docs").status_code == 200


@pytest.mark.postgres
def test_readyz_is_503_and_names_the_database_when_it_goes_away(
        postgres_server_url: str, fresh_postgres_url: str, tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    from storage.db import make_engine, make_session_factory
    from tests.conftest import Database
    from tests.fixtures.postgres import _admin

    engine = make_engine(fresh_postgres_url)
    db = Database("postgresql", fresh_postgres_url, engine, make_session_factory(engine))
    settings = make_settings(tmp_path, fresh_postgres_url, readyz_timeout_seconds=5.0)
    try:
        for api in start_api(db, settings):
            assert api.client.get("/readyz").status_code == 200
            engine.dispose()
            # The database disappears under the running service (as when its server stops).
            name = make_url(fresh_postgres_url).database
            with _admin(postgres_server_url) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            started = time.monotonic()
            r = api.client.get("/readyz")
            assert time.monotonic() - started < 10
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["checks"]["database"] != "ok"
            assert body["checks"]["object_store"] == "ok"
            assert "database" in body["message"]
            assert api.client.get("/healthz").status_code == 200
    finally:
        engine.dispose()
