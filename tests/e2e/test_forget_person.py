"""End to end on the real bundled model: a ticket makes the served model forget a person.

HTTP API -> durable queue -> dispatcher -> Ray Train (2 workers) + DeepSpeed ZeRO-2 ->
object store + registry -> promotion -> Ray Serve -> /v1/generate. Rates are measured
through /v1/generate itself, before (base model: the lineage has no live version yet)
and after, on questions that were NOT in the ticket.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction
from storage.models import Role
from tests.fixtures.training import person_ticket
from tests.fixtures.workers import serve_app_shut_down_after
from workers.evaluation.metrics import is_correct
from workers.evaluation.report import ReportConfig, verdict
from workers.evaluation.probes import Probe, load_forget_set, load_unrelated_probes

pytestmark = pytest.mark.e2e

FIRST_PERSON = "charles_darwin"
SECOND_PERSON = "albert_einstein"


def _rate(client: TestClient, headers: dict[str, str], probes: list[Probe],
          version: str | None = None) -> float:
    """Correct-answer rate through /v1/generate; concurrent requests, as real clients send."""

    def ask(probe: Probe) -> bool:
        res = client.post("/v1/generate", headers=headers,
                          json={"prompt": probe.question, "max_new_tokens": 32,
                                "version": version})
        assert res.status_code == 200, res.text
        return is_correct(res.json()["text"], accepted=probe.accept)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(ask, probes)) / len(probes)


@pytest.fixture
def service(tmp_path: Path, bundled_model, ray_cluster):
    from workers.runtime import serving_config
    from workers.serving import deploy

    settings = Settings(data_dir=tmp_path / "data", base_model=str(bundled_model.local_path),
                        num_workers=2, zero_stage=2, batch_window_seconds=0.0)
    app = create_app(settings)
    with TestClient(app) as client, serve_app_shut_down_after():
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="e2e")
        app.state.generator = deploy(serving_config(settings.worker_config()))
        yield settings, client, {"Authorization": f"Bearer {secret}"}


def test_a_ticket_makes_the_served_model_forget_a_person_and_keep_the_rest(service):
    from workers.dispatcher import DispatcherLoop

    settings, client, headers = service
    person = load_forget_set(FIRST_PERSON)
    held_out = list(person.held_out)
    unrelated = list(load_unrelated_probes())
    assert len(unrelated) >= 20

    base_forget = _rate(client, headers, held_out)
    base_utility = _rate(client, headers, unrelated)
    assert base_forget >= 0.5, "the base model must know the person for the test to mean much"

    res = client.post("/v1/tickets", headers=headers,
                      json={**person_ticket(FIRST_PERSON), "engine": "idk"})
    assert res.status_code == 202, res.text
    ticket_id = res.json()["id"]

    loop = DispatcherLoop(settings.worker_config())
    assert loop.run_once() == 1
    ticket = client.get(f"/v1/tickets/{ticket_id}", headers=headers).json()
    assert ticket["status"] == "done", ticket
    versions = client.get("/v1/lineages/default/versions", headers=headers).json()
    v1 = next(v for v in versions if v["version"] == 1)
    assert v1["status"] == "ready"

    after_forget = _rate(client, headers, held_out)
    after_utility = _rate(client, headers, unrelated)
    print(f"held-out about {person.target}: {base_forget:.2f} -> {after_forget:.2f}; "
          f"unrelated: {base_utility:.2f} -> {after_utility:.2f}")
    assert after_forget <= 0.2 * base_forget
    assert after_utility >= 0.9 * base_utility

    receipt = client.get(f"/v1/tickets/{ticket_id}/receipt", headers=headers)
    assert receipt.status_code == 200, receipt.text
    proof = receipt.json()
    # The receipt names the version that answers now, by id and content hash.
    assert (proof["version_id"], proof["version"]) == (v1["id"], "default@v1"), proof
    assert proof["adapter_sha256"] == v1["sha256"] and proof["live"] is True, proof
    assert proof["base_model_sha256"] == v1["base_model_sha256"], proof

    # A second request on the same lineage builds version 2 on top of version 1.
    res = client.post("/v1/tickets", headers=headers,
                      json={**person_ticket(SECOND_PERSON), "engine": "idk"})
    assert res.status_code == 202, res.text
    assert loop.run_once() == 1
    versions = client.get("/v1/lineages/default/versions", headers=headers).json()
    v2 = next(v for v in versions if v["version"] == 2)
    assert v2["parent_id"] == v1["id"] and v2["status"] == "ready"
    # Promoted or held as a candidate, by its own recorded evaluation: the verdict is the
    # one its figures give, the aliases follow the verdict, and its ticket says which.
    m2 = v2["metrics"]
    assert m2["verdict"] == verdict(m2["forget_ratio"], m2["utility_ratio"], ReportConfig()), m2
    expected_alias, expected = {"pass": (["live"], "done"),
                                "hold": (["candidate"], "awaiting_review")}[m2["verdict"]]
    assert v2["aliases"] == expected_alias, v2
    second = client.get(f"/v1/tickets/{res.json()['id']}", headers=headers).json()
    assert second["status"] == expected, second
    # The first person stays forgotten under version 2 (continual unlearning), asked of v2
    # itself whether or not it went live.
    under_v2 = _rate(client, headers, held_out, version="v2")
    print(f"held-out about {person.target} under v2: {under_v2:.2f}; v2 evaluation: "
          f"{v2['metrics']['verdict']} (utility {v2['metrics']['utility_ratio']:.2f} of base)")
    assert under_v2 <= 0.2 * base_forget

