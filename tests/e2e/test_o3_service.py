"""End to end through the service with the O3 engine, on the real bundled model.

Two o3 tickets (two people) -> two versions (v2 = v1's block + a new orthogonal block, each
with its detector) -> /v1/generate forgets both people on questions that were not in the
tickets, and still answers unrelated questions (the detectors keep them on the base model).
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
from workers.evaluation.metrics import is_correct
from workers.evaluation.probes import Probe, load_forget_set, load_unrelated_probes

pytestmark = pytest.mark.e2e

PEOPLE = ("charles_darwin", "albert_einstein")


def _rate(client: TestClient, headers: dict[str, str], probes: list[Probe],
          version: str | None = None) -> float:
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
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="e2e-o3")
        app.state.generator = deploy(serving_config(settings.worker_config()))
        yield settings, client, {"Authorization": f"Bearer {secret}"}
    from ray import serve

    serve.shutdown()


def test_two_o3_tickets_forget_both_people_and_keep_unrelated_answers(service):
    from workers.dispatcher import DispatcherLoop

    settings, client, headers = service
    held = {name: list(load_forget_set(name).held_out) for name in PEOPLE}
    unrelated = list(load_unrelated_probes())
    base = {name: _rate(client, headers, probes) for name, probes in held.items()}
    base_utility = _rate(client, headers, unrelated)
    assert all(rate >= 0.5 for rate in base.values()), base

    loop = DispatcherLoop(settings.worker_config())
    for name in PEOPLE:
        res = client.post("/v1/tickets", headers=headers,
                          json={**person_ticket(name), "engine": "o3"})
        assert res.status_code == 202, res.text
        assert loop.run_once() == 1
        ticket = client.get(f"/v1/tickets/{res.json()['id']}", headers=headers).json()
        assert ticket["status"] == "done", ticket

    versions = client.get("/v1/lineages/default/versions", headers=headers).json()
    v2 = next(v for v in versions if v["version"] == 2)
    assert v2["status"] == "ready", v2
    after = {name: _rate(client, headers, probes, version="v2") for name, probes in held.items()}
    utility = _rate(client, headers, unrelated, version="v2")
    print(f"o3 v2: held-out {base} -> {after}; unrelated {base_utility:.2f} -> {utility:.2f}")
    for name in PEOPLE:
        assert after[name] <= 0.2 * base[name], (name, after[name], base[name])
    assert utility >= 0.9 * base_utility

    # An operator withdraws Darwin's ticket: a version without its block, no training;
    # Darwin is answered again, Einstein stays forgotten, and the ticket says so.
    darwin = next(t for t in client.get("/v1/tickets", headers=headers).json()["items"]
                  if t["target"] == person_ticket("charles_darwin")["target"])
    res = client.post(f"/v1/tickets/{darwin['id']}/revoke", headers=headers,
                      json={"reason": "the request was withdrawn"})
    assert res.status_code == 202, res.text
    assert loop.run_once() == 1
    revoke = client.get(f"/v1/tickets/{res.json()['id']}", headers=headers).json()
    assert revoke["status"] == "done", revoke
    assert revoke["result_version"]["label"] == "default@v3"
    assert client.get(f"/v1/tickets/{darwin['id']}", headers=headers).json()["status"] \
        == "reopened"
    back = {name: _rate(client, headers, probes, version="v3") for name, probes in held.items()}
    print(f"o3 v3 (Darwin revoked): held-out {back}")
    assert back["charles_darwin"] >= 0.8 * base["charles_darwin"], back
    assert back["albert_einstein"] <= 0.2 * base["albert_einstein"], back
