"""Scheduled batch work: held tickets, one job per window, catch-up once, one leader; S3T
retrains that wait for their window; re-evaluating the live version.

The fast tests use the real database (SQLite and PostgreSQL) and a recording job runner;
`test_a_window_makes_one_job_and_one_version_and_an_evaluate_window_scores_it` runs the
real job path (Ray Train + DeepSpeed on the tiny model, evaluation on the evaluator actor)
for a window of three tickets, then an evaluate window on the version it made live.
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


def _s3t_lineage(api: Api, name: str = "records") -> uuid.UUID:
    from storage import registry
    from storage.db import transaction

    with transaction(api.db.sessions) as s:
        lineage = registry.ensure_lineage(s, name=name, base_model="tiny-test-model",
                                          engine="s3t")
        return lineage.id


def _retrain_follow_up(api: Api, lineage_id: uuid.UUID) -> tuple[uuid.UUID, datetime | None]:
    """What the job runner queues after an S3T deletion is published."""
    from storage import tickets
    from storage.db import transaction

    with transaction(api.db.sessions) as s:
        ticket = tickets.submit_follow_up(
            s, lineage_id=lineage_id, kind="finetune", engine="s3t", requester="job-runner",
            payload={"dataset": "people", "options": {"shards": 2}, "retrain": True})
        return ticket.id, ticket.not_before


def test_schedule_actions_must_fit_the_lineage(api: Api) -> None:
    _s3t_lineage(api)
    post = lambda body: api.client.post("/v1/schedules", headers=api.headers("operator"),  # noqa: E731
                                        json={"cron": "0 3 * * *", **body})
    retrain_o3 = post({"action": "retrain"})
    assert retrain_o3.status_code == 422
    assert "only S3T lineages retrain" in retrain_o3.json()["message"]
    evaluate_s3t = post({"action": "evaluate", "lineage": "records"})
    assert evaluate_s3t.status_code == 422 and "exact by construction" in \
        evaluate_s3t.json()["message"]
    assert post({"action": "forget-everything"}).status_code == 422
    assert post({"action": "retrain", "lineage": "records"}).status_code == 201
    assert post({"action": "unlearn", "lineage": "records"}).status_code == 201  # another action
    assert post({"action": "retrain", "lineage": "records"}).status_code == 409


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_s3t_retrains_wait_for_the_retrain_window_and_deletions_share_one(api: Api) -> None:
    lineage_id = _s3t_lineage(api)
    before, before_hold = _retrain_follow_up(api, lineage_id)  # queued before the schedule
    assert before_hold is None
    op = api.headers("operator")
    for action, cron in (("unlearn", "0 2 * * *"), ("retrain", "0 3 * * *")):
        made = api.client.post("/v1/schedules", headers=op,
                               json={"cron": cron, "lineage": "records", "action": action})
        assert made.status_code == 201, made.text
    waiting = {s["action"]: s["waiting_tickets"]
               for s in api.client.get("/v1/schedules", headers=op).json()}
    assert waiting == {"unlearn": 0, "retrain": 1}  # the retrain is held, by its own action
    # Two more deletions published before the window: their retrains are the waiting one.
    assert _retrain_follow_up(api, lineage_id)[0] == before
    again, hold = _retrain_follow_up(api, lineage_id)
    assert again == before and hold == schedules.HOLD_UNTIL
    shown = api.client.get(f"/v1/tickets/{before}", headers=op).json()
    assert shown["status"] == "queued" and shown["progress"]["phase"] == "waiting_for_schedule"
    assert queue.claim(api.db.sessions, owner="dispatcher", limit=5, lease_seconds=30,
                       max_attempts=3) == []  # no dispatcher runs it before the window

    rec = Recorder()
    loop = SchedulerLoop(api.settings, api.db.sessions, run_batch=rec)
    with api.db.sessions() as s:  # both windows due, whatever the wall clock's hour
        last_window = max(sched.next_run_at for sched in s.query(Schedule).all())
    taken = {w.action: w for w in loop.run_once(now=last_window + timedelta(seconds=1))}
    assert taken["unlearn"].skipped and not taken["unlearn"].tickets  # nothing of its kinds
    assert [t.id for t in taken["retrain"].tickets] == [before]
    assert rec.batches == [[before]] and rec.payloads[0]["retrain"] is True
    # The retrain runs now: the next deletion's retrain waits for the next window.
    later, later_hold = _retrain_follow_up(api, lineage_id)
    assert later != before and later_hold == schedules.HOLD_UNTIL


def test_an_evaluate_window_without_a_live_version_says_so(api: Api) -> None:
    made = api.client.post("/v1/schedules", headers=api.headers("operator"),
                           json={"cron": "0 4 * * *", "action": "evaluate"})
    assert made.status_code == 201, made.text
    loop = SchedulerLoop(api.settings, api.db.sessions, run_batch=Recorder())
    window = datetime.fromisoformat(made.json()["next_run_at"])
    [taken] = loop.run_once(now=window.astimezone(timezone.utc) + timedelta(seconds=1))
    assert taken.action == "evaluate" and loop.jobs_run == 0
    shown = api.client.get(f"/v1/schedules/{made.json()['id']}",
                           headers=api.headers("operator")).json()
    assert shown["last_result"]["skipped"] == "no live version to evaluate"


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
    evaluate = oblivio(live_server, "schedule", "add", "--cron", "0 4 * * 0", "--action",
                       "evaluate")
    assert evaluate.exit_code == 0 and evaluate.stdout.startswith("evaluate schedule")
    assert "evaluate" in oblivio(live_server, "schedule", "list").stdout
    retrain = oblivio(live_server, "schedule", "add", "--cron", "0 4 * * *", "--action",
                      "retrain")
    assert retrain.exit_code == 2 and "only S3T lineages retrain" in retrain.output


def test_a_window_makes_one_job_and_one_version_and_an_evaluate_window_scores_it(
        tmp_path: Path, tiny_model_dir: Path, ray_cluster) -> None:
    """The real job path: three tickets submitted before the window -> one job, one version;
    an evaluate window then scores the live version again, as a job of its own."""
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

        evaluate = client.post("/v1/schedules", headers=auth,
                               json={"cron": "0 4 * * *", "action": "evaluate"})
        assert evaluate.status_code == 201, evaluate.text
        window = datetime.fromisoformat(evaluate.json()["next_run_at"])
        loop.run_once(now=window.astimezone(timezone.utc) + timedelta(seconds=1))
        result = client.get(f"/v1/schedules/{evaluate.json()['id']}",
                            headers=auth).json()["last_result"]
        assert result["version"] == "default@v1" and result["excluded_targets"] == 3, result
        figures = result["evaluation"]
        # The random-weight model answers no probe: utility cannot be judged, and says so.
        assert figures["verdict"] == "hold" and "cannot be judged" in figures["verdict_reason"]
        assert figures["utility_probes"] > 0 and figures["utility_rate_after"] == 0.0
        assert figures["at_publication"]["verdict"] == versions[0]["metrics"]["verdict"]
        assert figures["report_object_key"].startswith("reports/")
        job = client.get(f"/v1/jobs/{result['job_id']}", headers=auth).json()
        assert job["status"] == "succeeded" and job["method_config"]["kind"] == "reevaluate"
        assert job["progress"]["evaluation"] == figures
        assert len(client.get("/v1/lineages/default/versions", headers=auth).json()) == 1
        with app.state.sessions() as s:
            from storage.models import AuditEvent

            audited = s.query(AuditEvent).filter_by(action="version.reevaluated").one()
        assert audited.subject_id == versions[0]["id"]
        assert audited.detail["verdict"] == figures["verdict"]
