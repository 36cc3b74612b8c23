"""/v1/jobs: operators see every job; a submitter only jobs serving their own tickets."""

from __future__ import annotations

import uuid

from storage.db import transaction
from storage.models import Job, JobStatus, Lineage


def _job_for(api, ticket_id: str, **values) -> str:
    with transaction(api.db.sessions) as s:
        lineage = s.query(Lineage).filter_by(name="default").one()
        job = Job(lineage_id=lineage.id, engine="idk", ticket_ids=[ticket_id],
                  status=JobStatus.running, progress={"phase": "training", "step": 3,
                                                      "max_steps": 10}, **values)
        s.add(job)
        s.flush()
        return str(job.id)


def _ticket(api, role: str) -> str:
    body = {"kind": "forget", "target": "X", "forget": {"qa": [{"question": "Q?",
                                                                "answer": "A"}]}}
    r = api.client.post("/v1/tickets", json=body, headers=api.headers(role))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_job_shows_progress_to_its_submitter_and_operators(api) -> None:
    mine = _job_for(api, _ticket(api, "submitter"))
    others = _job_for(api, _ticket(api, "admin"))

    r = api.client.get(f"/v1/jobs/{mine}", headers=api.headers("submitter"))
    assert r.status_code == 200
    body = r.json()
    assert body["lineage"] == "default" and body["status"] == "running"
    assert body["progress"] == {"phase": "training", "step": 3, "max_steps": 10}

    # Someone else's job looks absent to a submitter, present to an operator.
    assert api.client.get(f"/v1/jobs/{others}",
                          headers=api.headers("submitter")).status_code == 404
    assert api.client.get(f"/v1/jobs/{others}",
                          headers=api.headers("operator")).json()["id"] == others
    assert api.client.get(f"/v1/jobs/{uuid.uuid4()}",
                          headers=api.headers("operator")).status_code == 404


def test_job_list_is_for_operators_and_filters_by_status(api) -> None:
    running = _job_for(api, _ticket(api, "admin"))
    failed = _job_for(api, _ticket(api, "admin"), error="boom")
    with transaction(api.db.sessions) as s:
        s.get_one(Job, uuid.UUID(failed)).status = JobStatus.failed

    assert api.client.get("/v1/jobs", headers=api.headers("submitter")).status_code == 403
    r = api.client.get("/v1/jobs?status=failed", headers=api.headers("operator"))
    assert r.status_code == 200
    assert [j["id"] for j in r.json()["items"]] == [failed]
    assert r.json()["items"][0]["error"] == "boom"
    everything = api.client.get("/v1/jobs", headers=api.headers("operator")).json()["items"]
    assert {j["id"] for j in everything} == {running, failed}


def test_a_failed_jobs_trace_is_for_operators_its_submitter_reads_the_cause(api) -> None:
    error = ("ActorDiedError: The actor died unexpectedly before finishing this task.\n\n"
             "Traceback (most recent call last):\n  File \"/srv/oblivio/workers/x.py\"")
    job = _job_for(api, _ticket(api, "submitter"), error=error)
    mine = api.client.get(f"/v1/jobs/{job}", headers=api.headers("submitter")).json()
    assert mine["error"] == ("ActorDiedError: The actor died unexpectedly before finishing "
                             "this task.")
    full = api.client.get(f"/v1/jobs/{job}", headers=api.headers("operator")).json()
    assert full["error"] == error
