"""GET /v1/jobs/{id} breaks a job's time down by phase (issue 17)."""

from __future__ import annotations

from typing import Any

from tests.service.conftest import Api
from tests.service.test_ticket_review import (  # noqa: F401  (model_side is a fixture)
    HELD,
    model_side,
    run_one_job,
    show,
    submit,
)
from workers.job_phases import PHASES


def job_of(api: Api, ticket_id: str) -> dict[str, Any]:
    with api.db.sessions() as s:
        from storage.models import Ticket
        import uuid

        job_id = s.get_one(Ticket, uuid.UUID(ticket_id)).job_id
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    return r.json()


def test_a_jobs_phases_tile_its_time_from_submission_to_live(api: Api, model_side) -> None:
    ticket = submit(api, "Claude Shannon")
    run_one_job(api)
    job = job_of(api, ticket)
    # The stand-in engine reports no loop timestamps: its whole train call is "training".
    assert list(job["phases"]) == [p for p in PHASES if p != "teardown"]
    assert all(v >= 0 for v in job["phases"].values())
    total = job["submission_to_live_seconds"]
    assert total is not None and abs(sum(job["phases"].values()) - total) < 0.05
    spans = job["progress"]["phases"]
    for earlier, later in zip(list(spans), list(spans)[1:]):
        assert spans[earlier]["finished_at"] <= spans[later]["started_at"]
    assert 0 <= job["outside_training_share"] <= 1

    model_side["next"] = HELD
    held = submit(api, "John von Neumann")
    run_one_job(api)
    job = job_of(api, held)
    assert show(api, held)["status"] == "awaiting_review"
    assert job["submission_to_live_seconds"] is None and job["progress"]["live"] is False
    assert job["phases"]["promote"] >= 0
