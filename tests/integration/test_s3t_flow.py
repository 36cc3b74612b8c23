"""S3T through the product path on a tiny model: API -> durable queue -> dispatcher -> job
runner -> engine -> object store + registry -> live, for a fine-tune, a deletion and the
background retrain it queues."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction
from storage.models import Role
from tests.fixtures.people import people_records


@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path):
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db'}",
                        object_store=f"file://{tmp_path / 'objects'}",
                        base_model=str(tiny_model_dir), batch_window_seconds=0.0)
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="it")
        yield settings, client, {"Authorization": f"Bearer {secret}"}


def test_finetune_delete_and_retrain_through_the_queue(service) -> None:
    from workers.dispatcher import DispatcherLoop

    settings, client, h = service
    assert client.post("/v1/datasets", headers=h, json={
        "name": "people", "records": people_records(6)}).status_code == 201
    assert client.post("/v1/lineages", headers=h,
                       json={"name": "people", "engine": "s3t"}).status_code == 201
    res = client.post("/v1/lineages/people/finetune", headers=h, json={
        "dataset": "people", "shards": 2, "slices": 2, "sequences_per_shard": 2,
        "options": {"epochs": 1, "batch_size": 4, "eval_records": 2}})
    assert res.status_code == 202, res.text
    job_id = res.json()["job_id"]
    loop = DispatcherLoop(settings.worker_config())
    assert loop.run_once() == 1
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["status"] == "succeeded", job
    dataset = client.get("/v1/datasets/people", headers=h).json()
    assert dataset["num_shards"] == 2 and sum(s["records"] for s in dataset["shards"]) == 12

    res = client.post("/v1/tickets", headers=h, json={
        "kind": "delete_records", "lineage": "people", "dataset": "people",
        "subject_id": "person-3"})
    assert res.status_code == 202, res.text
    ticket_id = res.json()["id"]
    assert loop.run_once() == 1
    ticket = client.get(f"/v1/tickets/{ticket_id}", headers=h).json()
    assert ticket["status"] == "done", ticket
    receipt = client.get(f"/v1/tickets/{ticket_id}/receipt", headers=h).json()
    assert receipt["deleted_record_ids"] == ["person-3-job", "person-3-town"]
    assert receipt["exactness"]["exact"] is True
    assert receipt["version"] == "people@v2"
    assert client.get("/v1/datasets/people", headers=h).json()["deleted_records"] == 2

    queued = client.get("/v1/tickets", headers=h, params={"status": "queued"}).json()["items"]
    assert [t["kind"] for t in queued] == ["finetune"], "the retrain was queued"
    assert loop.run_once() == 1
    versions = client.get("/v1/lineages/people/versions", headers=h).json()
    assert [v["version"] for v in versions] == [1, 2, 3]
    v3 = versions[-1]
    assert "live" in v3["aliases"] and v3["parent_id"] == versions[1]["id"]
    assert v3["metrics"]["training"]["prefixes_reused"] > 0
    # Fine-tune and retrain trained on the DeepSpeed ranks (the service's default trainer).
    assert versions[0]["metrics"]["training"]["trainer"] == "deepspeed"
    assert v3["metrics"]["training"]["trainer"] == "deepspeed"

    # No way back to the model that saw the deleted records: v1 (before the deletion) may
    # neither be rolled back to nor promoted; v2 (cut before them) may.
    assert client.post("/v1/lineages/people/rollback", headers=h).json()["version"] == 2
    res = client.post("/v1/lineages/people/rollback", headers=h)
    assert res.status_code == 409 and "deleted record" in res.json()["detail"], res.text
    res = client.post("/v1/lineages/people/promote", headers=h, json={"version": 1})
    assert res.status_code == 409, res.text
    assert "2 record(s) deleted since" in res.json()["detail"]
    live = [v for v in client.get("/v1/lineages/people/versions", headers=h).json()
            if "live" in v["aliases"]]
    assert [v["version"] for v in live] == [2]
    res = client.post("/v1/generate", headers=h,
                      json={"prompt": "Who is person-3?", "lineage": "people", "version": "1"})
    assert res.status_code == 409 and "deleted record" in res.json()["detail"], res.text
