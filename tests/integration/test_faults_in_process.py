"""Faults injected at the boundaries of one dispatcher (in-process, tiny model, plain trainer):
the object store failing uploads, PostgreSQL connections terminated mid-job, the data dir
full, a stored adapter corrupted. Each test prints a "faults injected: N, tickets lost: 0"
line; every loop and wait is bounded.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from service.settings import Settings
from storage import registry, tickets
from storage.db import transaction
from storage.models import AdapterVersion, Ticket, TicketKind, TicketStatus, VersionStatus
from storage.objectstore.base import StoreUnavailable
from tests.fixtures.operator import approve_held

RECIPE = {"max_steps": 4, "eval_every": 0, "retain_prompts": 4, "retain_max_new_tokens": 8}
MAX_RUNS = 6


def _settings(tmp_path: Path, db_url: str, model: Path, **over: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data", database_url=db_url,
        object_store=f"file://{tmp_path / 'objects'}", base_model=str(model), trainer="plain",
        batch_window_seconds=0.0, lease_seconds=60, max_attempts=MAX_RUNS, recipe=RECIPE)
    values.update(over)
    return Settings(**values)


def _submit(db: Any, loop: Any, n: int = 0) -> uuid.UUID:
    with transaction(db.sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=loop.config.base_model)
        request = tickets.TicketRequest(
            kind=TicketKind.forget, engine="npo", target=f"Zorblat {n}",
            payload={"target": f"Zorblat {n}", "retain": None,
                     "forget": {"texts": [], "qa": [{"question": f"Where does Zorblat {n} live?",
                                                     "answer": f"In Quimby{n}."}]}})
        return tickets.submit(s, request=request, requester="test", cipher=loop.cipher).id


def _run_until_final(db: Any, loop: Any, ticket_id: uuid.UUID) -> list[Ticket]:
    """run_once until the ticket is final (bounded); returns its state after each run."""
    states = []
    for _ in range(MAX_RUNS):
        try:
            loop.run_once()
            approve_held(db.sessions)  # the random model's versions are held for review
        except Exception:  # a DB blip in the claim itself: run_forever would wait and retry
            time.sleep(0.5)
        with db.sessions() as s:
            ticket = s.get_one(Ticket, ticket_id)
            states.append(ticket)
            if ticket.status.is_final:
                return states
            # A retry may wait (backoff): do not sleep through it in a test.
            s.execute(update(Ticket).where(Ticket.id == ticket_id).values(not_before=None))
            s.commit()
    return states


def _versions(db: Any) -> list[AdapterVersion]:
    with db.sessions() as s:
        return list(s.scalars(select(AdapterVersion).order_by(AdapterVersion.version)))


def _account(db: Any, ids: list[uuid.UUID]) -> tuple[int, int]:
    """(lost, duplicated): tickets neither done nor failed-with-a-reason; tickets in two
    servable versions."""
    with db.sessions() as s:
        rows = {t.id: t for t in s.scalars(select(Ticket))}
    lost = sum(1 for i in ids if i not in rows or not (
        rows[i].status is TicketStatus.done
        or (rows[i].status is TicketStatus.failed and rows[i].error)))
    seen: dict[str, int] = {}
    for v in _versions(db):
        if v.status in (VersionStatus.ready, VersionStatus.superseded):
            for t in v.ticket_ids:
                seen[t] = seen.get(t, 0) + 1
    return lost, sum(1 for n in seen.values() if n > 1)


class FlakyStore:
    """The real store, but the first `failures` uploads raise StoreUnavailable."""

    def __init__(self, inner: Any, failures: int) -> None:
        self._inner, self.failures, self.injected = inner, failures, 0

    def put_directory_content_addressed(self, *args: Any, **kwargs: Any) -> Any:
        if self.injected < self.failures:
            self.injected += 1
            raise StoreUnavailable("object store s3://test unavailable: injected fault "
                                   f"{self.injected} (connection reset)")
        return self._inner.put_directory_content_addressed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_object_store_errors_during_upload_are_retried_and_nothing_is_lost(
        db: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.dispatcher import DispatcherLoop

    loop = DispatcherLoop(_settings(tmp_path, db.url, tiny_model_dir).worker_config())
    loop.store = FlakyStore(loop.store, failures=2)
    ticket_id = _submit(db, loop)
    states = _run_until_final(db, loop, ticket_id)
    versions = _versions(db)
    lost, duplicated = _account(db, [ticket_id])
    print(f"\nfaults injected: {loop.store.injected} (object store upload errors), "
          f"tickets lost: {lost}, duplicated: {duplicated}, runs: {len(states)}")
    assert [s.status for s in states] == [TicketStatus.queued, TicketStatus.queued,
                                          TicketStatus.done]
    # Each failed attempt said why, in one line the submitter can read.
    assert "object store s3://test unavailable: injected fault 1" in states[0].error
    assert states[-1].attempts == 3 and states[-1].error is None
    assert [v.status for v in versions] == [VersionStatus.failed, VersionStatus.failed,
                                            VersionStatus.ready]
    assert all("injected fault" in v.metrics["error"] for v in versions[:2])
    assert (lost, duplicated) == (0, 0)


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_postgres_connections_terminated_mid_job_lose_nothing(
        db: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.dispatcher import DispatcherLoop

    loop = DispatcherLoop(_settings(tmp_path, db.url, tiny_model_dir,
                                    recipe={**RECIPE, "max_steps": 12}).worker_config())
    ids = [_submit(db, loop, n) for n in range(2)]
    stop = threading.Event()
    terminated: list[int] = []

    def killer() -> None:
        # pg_terminate_backend on every other connection of this database, whenever a ticket
        # is mid-training: the dispatcher's pooled connections die under it.
        import psycopg

        from tests.fixtures.postgres import _conninfo

        with psycopg.connect(_conninfo(db.url), autocommit=True) as conn:
            while not stop.is_set() and len(terminated) < 6:
                running = conn.execute("SELECT count(*) FROM tickets WHERE status = 'running' "
                                       "AND (progress->>'step')::int >= 1").fetchone()[0]
                if running:
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname "
                        "= current_database() AND pid <> pg_backend_pid()").fetchall()
                    terminated.append(sum(1 for (ok,) in rows if ok))
                    time.sleep(0.5)
                time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        for ticket_id in ids:
            _run_until_final(db, loop, ticket_id)
    finally:
        stop.set()
        thread.join(timeout=10)
    lost, duplicated = _account(db, ids)
    with db.sessions() as s:
        statuses = [s.get_one(Ticket, i).status for i in ids]
    print(f"\nfaults injected: {len(terminated)} (pg_terminate_backend rounds, "
          f"{sum(terminated)} connections), tickets lost: {lost}, duplicated: {duplicated}")
    assert terminated, "no connection was terminated: the fault never happened"
    assert statuses == [TicketStatus.done, TicketStatus.done]
    assert (lost, duplicated) == (0, 0)
    half = [v.version for v in _versions(db)
            if v.status in (VersionStatus.training, VersionStatus.validating)]
    assert half == []


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs as the data dir (root only; otherwise a visible skip)."""
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def test_a_full_data_dir_fails_the_attempt_clearly_reports_not_ready_and_recovers(
        db: Any, tmp_path: Path, tiny_model_dir: Path, small_data_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from workers.dispatcher import DispatcherLoop

    settings = _settings(tmp_path, db.url, tiny_model_dir, data_dir=small_data_dir,
                         object_store=f"file://{small_data_dir / 'objects'}",
                         min_free_disk_bytes=1 << 20)
    loop = DispatcherLoop(settings.worker_config())
    ticket_id = _submit(db, loop)
    filler = small_data_dir / "filler"
    app = create_app(settings)
    with TestClient(app) as client:  # started (admin token written) before the disk fills
        assert client.get("/readyz").json()["checks"]["data_dir"] == "ok"
        with filler.open("wb", buffering=0) as fh:  # fill it up, leaving a few KiB at most
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["data_dir"].startswith(
            "OSError: only "), ready.text
        loop.run_once()
        with db.sessions() as s:
            first = s.get_one(Ticket, ticket_id)
        assert first.status is TicketStatus.queued, first.error
        assert "No space left on device" in first.error, first.error
        filler.unlink()
        assert client.get("/readyz").json()["checks"]["data_dir"] == "ok"
    states = _run_until_final(db, loop, ticket_id)
    lost, duplicated = _account(db, [ticket_id])
    print(f"\nfaults injected: 1 (data dir full), tickets lost: {lost}, duplicated: "
          f"{duplicated}, first error: {first.error[:120]}")
    assert states[-1].status is TicketStatus.done
    assert (lost, duplicated) == (0, 0)


def test_a_corrupted_adapter_is_detected_at_load_marked_failed_and_serving_falls_back(
        db: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.fixtures.service_process import InProcessGenerator
    from tests.service.conftest import Api
    from workers.dispatcher import DispatcherLoop

    settings = _settings(tmp_path, db.url, tiny_model_dir)
    loop = DispatcherLoop(settings.worker_config())
    for n in range(2):
        assert _run_until_final(db, loop, _submit(db, loop, n))[-1].status is TicketStatus.done
    v1, v2 = _versions(db)
    with db.sessions() as s:
        assert registry.resolve(s, lineage_name="default", ref="live").id == v2.id

    # Flip bytes in the middle of v2's stored archive (the key still names the old hash).
    stored = tmp_path / "objects" / v2.object_key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    app = create_app(settings)
    app.state.generator = InProcessGenerator(settings)
    with TestClient(app) as client:
        api = Api(client=client, settings=settings, db=db, secrets={})
        secret = api.new_token("submitter", "gen")
        auth = {"Authorization": f"Bearer {secret}"}
        # A streamed chat completion meets the corrupt adapter first: nothing is sent
        # before the version loads, so it is answered by the version live falls back to.
        r = client.post("/v1/chat/completions", headers=auth, json={
            "model": "default", "stream": True,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-oblivio-version"] == "default@v1"
        assert r.text.rstrip().endswith("data: [DONE]")
        r = client.post("/v1/generate", json={"prompt": "Hello"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "default@v1"  # served by the previous version
    with db.sessions() as s:
        bad = s.get_one(AdapterVersion, v2.id)
        assert bad.status is VersionStatus.failed
        assert "checksum" in bad.metrics["error"] and "corrupt" in bad.metrics["error"]
        assert registry.resolve(s, lineage_name="default", ref="live").id == v1.id

    # The next job builds on v1, the good one, not on the corrupt v2.
    third = _submit(db, loop, 3)
    assert _run_until_final(db, loop, third)[-1].status is TicketStatus.done
    v3 = _versions(db)[-1]
    assert (v3.version, v3.parent_id) == (3, v1.id)
    lost, duplicated = _account(db, [third])
    print(f"\nfaults injected: 1 (corrupted adapter), tickets lost: {lost}, "
          f"served by: default@v1, corrupt version marked {bad.status.value}")


def test_a_corrupted_parent_fails_the_attempt_and_the_retry_stacks_on_the_previous(
        db: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.dispatcher import DispatcherLoop

    loop = DispatcherLoop(_settings(tmp_path, db.url, tiny_model_dir).worker_config())
    for n in range(2):
        assert _run_until_final(db, loop, _submit(db, loop, n))[-1].status is TicketStatus.done
    v1, v2 = _versions(db)
    stored = tmp_path / "objects" / v2.object_key
    stored.write_bytes(stored.read_bytes()[:-100])  # truncated
    third = _submit(db, loop, 3)
    states = _run_until_final(db, loop, third)
    assert [s.status for s in states] == [TicketStatus.queued, TicketStatus.done]
    assert "corrupt" in states[0].error
    versions = _versions(db)
    assert [(v.version, v.status) for v in versions] == [
        (1, VersionStatus.superseded), (2, VersionStatus.failed), (3, VersionStatus.failed),
        (4, VersionStatus.ready)]
    assert versions[-1].parent_id == v1.id
    with db.sessions() as s:
        assert s.scalar(text("SELECT count(*) FROM audit_events WHERE action = "
                             "'version.corrupt'")) == 1
