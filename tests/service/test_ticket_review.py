"""A ticket says `done` only while the live model contains its forgetting (issue 15).

The job runs through the real dispatcher and job runner (claim, version, object store,
verdict, promotion, completion) on the real app's database; only the model side (training
and evaluation) is replaced by a stand-in whose evaluation figures the test chooses, so that
one version passes and another is held back.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import Api, make_settings, start_api

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)

PASSING = {"forget_rate_before": 1.0, "forget_rate_after": 0.0, "forget_ratio": 0.0,
           "utility_rate_before": 1.0, "utility_rate_after": 0.95, "utility_ratio": 0.95}
HELD = {"forget_rate_before": 1.0, "forget_rate_after": 0.67, "forget_ratio": 0.67,
        "utility_rate_before": 1.0, "utility_rate_after": 0.79, "utility_ratio": 0.79}


class FakeBase:
    name = "fake-base"
    sha256 = "ab" * 32
    local_path = Path("/nonexistent")


def _judged(figures: dict[str, float]) -> dict[str, Any]:
    """What the shared forgetting evaluation returns for these figures: verdict and checks."""
    from workers.evaluation.report import ReportConfig, verdict

    config = ReportConfig()
    checks = []
    for name, op, threshold in (("forget_ratio", "<=", config.max_forget_ratio),
                                ("utility_ratio", ">=", config.min_utility_ratio)):
        base = name.removesuffix("_ratio")
        value = figures[name]
        checks.append({"name": name, "before": figures[f"{base}_rate_before"],
                       "after": figures[f"{base}_rate_after"], "value": value, "op": op,
                       "threshold": threshold,
                       "passed": value <= threshold if op == "<=" else value >= threshold})
    return {**figures, "checks": checks,
            "verdict": verdict(figures["forget_ratio"], figures["utility_ratio"], config)}


@pytest.fixture
def model_side(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, float]]:
    """Replace training and evaluation; `figures["next"]` is what the next job measures."""
    from workers import job_compute
    from workers.engines.base import Artifacts
    from workers.engines.lora_methods.engine import LoraMethodEngine

    figures: dict[str, dict[str, float]] = {"next": PASSING}

    def train(self: Any, job: Any, progress: Any) -> Any:
        job.output_dir.mkdir(parents=True)
        (job.output_dir / "adapter_model.safetensors").write_bytes(uuid.uuid4().bytes)
        return Artifacts(version_dir=job.output_dir, metrics={"steps": 1},
                         method_config={"engine": "idk"}, peft_config={"r": 8})

    monkeypatch.setattr(job_compute, "resolve_base", lambda config: FakeBase())
    monkeypatch.setattr(LoraMethodEngine, "train", train)
    monkeypatch.setattr(job_compute, "evaluate_version",
                        lambda *a, **k: _judged(figures["next"]))
    return figures


def run_one_job(api: Api) -> None:
    import dataclasses

    from workers.dispatcher import DispatcherLoop

    # trainer "plain": the job is trained and evaluated in this process, where the stand-in
    # model side is patched in (with "deepspeed" the evaluation runs on a Ray actor).
    config = dataclasses.replace(api.settings.worker_config(), trainer="plain")
    assert DispatcherLoop(config).run_once() == 1


def submit(api: Api, target: str) -> str:
    body = {"kind": "forget", "target": target, "engine": "idk",  # model_side patches idk
            "forget": {"qa": [{"question": f"Who is {target}?", "answer": target}]}}
    r = api.client.post("/v1/tickets", json=body, headers=api.headers())
    assert r.status_code == 202, r.text
    return r.json()["id"]


def show(api: Api, ticket_id: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/tickets/{ticket_id}", headers=api.headers())
    assert r.status_code == 200, r.text
    return r.json()


def receipt(api: Api, ticket_id: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/tickets/{ticket_id}/receipt", headers=api.headers())
    assert r.status_code == 200, r.text
    return r.json()


def events(ticket: dict[str, Any]) -> list[str]:
    return [e["event"] for e in ticket["timeline"]]


def listed(api: Api, status: str) -> list[str]:
    r = api.client.get(f"/v1/tickets?status={status}", headers=api.headers())
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["items"]]


def tickets_metric(api: Api, status: str) -> float:
    text = api.client.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith(f'oblivio_tickets{{status="{status}"}}'))
    return float(line.split()[-1])


@BOTH
def test_held_version_waits_for_review_then_promote_makes_it_done_and_rollback_reopens_it(
        api: Api, model_side: dict[str, dict[str, float]]) -> None:
    # A passing version goes live and its ticket is done at once.
    first = submit(api, "Ada Lovelace")
    run_one_job(api)
    t1 = show(api, first)
    assert t1["status"] == "done" and t1["result_version"]["label"] == "default@v1"
    assert t1["review"] is None
    r1 = receipt(api, first)
    assert r1["live"] is True and r1["live_version"] == "default@v1" and r1["done_at"]
    assert events(t1)[-1] == "done"

    # A held version stays a candidate; its ticket waits, showing why, and is not done.
    model_side["next"] = HELD
    second = submit(api, "Alan Turing")
    run_one_job(api)
    t2 = show(api, second)
    assert t2["status"] == "awaiting_review", t2
    assert t2["result_version"]["label"] == "default@v2"
    review = t2["review"]
    assert review["verdict"] == "hold"
    held = {c["name"]: c for c in review["held_back_by"]}
    assert set(held) == {"forget_ratio", "utility_ratio"}
    assert held["utility_ratio"]["value"] == pytest.approx(0.79)
    assert held["utility_ratio"]["threshold"] == 0.9 and held["utility_ratio"]["op"] == ">="
    assert "utility_ratio 0.79" in review["reason"]
    assert events(t2)[-1] == "awaiting_review"
    r2 = receipt(api, second)
    assert r2["status"] == "awaiting_review"
    assert r2["live"] is False and r2["promoted"] is False and r2["done_at"] is None
    assert r2["live_version"] == "default@v1" and r2["version"] == "default@v2"
    assert r2["review"]["verdict"] == "hold"
    assert listed(api, "awaiting_review") == [second]
    assert tickets_metric(api, "awaiting_review") == 1.0
    assert tickets_metric(api, "done") == 1.0
    with api.db.sessions() as s:  # kept while waiting: a reviewer may send it back
        from storage.models import Ticket
        assert s.get(Ticket, uuid.UUID(second)).payload is not None

    # An operator's promote makes it done, at that moment, in its timeline and receipt.
    r = api.client.post("/v1/lineages/default/promote", json={"version": 2},
                        headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    t2 = show(api, second)
    assert t2["status"] == "done" and t2["review"] is None and t2["error"] is None
    done_event = t2["timeline"][-1]
    assert done_event["event"] == "done" and done_event["detail"]["action"] == "promote"
    assert done_event["detail"]["from_status"] == "awaiting_review"
    r2 = receipt(api, second)
    assert r2["live"] is True and r2["live_version"] == "default@v2"
    # The receipt's done_at and the timeline's event are written in the same transaction,
    # microseconds apart: equal within a second (not to the second, which can roll over).
    from datetime import datetime

    gap = (datetime.fromisoformat(r2["done_at"]).replace(tzinfo=None)
           - datetime.fromisoformat(done_event["at"]).replace(tzinfo=None))
    assert abs(gap.total_seconds()) < 1.0
    assert listed(api, "awaiting_review") == []
    # v2 is stacked on v1: the first ticket is still forgotten by live.
    assert show(api, first)["status"] == "done"

    # Rolling live back past v2 reopens its ticket, visibly; v1's ticket stays done.
    r = api.client.post("/v1/lineages/default/rollback", headers=api.headers("operator"))
    assert r.status_code == 200 and r.json()["label"] == "default@v1"
    t2 = show(api, second)
    assert t2["status"] == "reopened"
    reopened = t2["timeline"][-1]
    assert reopened["event"] == "reopened"
    assert reopened["detail"] == {"action": "rollback", "from": "default@v2",
                                  "to": "default@v1", "live": False,
                                  "version_id": t2["result_version"]["id"]}
    assert "default@v2" in t2["error"] and "default@v1" in t2["error"]
    r2 = receipt(api, second)
    assert r2["live"] is False and r2["status"] == "reopened" and r2["reopened_at"]
    assert show(api, first)["status"] == "done"
    assert listed(api, "reopened") == [second]
    assert tickets_metric(api, "reopened") == 1.0

    # Rolling forward again closes it again.
    r = api.client.post("/v1/lineages/default/promote", json={"version": 2},
                        headers=api.headers("operator"))
    assert r.status_code == 200
    assert show(api, second)["status"] == "done"
    assert receipt(api, second)["live"] is True


def test_revoking_a_held_version_requeues_or_fails_its_tickets_with_the_reason(
        api: Api, model_side: dict[str, dict[str, float]]) -> None:
    model_side["next"] = HELD
    first = submit(api, "Grace Hopper")
    run_one_job(api)
    version_id = show(api, first)["result_version"]["id"]
    r = api.client.post(f"/v1/versions/{version_id}/revoke",
                        json={"reason": "forgets too little"}, headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    t = show(api, first)
    assert t["status"] == "queued" and t["result_version"] is None
    assert "forgets too little" in t["error"] and t["timeline"][-1]["event"] == "requeued"

    # Trained again (the forget set was kept), held again; this time the operator gives up.
    run_one_job(api)
    t = show(api, first)
    assert t["status"] == "awaiting_review" and t["attempts"] == 2
    r = api.client.post(f"/v1/versions/{t['result_version']['id']}/revoke",
                        json={"reason": "not good enough", "tickets": "fail"},
                        headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    t = show(api, first)
    assert t["status"] == "failed" and "not good enough" in t["error"]
    assert t["summary"] is None  # final: the forget set is gone


def test_revoking_the_live_version_reopens_its_done_ticket(
        api: Api, model_side: dict[str, dict[str, float]]) -> None:
    first = submit(api, "Edsger Dijkstra")
    run_one_job(api)
    t = show(api, first)
    assert t["status"] == "done"
    r = api.client.post(f"/v1/versions/{t['result_version']['id']}/revoke",
                        json={"reason": "broke generation"}, headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    t = show(api, first)
    assert t["status"] == "reopened"
    assert "broke generation" in t["error"] and "file the request again" in t["error"]
    assert [e["event"] for e in t["timeline"]][-2:] == ["reopened", "reopened"]
    assert receipt(api, first)["live"] is False


def test_without_auto_promotion_a_passing_version_waits_for_review(
        db: Any, tmp_path: Path, model_side: dict[str, dict[str, float]]) -> None:
    for api in start_api(db, make_settings(tmp_path, db.url, auto_promote=False)):
        ticket = submit(api, "Niklaus Wirth")
        run_one_job(api)
        t = show(api, ticket)
        assert t["status"] == "awaiting_review"
        assert t["review"]["verdict"] == "pass" and t["review"]["held_back_by"] == []
        assert "auto-promotion is off" in t["review"]["reason"]
        assert api.client.post("/v1/lineages/default/promote", json={"version": 1},
                               headers=api.headers("operator")).status_code == 200
        assert show(api, ticket)["status"] == "done"


def test_cli_lists_tickets_awaiting_review_and_shows_why(
        live_server: Any, model_side: dict[str, dict[str, float]]) -> None:
    from tests.service.test_cli import oblivio

    model_side["next"] = HELD
    ticket = submit(live_server.api, "Barbara Liskov")
    run_one_job(live_server.api)
    listed = oblivio(live_server, "ticket", "list", "--status", "awaiting_review")
    assert listed.exit_code == 0, listed.output
    assert ticket in listed.stdout and "awaiting_review" in listed.stdout
    shown = oblivio(live_server, "ticket", "show", ticket)
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.stdout.split())
    assert "verdict hold" in out and "utility_ratio 0.79 (needs >= 0.9" in out
    assert "FAILED" in out and "timeline" in out and "awaiting_review" in out
