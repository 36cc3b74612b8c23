"""/v1/datasets, /v1/lineages/{name}/finetune and delete_records validation, on real DBs."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from sqlalchemy import select

from storage.db import transaction
from storage.models import Job, JobStatus, Record, Ticket, TicketKind, TicketStatus
from tests.fixtures.datasets import register_s3t_lineage
from tests.fixtures.people import people_records
from tests.service.conftest import Api

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)


@BOTH
def test_register_json_and_jsonl_then_read_counts_and_hashes(api: Api) -> None:
    h = api.headers("operator")
    records = people_records(3)
    r = api.client.post("/v1/datasets", json={"name": "people", "records": records[:4]},
                        headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["records"] == 4 and r.json()["subjects"] == 2
    assert r.json()["num_shards"] is None and r.json()["shards"] == []
    jsonl = "\n".join(json.dumps(x) for x in records[4:]) + "\n\n"
    r = api.client.post("/v1/datasets", params={"name": "people"}, content=jsonl,
                        headers={**h, "Content-Type": "application/jsonl"})
    assert r.status_code == 200, r.text
    got = api.client.get("/v1/datasets/people", headers=h).json()
    assert (got["records"], got["subjects"], got["deleted_records"]) == (6, 3, 0)
    with transaction(api.db.sessions) as s:
        row = s.scalar(select(Record).where(Record.record_id == records[0]["id"]))
        content = {"prompt": records[0]["prompt"], "response": records[0]["response"]}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        assert row.content_sha256 == hashlib.sha256(canonical.encode()).hexdigest()
        assert row.subject_id == "person-0"
    assert api.client.get("/v1/datasets/nope", headers=h).status_code == 404


@BOTH
def test_duplicate_and_malformed_records_are_refused_naming_them(api: Api) -> None:
    h = api.headers()
    rec = {"id": "r1", "text": "hello"}
    r = api.client.post("/v1/datasets", json={"name": "d", "records": [rec, rec]}, headers=h)
    assert r.status_code == 422 and "'r1'" in r.json()["message"]
    assert api.client.post("/v1/datasets", json={"name": "d", "records": [rec]},
                           headers=h).status_code == 201
    r = api.client.post("/v1/datasets", json={"name": "d", "records": [rec]}, headers=h)
    assert r.status_code == 409 and "'r1'" in r.json()["message"]
    r = api.client.post("/v1/datasets", json={"name": "d", "records": [
        {"id": "r2", "prompt": "q"}]}, headers=h)
    assert r.status_code == 422 and "both prompt and response" in r.json()["message"]
    r = api.client.post("/v1/datasets", json={"name": "d", "records": [
        {"id": "r3", "text": "t", "prompt": "q", "response": "a"}]}, headers=h)
    assert r.status_code == 422 and "either text or prompt" in r.json()["message"]
    r = api.client.post("/v1/datasets", params={"name": "d"}, content='{"id": "r4", "text": "x"}\n{oops',
                        headers={**h, "Content-Type": "application/jsonl"})
    assert r.status_code == 422 and "line 2" in r.json()["message"]
    r = api.client.post("/v1/datasets", content='{"id": "r4", "text": "x"}',
                        headers={**h, "Content-Type": "application/jsonl"})
    assert r.status_code == 422 and "?name=" in r.json()["message"]
    assert api.client.post("/v1/datasets", json={"name": "d", "records": [rec]},
                           headers=api.headers("submitter")).status_code == 403


@BOTH
def test_finetune_is_a_queued_internal_ticket_with_a_job_id(api: Api) -> None:
    out = register_s3t_lineage(api, dataset="people", records=people_records(4))
    assert out["engine"] == "s3t" and out["status"] == "queued"
    with transaction(api.db.sessions) as s:
        ticket = s.get(Ticket, uuid.UUID(out["ticket_id"]))
        job = s.get(Job, uuid.UUID(out["job_id"]))
        assert ticket.kind is TicketKind.finetune and ticket.status is TicketStatus.queued
        assert ticket.job_id == job.id and job.status is JobStatus.pending
        assert ticket.payload["options"] == {"shards": 1, "slices": 2,
                                             "sequences_per_shard": 2}
    shown = api.client.get(f"/v1/tickets/{out['ticket_id']}", headers=api.headers()).json()
    assert shown["kind"] == "finetune" and shown["summary"]["dataset"] == "people"
    h = api.headers()
    bad = {
        "unknown dataset": ({"dataset": "nope"}, 404, "unknown dataset 'nope'"),
        "too many sequences": ({"dataset": "people", "slices": 2, "sequences_per_shard": 3},
                               422, "orderings"),
        "unknown option": ({"dataset": "people", "options": {"epoch": 3}}, 422, "option(s): epoch;"),
        "other engine": ({"dataset": "people", "engine": "o3"}, 422, "s3t"),
    }
    for name, (body, status, text) in bad.items():
        r = api.client.post("/v1/lineages/people/finetune", json=body, headers=h)
        assert r.status_code == status and text in r.json()["message"], (name, r.text)
    r = api.client.post("/v1/lineages/nolineage/finetune", json={"dataset": "people"}, headers=h)
    assert r.status_code == 404


@BOTH
def test_delete_records_names_unknown_ids_and_subjects(api: Api) -> None:
    register_s3t_lineage(api, dataset="people", records=people_records(4))
    h = api.headers("submitter")
    base = {"kind": "delete_records", "lineage": "people", "dataset": "people"}
    r = api.client.post("/v1/tickets", json={**base, "record_ids": ["person-1-job", "zz-9"]},
                        headers=h)
    assert r.status_code == 422 and "'zz-9'" in r.json()["message"]
    assert "person-1-job" not in r.json()["message"]
    r = api.client.post("/v1/tickets", json={**base, "subject_id": "ghost"}, headers=h)
    assert r.status_code == 422 and "'ghost'" in r.json()["message"]
    r = api.client.post("/v1/tickets", json={**base, "dataset": "other", "subject_id": "p"},
                        headers=h)
    assert r.status_code == 404 and "'other'" in r.json()["message"]
    r = api.client.post("/v1/tickets", json={**base, "subject_id": "person-2"}, headers=h)
    assert r.status_code == 202, r.text
    assert r.json()["engine"] == "s3t"
    # a lineage that was never fine-tuned on a dataset cannot delete records
    r = api.client.post("/v1/tickets", json={**base, "lineage": "default",
                                             "subject_id": "person-2"}, headers=h)
    assert r.status_code == 422 and "not fine-tuned" in r.json()["message"]
