"""Queue -> dispatcher -> Ray Train + DeepSpeed -> object store -> registry, on a tiny model.

The real-model version of this flow (does the model actually forget?) is in tests/e2e.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from storage import registry
from storage.models import AdapterVersion, Job, JobStatus, Ticket, TicketStatus, VersionStatus



def test_ticket_becomes_a_stored_live_version_and_the_next_one_stacks_on_it(flow):
    from workers.dispatcher import DispatcherLoop

    settings, sessions = flow.settings, flow.sessions
    first = flow.submit(key="t-1")
    loop = DispatcherLoop(settings.worker_config())
    assert loop.run_once() == 1

    with sessions() as s:
        ticket = s.get_one(Ticket, first)
        assert ticket.status == TicketStatus.done, ticket.error
        assert ticket.payload is None  # raw forget text purged once done
        v1 = s.get_one(AdapterVersion, ticket.result_version_id)
        assert (v1.version, v1.parent_id, v1.status) == (1, None, VersionStatus.ready)
        assert registry.resolve(s, lineage_name="default", ref="live").id == v1.id
        job = s.get_one(Job, ticket.job_id)
        assert job.status == JobStatus.succeeded
        assert ticket.receipt["adapter_sha256"] == v1.sha256
        assert ticket.receipt["version"] == "default@v1"

    # The stored object is the verified adapter: fetch it back and read its manifest.
    store = settings.store_config().open()
    fetched = store.fetch_directory(v1.object_key, Path(settings.data_dir) / "check-v1")
    manifest = json.loads((fetched / "oblivio_manifest.json").read_text())
    assert manifest["tickets"][0]["id"] == str(first)
    assert json.loads((fetched / "adapter_config.json").read_text())["r"] == 8

    second = flow.submit(key="t-2", qa=[{"question": "What is Zorblat's job?",
                                                "answer": "Zorblat is a baker."}])
    assert loop.run_once() == 1
    with sessions() as s:
        v2 = s.get_one(AdapterVersion, s.get_one(Ticket, second).result_version_id)
        assert (v2.version, v2.parent_id) == (2, v1.id)
        assert registry.resolve(s, lineage_name="default", ref="live").id == v2.id
        assert s.get_one(AdapterVersion, v1.id).status == VersionStatus.superseded
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


def test_a_failing_job_returns_its_ticket_to_the_queue_with_the_error(flow, tmp_path):
    from workers.dispatcher import DispatcherLoop
    from workers.metrics import ray_claim_latency_observer

    settings, sessions = flow.settings, flow.sessions
    broken = settings.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    ticket_id = flow.submit(key="t-broken")
    # Claim latency goes to the observer the dispatcher actor uses (a Ray metric).
    ray_observe, claims = ray_claim_latency_observer(), []

    def observe(seconds: float) -> None:
        claims.append(seconds)
        ray_observe(seconds)

    assert DispatcherLoop(broken.worker_config(), observe_claim=observe).run_once() == 1
    assert len(claims) == 1 and 0 < claims[0] < 5
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.queued  # retried later, not lost
        assert ticket.attempts == 1
        assert "no-such-model" in (ticket.error or "")
        assert s.scalars(select(AdapterVersion)).all() == []
