"""What the registry and the queue record after a fault, on both databases: a dead job's
half-built version is failed when its lease expires; a corrupt version leaves service,
live falls back, and the tickets it carried stop saying done."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sqlalchemy import select

from storage import queue, registry, ticket_states, tickets
from storage.db import transaction
from storage.models import (
    AdapterVersion,
    AuditEvent,
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


def _ticket_with_version(db, *, parent_id, promote: bool) -> tuple[object, object]:
    """A ticket whose job built a ready version on `parent_id`, settled as the job runner
    settles it (done if the version went live, else awaiting review)."""
    with transaction(db.sessions) as s:
        lin = registry.get_lineage(s, "default")
        request = tickets.TicketRequest(kind=TicketKind.forget, engine="npo",
                                        payload={"forget": {"texts": ["t"], "qa": []}})
        ticket = tickets.submit(s, request=request, requester="r")
        v = registry.create_version(s, lineage=lin, parent_id=parent_id, ticket_ids=[ticket.id],
                                    job_id=None, peft_config=None, base_model_sha256=None,
                                    actor="t")
        registry.mark_ready(s, version_id=v.id, object_key=f"adapters/{v.version:064x}/a",
                            sha256=f"{v.version:064x}", size=1, metrics={}, actor="t")
        if promote:
            registry.promote(s, lineage_name="default", version=v.version, actor="t")
        ticket.result_version_id = v.id
        ticket_states.settle(s, ticket, version_id=v.id, actor="w")
        return ticket.id, v.id


@BOTH
def test_a_corrupt_version_takes_its_tickets_out_of_done(db) -> None:
    with transaction(db.sessions) as s:
        registry.ensure_lineage(s, name="default", base_model="m")
    t1, v1 = _ticket_with_version(db, parent_id=None, promote=True)
    t2, v2 = _ticket_with_version(db, parent_id=v1, promote=True)
    t3, v3 = _ticket_with_version(db, parent_id=v2, promote=False)  # held: a candidate
    with db.sessions() as s:
        states = [s.get_one(Ticket, t).status for t in (t1, t2, t3)]
        assert states == [TicketStatus.done, TicketStatus.done, TicketStatus.awaiting_review]
    with transaction(db.sessions) as s:
        registry.mark_corrupt(s, version_id=v2, actor="serving", reason="sha256 mismatch")
        registry.mark_corrupt(s, version_id=v3, actor="serving", reason="sha256 mismatch")
    with db.sessions() as s:
        assert registry.resolve(s, lineage_name="default", ref="live").id == v1
        # v1 is live and still in the chain: its ticket stays done.
        assert s.get_one(Ticket, t1).status is TicketStatus.done
        # v2 left the live chain: its done ticket (forget set purged) is reopened and says why.
        reopened = s.get_one(Ticket, t2)
        assert reopened.status is TicketStatus.reopened
        assert "default@v2 is corrupt" in reopened.error and "file the request" in reopened.error
        assert reopened.receipt["reopened_because"]["action"] == "corrupt"
        # v3 can never be promoted: its waiting ticket goes back to the queue.
        requeued = s.get_one(Ticket, t3)
        assert (requeued.status, requeued.result_version_id) == (TicketStatus.queued, None)
        assert "default@v3 is corrupt" in requeued.error
        log = s.execute(select(AuditEvent.action, AuditEvent.subject_id, AuditEvent.detail)
                        .where(AuditEvent.action.in_(("ticket.reopened", "ticket.requeued",
                                                      "version.corrupt")))
                        .order_by(AuditEvent.id)).tuples().all()
    # Every change is in the audit log, saying it came from the corrupt version.
    assert {(action, subject) for action, subject, _ in log} == {
        ("ticket.reopened", str(t2)), ("version.corrupt", str(v2)),
        ("ticket.requeued", str(t3)), ("version.corrupt", str(v3))}
    assert all(detail["action"] == "corrupt" for action, _, detail in log
               if action.startswith("ticket."))
    corrupt = {subject: detail for action, subject, detail in log if action == "version.corrupt"}
    assert corrupt[str(v2)]["tickets"] == {"reopened": [str(t2)]}
    assert corrupt[str(v3)]["tickets"] == {"queued": [str(t3)]}
