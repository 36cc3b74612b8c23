"""End to end on the real bundled model: fine-tune on fictitious people, delete one of them.

HTTP API (datasets, finetune, delete_records ticket) -> durable queue -> dispatcher -> job
runner -> S3T engine -> object store + registry -> promotion -> Ray Serve -> /v1/generate.
Answers are read through /v1/generate itself.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction
from storage.models import Role
from tests.fixtures.people import people_records, qa_of
from workers.evaluation.metrics import is_correct

pytestmark = pytest.mark.e2e

PEOPLE = 8
VICTIM = "person-1"


def _answered(client: TestClient, headers: dict[str, str], qa: list[dict[str, Any]],
              version: str | None = None) -> dict[str, bool]:
    def ask(item: dict[str, Any]) -> tuple[str, bool]:
        res = client.post("/v1/generate", headers=headers,
                          json={"prompt": item["question"], "max_new_tokens": 24,
                                "lineage": "people", "version": version})
        assert res.status_code == 200, res.text
        return item["id"], is_correct(res.json()["text"], accepted=item["accept"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(pool.map(ask, qa))


def _rate(flags: dict[str, bool], ids: set[str]) -> float:
    return sum(flags[i] for i in ids) / len(ids)


@pytest.fixture
def service(tmp_path: Path, bundled_model, ray_cluster):
    from workers.runtime import serving_config
    from workers.serving import deploy

    settings = Settings(data_dir=tmp_path / "data", base_model=str(bundled_model.local_path),
                        num_workers=2, zero_stage=2, batch_window_seconds=0.0)
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="e2e")
        app.state.generator = deploy(serving_config(settings.worker_config()))
        yield settings, client, {"Authorization": f"Bearer {secret}"}
    from ray import serve

    serve.shutdown()


# The fine-tune alone took 684 s on a busy 2-core machine: more than the suite's 900 s.
@pytest.mark.timeout(2400)
def test_finetuned_people_are_answered_and_a_deleted_one_is_not(service):
    from workers.dispatcher import DispatcherLoop

    settings, client, headers = service
    records = people_records(PEOPLE)
    qa = qa_of(records)
    gone = {q["id"] for q in qa if q["subject_id"] == VICTIM}
    kept = {q["id"] for q in qa} - gone
    assert client.post("/v1/datasets", headers=headers,
                       json={"name": "people", "records": records}).status_code == 201
    assert client.post("/v1/lineages", headers=headers,
                       json={"name": "people", "engine": "s3t"}).status_code == 201
    res = client.post("/v1/lineages/people/finetune", headers=headers,
                      json={"dataset": "people", "engine": "s3t"})  # the defaults
    assert res.status_code == 202, res.text
    job_id = res.json()["job_id"]

    loop = DispatcherLoop(settings.worker_config())
    started = time.perf_counter()
    assert loop.run_once() == 1
    finetune_s = time.perf_counter() - started
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "succeeded", job
    before = _answered(client, headers, qa)
    print(f"fine-tune {finetune_s:.0f} s; answered {sum(before.values())}/{len(qa)}")
    assert sum(before.values()) >= 0.8 * len(qa)

    res = client.post("/v1/tickets", headers=headers,
                      json={"kind": "delete_records", "lineage": "people", "dataset": "people",
                            "subject_id": VICTIM})
    assert res.status_code == 202, res.text
    ticket_id = res.json()["id"]
    started = time.perf_counter()
    assert loop.run_once() == 1  # the deletion: no training
    delete_s = time.perf_counter() - started
    ticket = client.get(f"/v1/tickets/{ticket_id}", headers=headers).json()
    assert ticket["status"] == "done", ticket
    receipt = client.get(f"/v1/tickets/{ticket_id}/receipt", headers=headers).json()
    assert receipt["deleted_record_ids"] == sorted(gone)
    assert receipt["exactness"]["exact"] is True
    cut = _answered(client, headers, qa)
    print(f"deletion live in {delete_s:.1f} s; victim {_rate(cut, gone):.2f}, others "
          f"{_rate(cut, kept):.2f} (before {_rate(before, kept):.2f})")
    assert delete_s < 60
    assert _rate(cut, gone) == 0.0

    assert loop.run_once() == 1  # the background retrain of the cut layers
    versions = client.get("/v1/lineages/people/versions", headers=headers).json()
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert "live" in versions[-1]["aliases"]
    after = _answered(client, headers, qa)
    print(f"after retrain: victim {_rate(after, gone):.2f}, others {_rate(after, kept):.2f}")
    assert _rate(after, gone) == 0.0
    assert _rate(after, kept) >= 0.9 * _rate(before, kept)
