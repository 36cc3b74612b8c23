"""Scheduled batch unlearning: held tickets, one job per window, catch-up once, one leader.

The fast tests use the real database (SQLite and PostgreSQL) and a recording job runner;
`test_a_window_makes_one_job_and_one_version` runs the real job path (Ray Train +
DeepSpeed on the tiny model) for a window of three tickets.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from service.scheduler import SchedulerLoop
from storage import queue, schedules
from storage.models import Schedule
from tests.fixtures.training import FORGET_QA
from tests.service.conftest import Api, LiveServer
from tests.service.test_cli import oblivio

TICKET = {"kind": "forget", "target": "Zorblat", "engine": "npo", "forget": {"qa": FORGET_QA}}


def _submit(api: Api, n: int, tag: str = "") -> list[str]:
    ids = []
    for i in range(n):
        r = api.client.post("/v1/tickets", headers=api.headers("operator"),
                            json={**TICKET, "target": f"Zorblat {tag}{i}"})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []
        self.payloads: list[dict] = []

    def __call__(self, tickets: list[queue.ClaimedTicket]) -> None:
        self.batches.append(sorted(t.id for t in tickets))
        self.payloads += [t.payload for t in tickets]


def _next(api: Api) -> datetime:
    with api.db.sessions() as s:
        return s.query(Schedule).one().next_run_at


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_tickets_wait_for_the_window_and_go_in_one_batch(api: Api) -> None:
    early = _submit(api, 1, "early-")  # queued before the schedule: it waits too
    made = api.client.post("/v1/schedules", headers=api.headers("operator"), json={
        "cron": "0 2 * * *", "lineage": "default", "min_tickets": 2, "max_tickets": 3})
    assert made.status_code == 201, made.text
    assert made.json()["waiting_tickets"] == 1
    window = datetime.fromisoformat(made.json()["next_run_at"])
    assert (window.hour, window.minute) == (2, 0)
    later = _submit(api, 3)
    shown = api.client.get(f"/v1/tickets/{later[0]}", headers=api.headers("operator")).json()
    assert shown["status"] == "queued"
    assert shown["progress"]["phase"] == "waiting_for_schedule"

    # The per-ticket dispatcher's claim never sees a held ticket.
    assert queue.claim(api.db.sessions, owner="dispatcher-x", lease_seconds=60,
                       max_attempts=3) == []

    rec = Recorder()
    loop = SchedulerLoop(api.settings, api.db.sessions, run_batch=rec)
    assert loop.run_once(now=window - timedelta(minutes=1)) == []  # before the window
    taken = loop.run_once(now=window + timedelta(seconds=5))
    assert len(taken) == 1 and len(rec.batches) == 1
    # max_tickets 3, oldest first: the early one and two of the later ones, in ONE batch.
    assert rec.batches[0] == sorted(uuid.UUID(i) for i in early + later[:2])
    # The job gets the forget sets opened (they are sealed at rest).
    assert all(p["forget"]["qa"] == FORGET_QA for p in rec.payloads)
    listed = api.client.get("/v1/schedules", headers=api.headers("operator")).json()
    assert listed[0]["waiting_tickets"] == 1 and listed[0]["last_run_at"] is not None

    # Next window: only one waiting, fewer than min_tickets: skipped, it keeps waiting.
    rec.batches.clear()
    nxt = _next(api)
    skipped = loop.run_once(now=nxt + timedelta(seconds=1))
    assert skipped[0].skipped and "fewer than min_tickets 2" in skipped[0].skipped
    assert rec.batches == []

    # Removing the schedule releases the waiting ticket to the normal queue.
    sid = listed[0]["id"]
    gone = api.client.delete(f"/v1/schedules/{sid}", headers=api.headers("operator"))
    assert gone.status_code == 200 and gone.json()["released_tickets"] == 1
    claimed = queue.claim(api.db.sessions, owner="dispatcher-x", lease_seconds=60,
                          max_attempts=3)
    assert [str(t.id) for t in claimed] == [later[2]]


def test_missed_windows_run_once_not_once_each(api: Api) -> None:
    api.client.post("/v1/schedules", headers=api.headers("operator"),
                    json={"cron": "0 * * * *", "min_tickets": 1})
    _submit(api, 2)
    rec = Recorder()
    loop = SchedulerLoop(api.settings, api.db.sessions, run_batch=rec)
    down_until = _next(api) + timedelta(hours=5, minutes=30)  # 6 hourly windows missed
    assert len(loop.run_once(now=down_until)) == 1
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 2
    assert _next(api) == down_until.replace(minute=0, second=0, microsecond=0) \
        + timedelta(hours=1)
    assert loop.run_once(now=down_until + timedelta(minutes=1)) == []


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_one_leader_among_replicas(api: Api) -> None:
    api.client.post("/v1/schedules", headers=api.headers("operator"),
                    json={"cron": "*/5 * * * *", "min_tickets": 1})
    _submit(api, 2)
    recs = [Recorder() for _ in range(3)]
    loops = [SchedulerLoop(api.settings, api.db.sessions, run_batch=r, owner=f"replica-{i}")
             for i, r in enumerate(recs)]
    when = _next(api) + timedelta(seconds=1)
    results = [loop.run_once(now=when) for loop in loops]
    assert [len(r) for r in results] == [1, 0, 0]  # only the leader runs windows
    assert sum(len(r.batches) for r in recs) == 1
    # The leader dies (stops renewing): after the lease expires another replica leads.
    later = when + timedelta(seconds=loops[0].ttl_seconds + 1)
    assert schedules.acquire_leadership(api.db.sessions, owner="replica-1",
                                        ttl_seconds=30, now=later)
    assert not schedules.acquire_leadership(api.db.sessions, owner="replica-0",
                                            ttl_seconds=30, now=later)


def test_bad_schedules_are_refused_clearly(api: Api) -> None:
    post = lambda body: api.client.post("/v1/schedules", headers=api.headers("operator"),  # noqa: E731
                                        json=body)
    bad_cron = post({"cron": "every night"})
    assert bad_cron.status_code == 422 and "invalid cron expression" in bad_cron.json()["message"]
    assert post({"cron": "0 2 * * *", "min_tickets": 5, "max_tickets": 2}).status_code == 422
    assert post({"cron": "0 2 * * *", "lineage": "nope"}).status_code == 404
    assert post({"cron": "0 2 * * *"}).status_code == 201
    assert post({"cron": "0 3 * * *"}).status_code == 409
    sub = api.client.post("/v1/schedules", headers=api.headers("submitter"),
                          json={"cron": "0 2 * * *"})
    assert sub.status_code == 403


def test_cli_schedule_add_list_remove(live_server: LiveServer) -> None:
    added = oblivio(live_server, "schedule", "add", "--cron", "0 2 * * *", "--lineage",
                    "default", "--min-tickets", "2", "--max-tickets", "32", "--json")
    assert added.exit_code == 0, added.output
    sid = json.loads(added.stdout)["id"]
    listed = oblivio(live_server, "schedule", "list")
    assert listed.exit_code == 0 and "0 2 * * *" in listed.stdout and "2..32" in listed.stdout
    bad = oblivio(live_server, "schedule", "add", "--cron", "nope")
    assert bad.exit_code == 2 and "invalid cron" in bad.output and "Traceback" not in bad.output
    removed = oblivio(live_server, "schedule", "remove", sid)
    assert removed.exit_code == 0 and "removed schedule" in removed.stdout
    assert oblivio(live_server, "schedule", "remove", sid).exit_code == 2


def test_a_window_makes_one_job_and_one_version(tmp_path: Path, tiny_model_dir: Path,
                                                ray_cluster) -> None:
    """The real job path: three tickets submitted before the window -> one job, one version."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from storage import tokens
    from storage.db import transaction
    from storage.models import Job

    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        object_store=f"file://{tmp_path / 'objects'}", base_model=str(tiny_model_dir),
        num_workers=2, zero_stage=2, lease_seconds=120,
        recipe={"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                "retain_max_new_tokens": 8})
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            auth = {"Authorization": "Bearer "
                    + tokens.create_token(s, role="operator", name="sched")[1]}
        made = client.post("/v1/schedules", headers=auth, json={"cron": "0 2 * * *",
                                                                 "min_tickets": 3})
        assert made.status_code == 201, made.text
        ids = [client.post("/v1/tickets", headers=auth,
                           json={**TICKET, "target": f"Zorblat {i}",
                                 "forget": {"qa": [FORGET_QA[i]]}}).json()["id"]
               for i in range(3)]
        loop = SchedulerLoop(settings, app.state.sessions)
        window = datetime.fromisoformat(made.json()["next_run_at"])
        taken = loop.run_once(now=window.astimezone(timezone.utc) + timedelta(seconds=1))
        assert len(taken) == 1 and loop.jobs_run == 1
        with app.state.sessions() as s:
            jobs = s.query(Job).all()
        assert len(jobs) == 1 and sorted(jobs[0].ticket_ids) == sorted(ids)
        versions = client.get("/v1/lineages/default/versions", headers=auth).json()
        assert len(versions) == 1 and sorted(versions[0]["ticket_ids"]) == sorted(ids)
        # The random-weight model answers no probe, so the batch's version is held for
        # review; once an operator promotes it, all three tickets are done with it.
        for tid in ids:
            assert client.get(f"/v1/tickets/{tid}", headers=auth).json()["status"] == \
                "awaiting_review"
        promoted = client.post("/v1/lineages/default/promote", headers=auth, json={"version": 1})
        assert promoted.status_code == 200, promoted.text
        for tid in ids:
            t = client.get(f"/v1/tickets/{tid}", headers=auth).json()
            assert t["status"] == "done" and t["result_version"]["label"] == "default@v1"
