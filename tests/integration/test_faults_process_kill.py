"""SIGKILL the whole service (API + dispatcher + the running job, one process) mid-work,
restart it, and account for every ticket and version.

Promised: after restarts every ticket is done, back in the queue, or failed with a reason;
no version is ready without verified files; no version is left `training` by a dead job;
no ticket ends up in two versions; live points at a ready version whose files load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory
from storage.models import (AdapterVersion, Alias, Job, JobStatus, Ticket, TicketStatus,
                            VersionStatus)
from storage.objectstore import open_object_store
from tests.fixtures.operator import approve_held
from tests.service.conftest import closed_port

REPO = Path(__file__).resolve().parents[2]
TICKETS = 4
KILLS = 3


class ServiceProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.service_process", "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}: "
                                     f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"service did not start in 90 s: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _service_env(tmp_path: Path, model_dir: Path, **settings: str) -> dict[str, str]:
    """The service on SQLite and a local store in `tmp_path`, the in-process trainer, and
    this test's `settings` (OBLIVIO_ names without the prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBLIVIO_")}
    env.update({
        "OBLIVIO_DATA_DIR": str(tmp_path / "data"),
        "OBLIVIO_DATABASE_URL": f"sqlite:///{tmp_path / 'oblivio.db'}",
        "OBLIVIO_OBJECT_STORE": f"file://{tmp_path / 'objects'}",
        "OBLIVIO_BASE_MODEL": str(model_dir), "OBLIVIO_TRAINER": "plain",
        "OBLIVIO_BATCH_WINDOW_SECONDS": "0", "OBLIVIO_RATE_LIMIT_PER_SECOND": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                      if p),
        "OMP_NUM_THREADS": "1",
        **{f"OBLIVIO_{name.upper()}": value for name, value in settings.items()},
    })
    return env


def test_sigkill_of_the_whole_service_loses_no_ticket_and_leaves_no_half_version(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'oblivio.db'}"
    env = _service_env(tmp_path, tiny_model_dir, lease_seconds="6",
                       max_attempts=str(KILLS + 3),
                       recipe=json.dumps({"max_steps": 40, "eval_every": 0,
                                          "retain_prompts": 4, "retain_max_new_tokens": 8}))
    log = tmp_path / "service.log"
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)

    service = ServiceProcess(env, log)
    token = (data_dir / "admin-token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    ids = []
    for i in range(TICKETS):
        body = {"kind": "forget", "target": f"Zorblat {i}", "engine": "npo",
                "forget": {"qa": [{"question": f"Where does Zorblat {i} live?",
                                   "answer": f"Zorblat {i} lives in Quimby{i}."}]}}
        r = httpx.post(f"{service.url}/v1/tickets", json=body, timeout=10,
                       headers={**headers, "Idempotency-Key": f"kill-{i}-{uuid.uuid4().hex}"})
        assert r.status_code == 202, r.text
        ids.append(uuid.UUID(r.json()["id"]))

    def snapshot() -> dict[uuid.UUID, Ticket]:
        approve_held(sessions)  # the random model's versions are held for review
        with sessions() as s:
            return {t.id: t for t in s.scalars(select(Ticket))}

    # Kill at different moments: mid-training, and in the evaluation/upload/promotion tail.
    moments = [lambda t: t.status is TicketStatus.running and (t.progress or {}).get("step", 0) >= 2,
               lambda t: t.status is TicketStatus.evaluating,
               lambda t: t.status is TicketStatus.running and (t.progress or {}).get("step", 0) >= 1]
    injected = 0
    for moment in moments[:KILLS]:
        try:
            _wait(lambda: any(moment(t) for t in snapshot().values()), 120,
                  "a ticket at the kill moment")
        except AssertionError:
            if all(t.status is TicketStatus.done for t in snapshot().values()):
                break  # everything finished before this moment came
            raise
        service.kill()
        injected += 1
        service = ServiceProcess(env, log)
    try:
        final = _wait(lambda: (lambda snap: snap if all(t.status.is_final for t in snap.values())
                               else None)(snapshot()), 240, "every ticket to finish")
    finally:
        service.kill()

    store = open_object_store(f"file://{tmp_path / 'objects'}")
    with sessions() as s:
        versions = list(s.scalars(select(AdapterVersion)))
        live = s.scalar(select(Alias).where(Alias.name == "live"))
    lost = [i for i in ids if i not in final or not (
        final[i].status is TicketStatus.done
        or (final[i].status is TicketStatus.failed and final[i].error))]
    served = [v for v in versions if v.status in (VersionStatus.ready, VersionStatus.superseded)]
    in_versions: dict[str, int] = {}
    for v in served:
        for t in v.ticket_ids:
            in_versions[t] = in_versions.get(t, 0) + 1
        # Ready means stored and verified: the files are there and match their hash.
        store.fetch_directory(v.object_key, tmp_path / "check" / str(v.version))
    duplicated = [t for t, n in in_versions.items() if n > 1]
    half_written = [v.version for v in versions
                    if v.status in (VersionStatus.training, VersionStatus.validating)]
    print(f"\nfaults injected: {injected} (SIGKILL of the service), tickets: {len(ids)}, "
          f"tickets lost: {len(lost)}, duplicated into two versions: {len(duplicated)}, "
          f"half-written versions: {len(half_written)}, versions: "
          f"{sorted((v.version, v.status.value) for v in versions)}")
    assert injected >= 2, "the kills must have happened"
    assert lost == [] and duplicated == [] and half_written == []
    for i in ids:
        if final[i].status is TicketStatus.done:
            assert str(i) in in_versions and final[i].result_version_id is not None
            assert final[i].payload is None
    assert live is not None
    assert next(v for v in versions if v.id == live.version_id).status is VersionStatus.ready
    engine.dispose()


# Moments inside the job's publication that polling from outside cannot hit: the process
# SIGKILLs itself there (workers/failpoints.py). Before the publishing commit the attempt
# must leave nothing half-published (its version is abandoned, the ticket runs again);
# just after it, nothing may run twice.
PUBLISH_MOMENTS = {"publish.before": "rerun", "publish.commit": "rerun", "publish.after": "kept"}


def test_sigkill_at_the_moment_of_publication_publishes_each_ticket_once(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'oblivio.db'}"
    env = _service_env(tmp_path, tiny_model_dir, lease_seconds="4",
                       recipe=json.dumps({"max_steps": 4, "eval_every": 0,
                                          "retain_prompts": 2, "retain_max_new_tokens": 4}))
    log = tmp_path / "service.log"
    sessions = make_session_factory(make_engine(db_url))
    store = open_object_store(f"file://{tmp_path / 'objects'}")

    def ticket_state(ticket_id: uuid.UUID) -> Ticket:
        with sessions() as s:
            return s.get_one(Ticket, ticket_id)

    killed, tickets = 0, {}
    for n, moment in enumerate(PUBLISH_MOMENTS):
        service = ServiceProcess({**env, "OBLIVIO_FAILPOINTS": moment}, log)
        token = (data_dir / "admin-token").read_text().strip()
        body = {"kind": "forget", "target": f"Zorblat {n}", "engine": "npo",
                "forget": {"qa": [{"question": f"Where does Zorblat {n} live?",
                                   "answer": f"Zorblat {n} lives in Quimby{n}."}]}}
        r = httpx.post(f"{service.url}/v1/tickets", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202, r.text
        tickets[moment] = uuid.UUID(r.json()["id"])
        _wait(lambda: service.proc.poll() is not None, 180, f"the kill at {moment}")
        service.kill()
        killed += 1
        # Restarted without the failpoint: the attempt is recovered and settled.
        service = ServiceProcess(env, log)
        try:
            _wait(lambda: ticket_state(tickets[moment]).status in
                  (TicketStatus.awaiting_review, TicketStatus.done), 180,
                  f"ticket killed at {moment} to settle")
        finally:
            service.kill()

    with sessions() as s:
        versions = list(s.scalars(select(AdapterVersion)))
        jobs = list(s.scalars(select(Job)))
        final = {m: s.get_one(Ticket, t) for m, t in tickets.items()}
    unfinished = [v.version for v in versions
                  if v.status in (VersionStatus.training, VersionStatus.validating)]
    published: dict[str, list[int]] = {}
    for v in versions:
        if v.status in (VersionStatus.ready, VersionStatus.superseded):
            store.fetch_directory(v.object_key, tmp_path / "check" / str(v.version))
            for t in v.ticket_ids:
                published.setdefault(t, []).append(v.version)
    twice = {t: vs for t, vs in published.items() if len(vs) > 1}
    running_jobs = [j.id for j in jobs if j.status in (JobStatus.running, JobStatus.evaluating)]
    print(f"\nfaults injected: {killed} (SIGKILL at {', '.join(PUBLISH_MOMENTS)}), tickets lost: "
          f"{sum(str(t) not in published for t in tickets.values())}, published twice: "
          f"{len(twice)}, half-written versions: {len(unfinished)}, jobs left running: "
          f"{len(running_jobs)}")
    assert killed == len(PUBLISH_MOMENTS)
    assert unfinished == [] and twice == {} and running_jobs == []
    for moment, expected in PUBLISH_MOMENTS.items():
        ticket = final[moment]
        assert [v for v in published[str(ticket.id)]], moment
        assert ticket.result_version_id is not None
        # "rerun": the killed attempt published nothing, a second attempt did;
        # "kept": the commit had happened, so the first attempt's version stands.
        assert ticket.attempts == (2 if expected == "rerun" else 1), (moment, ticket.attempts)
