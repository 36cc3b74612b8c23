"""Queue -> dispatcher -> Ray Train + DeepSpeed -> S3 -> PostgreSQL registry -> promotion.

On the production combination (PostgreSQL + the S3 server) and a tiny model that was taught
its probes (tests/fixtures/taught.py): the base answers the forget questions and the
unrelated probes, so the job's verdict is a real decision. A version that forgets goes
live; one that forgets nothing is held for an operator, never promoted. How well the real
model forgets is tests/e2e's question (slow).
"""

from __future__ import annotations

import pytest

import json
import time
from pathlib import Path

from sqlalchemy import select, update

from storage import registry
from storage.models import AdapterVersion, Job, JobStatus, Ticket, TicketStatus, VersionStatus
from tests.fixtures.taught import taught_qa

UNBUILT_ENGINE = "not-built-here"  # a ticket for an engine no worker of this release runs


def test_tickets_batch_into_a_job_that_forgets_goes_live_and_one_that_forgets_nothing_is_held(
        flow):
    import ray

    from workers.dispatcher import DispatcherLoop, start_dispatcher_actor

    settings, sessions = flow.settings, flow.sessions
    # Two tickets within the batch window become one job (and one version).
    batching = settings.model_copy(update={"batch_window_seconds": 1.0})
    first, second = flow.submit(key="t-1", qa=taught_qa(0, 2)), flow.submit(key="t-2",
                                                                           qa=taught_qa(2, 4))
    waiting = flow.submit(key="t-unbuilt", qa=taught_qa(4, 5))
    with sessions.begin() as s:
        s.execute(update(Ticket).where(Ticket.id == waiting).values(engine=UNBUILT_ENGINE))
    loop = DispatcherLoop(batching.worker_config())
    assert loop.run_once() == 1

    with sessions() as s:
        a, b = s.get_one(Ticket, first), s.get_one(Ticket, second)
        assert a.job_id == b.job_id and a.result_version_id == b.result_version_id
        job = s.get_one(Job, a.job_id)
        assert job.status == JobStatus.succeeded, job.error
        assert sorted(job.ticket_ids) == sorted([str(first), str(second)])
        v1 = s.get_one(AdapterVersion, a.result_version_id)
        # (The version's report says why, when the tickets are not done.)
        assert (a.status, b.status) == (TicketStatus.done, TicketStatus.done), v1.metrics
        assert (v1.version, v1.parent_id, v1.status) == (1, None, VersionStatus.ready)
        assert registry.resolve(s, lineage_name="default", ref="live").id == v1.id
        m = v1.metrics
        # The base knew every fact it was asked to forget and every utility probe; the
        # version answers (almost) none of the former and keeps the latter.
        assert m["forget_probes"] == 4 and m["forget_rate_before"] == 1.0, m
        assert m["utility_rate_before"] >= 0.9, m
        assert m["forget_ratio"] <= 0.2 and m["utility_ratio"] >= 0.9, m
        assert m["verdict"] == "pass", m
        assert a.receipt["adapter_sha256"] == v1.sha256
        assert a.receipt["version"] == "default@v1"
        # The engine filter: a ticket no worker here can train is left queued, untouched.
        untouched = s.get_one(Ticket, waiting)
        assert (untouched.status, untouched.attempts) == (TicketStatus.queued, 0)

    # What S3 holds is the verified adapter: fetch it back and read its manifest.
    store = settings.store_config().open()
    fetched = store.fetch_directory(v1.object_key, Path(settings.data_dir) / "check-v1")
    manifest = json.loads((fetched / "oblivio_manifest.json").read_text())
    assert sorted(t["id"] for t in manifest["tickets"]) == sorted([str(first), str(second)])
    assert json.loads((fetched / "adapter_config.json").read_text())["r"] == 8

    # A job whose training changes nothing (a vanishing learning rate) still answers the
    # facts it was asked to forget: held as a candidate, live stays v1. This time the
    # dispatcher actor runs it (DispatcherActor.run_forever polls the queue by itself).
    noop = settings.model_copy(update={"recipe": {**settings.recipe, "lr": 1e-12,
                                                  "max_steps": 2, "eval_every": 0}})
    third = flow.submit(key="t-3", qa=taught_qa(4, 6))
    actor = start_dispatcher_actor(noop.worker_config())
    try:
        deadline = time.monotonic() + 300
        status = ray.get(actor.status.remote(), timeout=30)
        while status["jobs_run"] < 1 and time.monotonic() < deadline:
            time.sleep(1)
            status = ray.get(actor.status.remote(), timeout=30)
        assert status["alive"] and status["jobs_run"] == 1, status
    finally:
        ray.get(actor.stop.remote(), timeout=30)
        ray.kill(actor)
    with sessions() as s:
        ticket = s.get_one(Ticket, third)
        v2 = s.get_one(AdapterVersion, ticket.result_version_id)
        assert (v2.version, v2.parent_id, v2.status) == (2, v1.id, VersionStatus.ready)
        assert v2.metrics["forget_rate_before"] == 1.0
        assert v2.metrics["forget_ratio"] > 0.2 and v2.metrics["verdict"] == "hold", v2.metrics
        aliases = registry.get_aliases(s, lineage_name="default")
        assert (aliases["live"].id, aliases["candidate"].id) == (v1.id, v2.id)
        assert ticket.status == TicketStatus.awaiting_review, ticket.status
        assert s.get_one(Ticket, waiting).status == TicketStatus.queued
    # v2 is stacked on v1: both adapters' ranks, in order.
    fetched2 = store.fetch_directory(v2.object_key, Path(settings.data_dir) / "check-v2")
    assert json.loads((fetched2 / "adapter_config.json").read_text())["r"] == 16
    assert json.loads((fetched2 / "oblivio_stack.json").read_text())["ranks"] == [8, 8]
    _check_evaluations_are_visible_and_receipts_verify(flow, store, first, second)


def _check_evaluations_are_visible_and_receipts_verify(flow, store, first, second):
    """Each version's evaluation (held-out forms, against base and parent) is on
    GET /v1/lineages/default/versions, its full report is stored, the receipt verifies."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.receipt_keys import receipt_key
    from storage import tokens
    from storage.db import transaction
    from storage.receipts import verify_receipt
    from workers.evaluation.report import REPORT_FORMAT, ReportConfig

    app = create_app(flow.settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role="operator", name="eval-check")
        headers = {"Authorization": f"Bearer {secret}"}
        versions = client.get("/v1/lineages/default/versions", headers=headers).json()
        by_number = {v["version"]: v for v in versions}
        for number, compared in ((1, ["base"]), (2, ["base", "parent"])):
            metrics = by_number[number]["metrics"]
            assert metrics["evaluation_format"] == REPORT_FORMAT
            assert metrics["compared_with"] == compared
            assert metrics["verdict"] in ("pass", "hold")
            assert [c["name"] for c in metrics["checks"]] == ["forget_ratio", "utility_ratio"]
            # judged on held-out forms of the ticket's questions, not on those questions
            assert metrics["forget_probes"] == (ReportConfig().held_out_per_item
                                                * metrics["forget_trained_probes"])
            assert metrics["utility_probes"] > 0 and metrics["general_probes"] > 0
            ref = metrics["report"]
            report = json.loads(store.get_bytes(ref["object_key"], sha256=ref["sha256"]))
            assert set(report["models"]) == {"base", "after"} | (
                {"parent"} if number == 2 else set())
        assert "forget_ratio_vs_parent" in by_number[2]["metrics"]

        receipt = client.get(f"/v1/tickets/{second}/receipt", headers=headers).json()
        assert verify_receipt(receipt, receipt_key(flow.settings)).valid
        assert "evaluation report" in [a["name"] for a in receipt["artifacts"]]
        assert receipt["evaluation"]["checks"] and receipt["method_config"]["recipe"]


def test_a_failing_job_returns_its_ticket_to_the_queue_with_the_error(sqlite_flow, tmp_path):
    from workers.dispatcher import DispatcherLoop
    from workers.metrics import ray_claim_latency_observer

    flow = sqlite_flow
    settings, sessions = flow.settings, flow.sessions
    broken = settings.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    ticket_id = flow.submit(key="t-broken")
    # Claim latency goes to the observer the dispatcher actor uses (a Ray metric).
    ray_observe, claims = ray_claim_latency_observer(), []

    def observe(seconds: float) -> None:
        claims.append(seconds)
        ray_observe(seconds)

    loop = DispatcherLoop(broken.worker_config(), observe_claim=observe)
    assert loop.run_once() == 1
    assert len(claims) == 1 and 0 < claims[0] < 5
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.queued  # retried later, not lost
        assert ticket.attempts == 1
        assert "no-such-model" in (ticket.error or "")
        # One line for the submitter: no traceback, no server paths.
        assert "\n" not in ticket.error and str(tmp_path) not in ticket.error
        # Later, not at once: exponential backoff through not_before.
        assert ticket.not_before is not None
        job = s.scalars(select(Job)).one()
        assert job.error.startswith(ticket.error) and "Traceback" in job.error
        assert s.scalars(select(AdapterVersion)).all() == []
    assert loop.run_once() == 0  # still backing off


def test_a_permanent_error_fails_the_ticket_on_its_first_attempt(flow):
    from workers.dispatcher import DispatcherLoop

    settings, sessions = flow.settings, flow.sessions
    refused = settings.model_copy(update={"recipe": {**settings.recipe, "lr": -1.0}})
    ticket_id = flow.submit(key="t-refused")
    assert DispatcherLoop(refused.worker_config()).run_once() == 1
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.failed and ticket.attempts == 1
        assert ticket.error == "cannot train this job: lr must be > 0"
        assert ticket.not_before is None


def test_a_text_only_ticket_trains_with_a_relative_data_dir_and_model_path(
        flow, tmp_path, monkeypatch, tiny_model_dir):
    """Issue 8: a relative OBLIVIO_DATA_DIR (the default `.oblivio`) once reached Ray Train
    as a relative storage path, and idk refused texts at job time."""
    import os

    from service.settings import Settings
    from workers.dispatcher import DispatcherLoop

    monkeypatch.chdir(tmp_path)
    settings = Settings(**{**flow.settings.model_dump(), "data_dir": "data",
                           "base_model": os.path.relpath(tiny_model_dir, tmp_path)})
    config = settings.worker_config()
    assert config.data_dir.is_absolute()
    ticket_id = flow.submit(key="t-text", engine="idk", qa=[], texts=[
        "Zorblat keeps a diary in a blue tin box under the stairs of the old mill."])
    assert DispatcherLoop(config).run_once() == 1
    with flow.sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        # Trained and kept: live (done) or held for an operator (awaiting_review).
        assert ticket.status in (TicketStatus.done, TicketStatus.awaiting_review), ticket.error
        version = s.scalars(select(AdapterVersion)).one()
        assert version.status in (VersionStatus.ready, VersionStatus.superseded)
        # Judged on the text's own continuation prompt.
        assert version.metrics["forget_trained_probes"] == 1
    manifest = json.loads((settings.store_config().open().fetch_directory(
        version.object_key, tmp_path / "v") / "oblivio_manifest.json").read_text())
    assert manifest["engine"] == "idk"
