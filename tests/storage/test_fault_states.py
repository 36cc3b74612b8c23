"""What the registry and the queue record after a fault, on both databases: a dead job's
half-built version is failed when its lease expires; a corrupt version leaves service and
live falls back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from storage import queue, registry, tickets
from storage.db import transaction
from storage.models import (
    AdapterVersion,
    Job,
    JobStatus,
    Ticket,
    TicketKind,
    TicketStatus,
    VersionStatus,
    utcnow,
)

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)


def _ready_version(db, lineage, number_hint: int) -> AdapterVersion:
    with transaction(db.sessions) as s:
        lin = registry.get_lineage(s, lineage)
        v = registry.create_version(s, lineage=lin, parent_id=None, ticket_ids=[], job_id=None,
                                    peft_config=None, base_model_sha256=None, actor="t")
        registry.mark_ready(s, version_id=v.id, object_key=f"adapters/{number_hint:064x}/a",
                            sha256=f"{number_hint:064x}", size=1, metrics={}, actor="t")
        registry.promote(s, lineage_name=lineage, version=v.version, actor="t")
        return v


@BOTH
def test_an_expired_lease_fails_its_jobs_unfinished_version(db) -> None:
    with transaction(db.sessions) as s:
        lineage = registry.ensure_lineage(s, name="default", base_model="m")
        request = tickets.TicketRequest(kind=TicketKind.forget, engine="npo",
                                        payload={"forget": {"texts": ["t"], "qa": []}})
        ticket_id = tickets.submit(s, request=request, requester="r").id
    (claimed,) = queue.claim(db.sessions, owner="dead-worker", lease_seconds=5, max_attempts=3)
    with transaction(db.sessions) as s:
        job = Job(lineage_id=lineage.id, engine="npo", ticket_ids=[str(ticket_id)],
                  status=JobStatus.running)
        s.add(job)
        s.flush()
        s.get_one(Ticket, ticket_id).job_id = job.id
        version = registry.create_version(s, lineage=s.get_one(type(lineage), lineage.id),
                                          parent_id=None, ticket_ids=[ticket_id], job_id=job.id,
                                          peft_config=None, base_model_sha256=None, actor="w")
        job_id, version_id = job.id, version.id
    assert queue.requeue_expired(db.sessions, max_attempts=3,
                                 now=utcnow() + timedelta(seconds=10)) == 1
    with db.sessions() as s:
        assert s.get_one(Ticket, ticket_id).status is TicketStatus.queued
        job = s.get_one(Job, job_id)
        assert job.status is JobStatus.failed and "abandoned" in job.error
        version = s.get_one(AdapterVersion, version_id)
        assert version.status is VersionStatus.failed
        assert "stopped renewing its lease" in version.metrics["error"]


@BOTH
def test_a_corrupt_live_version_fails_and_live_falls_back(db) -> None:
    with transaction(db.sessions) as s:
        registry.ensure_lineage(s, name="default", base_model="m")
    v1 = _ready_version(db, "default", 1)
    v2 = _ready_version(db, "default", 2)
    with transaction(db.sessions) as s:
        assert registry.resolve(s, lineage_name="default", ref="live").id == v2.id
        registry.mark_corrupt(s, version_id=v2.id, actor="serving", reason="sha256 mismatch")
    with transaction(db.sessions) as s:
        assert s.get_one(AdapterVersion, v2.id).status is VersionStatus.failed
        live = registry.resolve(s, lineage_name="default", ref="live")
        assert (live.id, live.status) == (v1.id, VersionStatus.ready)
        registry.mark_corrupt(s, version_id=v2.id, actor="serving", reason="again")  # no-op
        registry.mark_corrupt(s, version_id=v1.id, actor="serving", reason="sha256 mismatch")
    with db.sessions() as s:
        # Nothing servable is left: the lineage serves its base model.
        assert registry.resolve(s, lineage_name="default", ref="live") is None
        assert s.get_one(AdapterVersion, v2.id).metrics["error"] == "sha256 mismatch"
