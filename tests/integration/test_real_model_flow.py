"""The job path on the real bundled model, kept short enough for every CI run.

What the tiny model cannot show: the converted SmolLM2 weights, its tokenizer and chat
template, DeepSpeed ZeRO-2 over its real layers, and evaluation on the shipped probes. How
well it forgets is tests/e2e's question (slow); this checks what a user sees of the
versions: v1 stored and registered against the base model's hash, an operator promoting
it, and v2 built on top of it.
"""

from __future__ import annotations

import pytest

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction
from storage.models import Role
from tests.fixtures.training import person_ticket
from workers.evaluation.report import ReportConfig, verdict


def test_real_model_tickets_become_versions_and_the_second_stacks_on_the_first(
        tmp_path: Path, bundled_model, ray_cluster) -> None:
    from workers.dispatcher import DispatcherLoop

    settings = Settings(data_dir=tmp_path / "data", base_model=str(bundled_model.local_path),
                        num_workers=2, zero_stage=2, batch_window_seconds=0.0,
                        # Without auto-promotion the outcome is one, whatever four steps
                        # did: v1 waits as candidate until an operator promotes it.
                        auto_promote=False,
                        recipe={"max_steps": 4, "eval_every": 0, "retain_prompts": 4,
                                "retain_max_new_tokens": 16},
                        # the version report, kept small: this checks the path, not quality
                        # (32 new tokens: the probe sets' answers were checked at 32; at 16
                        # the base model is cut off before it names the answer)
                        evaluation={"max_utility": 12, "max_neighbours": 4, "max_general": 4,
                                    "max_new_tokens": 32})
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="real-model")
        headers = {"Authorization": f"Bearer {secret}"}
        loop = DispatcherLoop(settings.worker_config())

        first = client.post("/v1/tickets", headers=headers, json=person_ticket("charles_darwin", 4))
        assert first.status_code == 202, first.text
        assert loop.run_once() == 1
        ticket = client.get(f"/v1/tickets/{first.json()['id']}", headers=headers).json()
        assert ticket["status"] == "awaiting_review", ticket
        versions = client.get("/v1/lineages/default/versions", headers=headers).json()
        (v1,) = versions
        assert v1["status"] == "ready" and v1["parent_id"] is None
        assert v1["base_model_sha256"] == bundled_model.sha256
        # The job evaluated held-out forms of its ticket's 4 questions (and the questions
        # themselves, reported apart), the shipped unrelated probes and the general set.
        assert v1["metrics"]["forget_trained_probes"] == 4
        assert v1["metrics"]["forget_probes"] >= 4 and v1["metrics"]["utility_probes"] == 12
        assert v1["metrics"]["general_probes"] == 4 and v1["metrics"]["verdict"]
        assert v1["metrics"]["training"]["steps"] == 4

        metrics = v1["metrics"]
        # The base model knows what the ticket asks to forget, in the held-out forms the
        # verdict is measured on and in the ticket's own questions (else nothing is
        # measured), and the recorded verdict is the one its own figures give.
        assert metrics["forget_rate_before"] >= 0.5, metrics
        assert metrics["forget_trained_rate_before"] >= 0.5, metrics
        assert metrics["verdict"] == verdict(metrics["forget_ratio"], metrics["utility_ratio"],
                                             ReportConfig()), metrics
        assert metrics["verdict"] != "reject" and v1["aliases"] == ["candidate"], v1

        # An operator promotes it; the ticket is done exactly when its version is live.
        promoted = client.post("/v1/lineages/default/promote", headers=headers,
                               json={"version": 1})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["aliases"] == ["live"]
        ticket = client.get(f"/v1/tickets/{first.json()['id']}", headers=headers).json()
        assert ticket["status"] == "done", ticket

        second = client.post("/v1/tickets", headers=headers,
                             json=person_ticket("albert_einstein", 4))
        assert second.status_code == 202, second.text
        assert loop.run_once() == 1
        versions = client.get("/v1/lineages/default/versions", headers=headers).json()
        v2 = next(v for v in versions if v["version"] == 2)
        assert v2["status"] == "ready" and v2["parent_id"] == v1["id"]
        receipt = client.get(f"/v1/tickets/{second.json()['id']}/receipt", headers=headers)
        assert receipt.status_code == 200, receipt.text
        proof = receipt.json()
        assert proof["version_id"] == v2["id"] and proof["version"] == "default@v2"
        assert proof["base_model_sha256"] == bundled_model.sha256
