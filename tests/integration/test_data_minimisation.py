"""A planted canary in a forget set is nowhere after the job: not in the DB, the object
store, the data dir, the logs, /metrics or any API answer.

The ticket goes through the real API (sealed at submission), the real dispatcher (opened
when claimed), a real training job on the tiny model (the in-process trainer, so that every
log line is captured here) and the real stores: SQLite + local directory, and PostgreSQL
(tables, its data files and WAL) + the S3 server (its backing files).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from service.settings import Settings
from storage.models import Base
from tests.fixtures.operator import approve_held
from tests.service.conftest import start_api


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _hits(needle: bytes, paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if needle in data:
            found.append(str(path))
    return found


def _postgres_files(db: Any) -> list[Path]:
    """The database's own data files plus the server's WAL, where this process can read them
    (the test server runs on this machine; its data directory is found by asking it, or at
    Debian's default place when our role may not ask)."""
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        oid = conn.scalar(text("SELECT oid FROM pg_database WHERE datname = current_database()"))
        try:
            data_dirs = [Path(conn.scalar(text("SHOW data_directory")))]
        except Exception:  # needs pg_read_all_settings
            data_dirs = sorted(Path("/var/lib/postgresql").glob("*/main"))
        try:
            conn.execute(text("CHECKPOINT"))  # flush shared buffers into the data files
        except Exception:  # needs pg_checkpoint; the WAL has every committed row anyway
            pass
    roots = [root for d in data_dirs for root in (d / "base" / str(oid), d / "pg_wal")]
    return [p for root in roots if os.access(root, os.R_OK) for p in _files(root)]


def _table_dump(db: Any) -> str:
    with db.sessions() as s:
        return "\n".join(str(row) for table in Base.metadata.sorted_tables
                         for row in s.execute(text(f'SELECT * FROM "{table.name}"')))


@pytest.mark.parametrize(("db", "store"), [("sqlite", "local"), ("postgresql", "s3")],
                         indirect=["db"])
def test_a_canary_in_the_forget_set_is_gone_after_the_job(
        db: Any, store: str, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from workers.dispatcher import DispatcherLoop

    caplog.set_level(logging.DEBUG)
    canary = f"Canary{uuid.uuid4().hex}"
    # Stored in clear on purpose (the ticket's label): proves the file search reaches rows.
    target = f"Zorblat{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {"object_store": f"file://{tmp_path / 'objects'}"}
    store_root = tmp_path / "objects"
    if store == "s3":
        s3 = request.getfixturevalue("s3_server")
        prefix = f"canary-{uuid.uuid4().hex[:8]}"
        options = {"object_store": s3.url(prefix), "s3_endpoint_url": s3.endpoint_url,
                   "s3_access_key_id": s3.access_key_id,
                   "s3_secret_access_key": s3.secret_access_key}
        store_root = s3.data_dir / s3.bucket / prefix if s3.data_dir else None
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db.url, base_model=str(tiny_model_dir),
        trainer="plain", batch_window_seconds=0.0, lease_seconds=120,
        recipe={"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                "retain_max_new_tokens": 8}, **options)
    body = {"kind": "forget", "target": target, "engine": "npo",
            "forget": {"texts": [f"Zorblat's diary says {canary}."],
                       "qa": [{"question": f"What is {canary}?", "answer": "A secret word."},
                              {"question": "Where does Zorblat live?",
                               "answer": f"Zorblat lives at {canary} Street."}]},
            "retain": {"texts": [f"retain {canary}"]}}

    api_gen = start_api(db, settings)
    api = next(api_gen)
    try:
        r = api.client.post("/v1/tickets", json=body, headers=api.headers("submitter"))
        assert r.status_code == 202, r.text
        ticket_id = r.json()["id"]
        # At rest before any worker touched it: ciphertext only.
        assert canary not in _table_dump(db)

        loop = DispatcherLoop(settings.worker_config())
        assert loop.run_once() == 1
        assert approve_held(db.sessions) == 1  # the random model's version is held for review
        got = api.client.get(f"/v1/tickets/{ticket_id}", headers=api.headers("submitter"))
        assert got.json()["status"] == "done", got.text
        receipt = api.client.get(f"/v1/tickets/{ticket_id}/receipt",
                                 headers=api.headers("submitter"))
        assert receipt.status_code == 200
        # The job really trained on the opened forget set (its 2 questions were probed).
        assert receipt.json()["metrics"]["forget_trained_probes"] == 2
        assert receipt.json()["payload_sha256"] == r.json()["payload_sha256"]
        answers = [r.text, got.text, receipt.text,
                   api.client.get("/v1/tickets", headers=api.headers("admin")).text,
                   api.client.get("/v1/lineages/default/versions",
                                  headers=api.headers("admin")).text,
                   api.client.get("/metrics").text]
    finally:
        api_gen.close()
        db.engine.dispose()

    places: dict[str, list[str]] = {}
    places["db tables"] = ["tables"] if canary in _table_dump(db) else []
    db_files: list[Path] = []
    if db.backend == "sqlite":
        path = Path(db.url.split("///", 1)[1])
        db_files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    else:
        db_files = _postgres_files(db)
    assert _hits(target.encode(), db_files), f"the search does not reach the rows: {db_files}"
    places["db files"] = _hits(canary.encode(), db_files)
    store_files = _files(store_root) if store_root is not None and store_root.exists() else []
    assert store_files, "the job stored an adapter: there must be object files to search"
    places["object store"] = _hits(canary.encode(), store_files)
    places["data dir"] = _hits(canary.encode(), _files(tmp_path / "data"))
    out, err = capfd.readouterr()
    places["logs"] = ["captured logs"] if canary in caplog.text + out + err else []
    places["api answers and /metrics"] = [str(i) for i, a in enumerate(answers) if canary in a]

    searched = len(db_files) + len(store_files) + len(_files(tmp_path / "data")) + 3
    found = sum(len(v) for v in places.values())
    print(f"\ncanary searched: {searched} files + tables, logs, API answers "
          f"({db.backend}, {store}); found in {found}: {places}")
    # The search itself can find it: a control file with the canary is a hit.
    control = tmp_path / "control.txt"
    control.write_text(f"x{canary}x")
    assert _hits(canary.encode(), [control]) == [str(control)]
    assert found == 0, places
