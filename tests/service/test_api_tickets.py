"""POST/GET /v1/tickets end to end through the real app and a real database."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from service.deps import payload_cipher
from storage import queue, registry, tickets
from storage.db import transaction
from storage.models import AuditEvent, Ticket, TicketKind
from tests.service.conftest import Api
from workers.engines import DEFAULT_ENGINES, list_engines, runnable_engines

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)

FORGET = {"kind": "forget", "target": "Marie Curie",
          "forget": {"qa": [{"question": "Who discovered polonium?", "answer": "Marie Curie"}],
                     "texts": ["Marie Curie was born in Warsaw in 1867."]}}


def ticket_count(api: Api) -> int:
    with api.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(Ticket))


def submit(api: Api, body: dict[str, Any] | None = None, role: str = "admin",
           key: str | None = None) -> Any:
    headers = api.headers(role)
    if key is not None:
        headers["Idempotency-Key"] = key
    return api.client.post("/v1/tickets", json=body or FORGET, headers=headers)


@BOTH
def test_submit_queues_a_ticket_that_can_be_read_back(api: Api) -> None:
    r = submit(api)
    assert r.status_code == 202, r.text
    ticket = r.json()
    assert ticket["status"] == "queued"
    assert ticket["kind"] == "forget"
    assert ticket["engine"] == DEFAULT_ENGINES["forget"] == "o3"
    assert ticket["lineage"] == "default" and ticket["target"] == "Marie Curie"
    assert ticket["summary"] == {"forget_texts": 1, "forget_qa": 1}
    assert "forget" not in ticket  # the text to forget is never echoed back

    got = api.client.get(f"/v1/tickets/{ticket['id']}", headers=api.headers())
    assert got.status_code == 200
    shown = got.json()
    # GET of one ticket adds its timeline (the list and the POST answer leave it null).
    assert [e["event"] for e in shown.pop("timeline")] == ["submitted"]
    assert ticket.pop("timeline") is None
    assert shown == ticket

    with api.db.sessions() as s:
        row = s.get(Ticket, uuid.UUID(ticket["id"]))
        # Stored sealed (storage.sealing): no forget text in the row, only ciphertext.
        assert row.payload["sealed"] == "aes-256-gcm"
        assert FORGET["forget"]["texts"][0] not in json.dumps(row.payload)
        plain = payload_cipher(api.client.app).open(row.payload,
                                                    expected_sha256=row.payload_sha256)
        assert plain["forget"]["texts"] == FORGET["forget"]["texts"]
        canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
        assert row.payload_sha256 == hashlib.sha256(canonical).hexdigest()
        assert ticket["payload_sha256"] == row.payload_sha256
        events = s.scalars(select(AuditEvent.action).where(
            AuditEvent.subject_id == ticket["id"])).all()
        assert events == ["ticket.submitted"]


@BOTH
def test_delete_records_defaults_to_the_s3t_engine(api: Api) -> None:
    from tests.fixtures.datasets import register_s3t_lineage

    register_s3t_lineage(api, dataset="support-chats", lineage="support", records=[
        {"id": "r1", "text": "a"}, {"id": "r2", "text": "b"},
        {"id": "r3", "subject_id": "u-7", "text": "c"}])
    r = submit(api, {"kind": "delete_records", "dataset": "support-chats", "lineage": "support",
                     "record_ids": ["r1", "r2"]})
    assert r.status_code == 202, r.text
    assert r.json()["engine"] == "s3t"
    assert r.json()["summary"] == {"dataset": "support-chats", "record_ids": 2,
                                   "by_subject": False}
    r = submit(api, {"kind": "delete_records", "dataset": "support-chats", "subject_id": "u-7",
                     "lineage": "support", "priority": 5, "not_before": "2030-01-01T00:00:00+02:00"})
    assert r.status_code == 202, r.text
    assert r.json()["priority"] == 5
    assert r.json()["not_before"].startswith("2029-12-31T22:00:00")


@BOTH
def test_list_pages_through_every_ticket_once_newest_first(api: Api) -> None:
    ids = [submit(api, {**FORGET, "target": f"person {i}"}).json()["id"] for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        r = api.client.get("/v1/tickets", params=params, headers=api.headers())
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [t["id"] for t in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None or pages > 5:
            break
    assert pages == 3
    assert seen == list(reversed(ids))


@BOTH
def test_list_filters_by_status_and_lineage(api: Api) -> None:
    with transaction(api.db.sessions) as s:
        registry.ensure_lineage(s, name="other", base_model="tiny-test-model")
    first = submit(api).json()["id"]
    second = submit(api, {**FORGET, "lineage": "other"}).json()["id"]
    assert api.client.post(f"/v1/tickets/{first}/cancel", headers=api.headers()).status_code == 200

    def ids(**params: str) -> list[str]:
        r = api.client.get("/v1/tickets", params=params, headers=api.headers())
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["items"]]

    assert ids(status="cancelled") == [first]
    assert ids(status="queued") == [second]
    assert ids(lineage="other") == [second]
    assert ids(lineage="default", status="queued") == []
    bad = api.client.get("/v1/tickets", params={"status": "sleeping"}, headers=api.headers())
    assert bad.status_code == 422
    bad = api.client.get("/v1/tickets", params={"cursor": "not-a-cursor"},
                         headers=api.headers())
    assert bad.status_code == 422 and "cursor" in bad.json()["message"]


@BOTH
def test_cancel_is_final_and_refused_once_a_worker_has_the_ticket(api: Api) -> None:
    ticket = submit(api).json()
    r = api.client.post(f"/v1/tickets/{ticket['id']}/cancel", headers=api.headers())
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["summary"] is None  # the forget set is purged on cancel
    again = api.client.post(f"/v1/tickets/{ticket['id']}/cancel", headers=api.headers())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    running = submit(api, {**FORGET, "target": "someone else"}).json()
    claimed = queue.claim(api.db.sessions, owner="test-worker", lease_seconds=60, max_attempts=3)
    assert [str(c.id) for c in claimed] == [running["id"]]
    r = api.client.post(f"/v1/tickets/{running['id']}/cancel", headers=api.headers())
    assert r.status_code == 409
    assert "running" in r.json()["message"]
    assert api.client.get(f"/v1/tickets/{running['id']}",
                          headers=api.headers()).json()["status"] == "running"


@BOTH
def test_receipt_only_for_done_tickets_with_versions_and_hashes(api: Api) -> None:
    ticket = submit(api).json()
    r = api.client.get(f"/v1/tickets/{ticket['id']}/receipt", headers=api.headers())
    assert r.status_code == 409 and "queued" in r.json()["message"]

    claimed = queue.claim(api.db.sessions, owner="w", lease_seconds=60, max_attempts=3)
    sha = "ab" * 32
    with transaction(api.db.sessions) as s:
        lineage = registry.get_lineage(s, "default")
        version = registry.create_version(s, lineage=lineage, parent_id=None,
                                          ticket_ids=[claimed[0].id], job_id=None,
                                          peft_config=None, base_model_sha256="cd" * 32,
                                          actor="w")
        registry.mark_ready(s, version_id=version.id, object_key=f"adapters/{sha}", sha256=sha,
                            size=123, metrics={"forget_ratio": 0.0}, actor="w")
        registry.promote(s, lineage_name="default", version=version.version, actor="w")
        version_id = version.id
    assert queue.complete(api.db.sessions, ticket_id=claimed[0].id, owner="w",
                          version_id=version_id, receipt={"auto_promoted": True})

    r = api.client.get(f"/v1/tickets/{ticket['id']}/receipt", headers=api.headers())
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt["version"] == "default@v1"
    assert receipt["version_id"] == str(version_id)
    assert receipt["adapter_sha256"] == sha
    assert receipt["base_model_sha256"] == "cd" * 32
    assert receipt["payload_sha256"] == ticket["payload_sha256"]
    assert receipt["metrics"] == {"forget_ratio": 0.0}
    assert receipt["promoted"] is True and receipt["live"] is True
    assert receipt["live_version"] == "default@v1"
    assert receipt["requested_at"] and receipt["completed_at"] == receipt["done_at"]
    shown = api.client.get(f"/v1/tickets/{ticket['id']}", headers=api.headers()).json()
    assert shown["status"] == "done"
    assert shown["result_version"] == {"id": str(version_id), "label": "default@v1"}
    done = api.client.post(f"/v1/tickets/{ticket['id']}/cancel", headers=api.headers())
    assert done.status_code == 409


def test_unknown_ticket_is_404_and_a_bad_uuid_is_422(api: Api) -> None:
    r = api.client.get(f"/v1/tickets/{uuid.uuid4()}", headers=api.headers())
    assert r.status_code == 404 and "not found" in r.json()["message"]
    r = api.client.get("/v1/tickets/not-a-uuid", headers=api.headers())
    assert r.status_code == 422 and "ticket_id" in r.json()["message"]
    r = api.client.post("/v1/tickets/not-a-uuid/cancel", headers=api.headers())
    assert r.status_code == 422
    assert api.client.get("/v1/nothing-here").status_code == 404


@pytest.mark.parametrize("engine", list_engines())
def test_a_text_only_ticket_is_accepted_only_by_engines_that_train_it(api: Api,
                                                                       engine: str) -> None:
    """Issue 8: a text-only ticket was accepted with 202, then failed at job time. Every
    engine either refuses it here (422, saying why) or trains it: the runnable ones that
    accept it are exactly the ones tests/workers/test_engines.py trains on a text-only
    ticket through the engine shape; a planned engine's accepted ticket waits queued."""
    from tests.workers.test_engines import runnable_forget_engines

    body = {"kind": "forget", "engine": engine, "forget": {
        "texts": ["Zorblat keeps a diary in a blue tin box under the stairs of the mill."]}}
    r = api.client.post("/v1/tickets", json=body, headers=api.headers())
    if r.status_code == 422:
        assert engine in r.json()["message"] or "cannot" in r.json()["message"]
        return
    assert r.status_code == 202, r.text
    if engine in runnable_engines():
        assert engine in runnable_forget_engines()
    else:
        assert r.json()["status"] == "queued"


def _make_done(api: Api, ticket_id: str) -> None:
    """Publish `ticket_id` (claimed alone) as the lineage's live version, as a job would."""
    claimed = queue.claim(api.db.sessions, owner="w", lease_seconds=60, max_attempts=3)
    assert [str(c.id) for c in claimed] == [ticket_id]
    with transaction(api.db.sessions) as s:
        lineage = registry.get_lineage(s, "default")
        live = registry.get_aliases(s, lineage_name="default").get("live")
        version = registry.create_version(s, lineage=lineage,
                                          parent_id=live.id if live else None,
                                          ticket_ids=[claimed[0].id], job_id=None,
                                          peft_config=None, base_model_sha256="cd" * 32,
                                          actor="w")
        sha = hashlib.sha256(ticket_id.encode()).hexdigest()
        registry.mark_ready(s, version_id=version.id, object_key=f"adapters/{sha}", sha256=sha,
                            size=1, metrics={}, actor="w")
        registry.promote(s, lineage_name="default", version=version.version, actor="w")
        version_id = version.id
    assert queue.complete(api.db.sessions, ticket_id=claimed[0].id, owner="w",
                          version_id=version_id, receipt={})


def test_only_operators_revoke_and_only_a_done_ticket_of_a_separable_engine(api: Api) -> None:
    """POST /v1/tickets/{id}/revoke queues a `revoke` ticket on the same lineage and engine
    (the job runner then publishes a version without that request's block); refused with a
    message, and nothing queued, for a submitter, a ticket not yet done, an engine that
    cannot drop one request, and a second revocation while the first is pending."""
    o3 = submit(api, {**FORGET, "engine": "o3"}).json()
    path = f"/v1/tickets/{o3['id']}/revoke"
    body = {"reason": "the subject withdrew the request"}
    early = api.client.post(path, json=body, headers=api.headers("operator"))
    assert early.status_code == 409 and "only a done ticket" in early.json()["message"]
    _make_done(api, o3["id"])

    idk = submit(api, {**FORGET, "target": "Ada Lovelace", "engine": "idk"}).json()
    _make_done(api, idk["id"])
    r = api.client.post(f"/v1/tickets/{idk['id']}/revoke", json=body,
                        headers=api.headers("operator"))
    assert r.status_code == 409 and "revoke the version instead" in r.json()["message"]

    assert api.client.post(path, json=body, headers=api.headers("submitter")).status_code == 403
    assert api.client.post(path, json={}, headers=api.headers("operator")).status_code == 422
    before = ticket_count(api)
    r = api.client.post(path, json=body, headers=api.headers("operator"))
    assert r.status_code == 202, r.text
    revoke = r.json()
    assert (revoke["kind"], revoke["engine"], revoke["status"]) == ("revoke", "o3", "queued")
    assert revoke["lineage"] == "default" and revoke["target"] == f"ticket {o3['id']}"
    again = api.client.post(path, json=body, headers=api.headers("operator"))
    assert again.status_code == 409 and revoke["id"] in again.json()["message"]
    assert ticket_count(api) == before + 1
    # The revocation is queued for the worker like any ticket, and the original stays done
    # until the version without its block goes live.
    claimed = queue.claim(api.db.sessions, owner="w", lease_seconds=60, max_attempts=3)
    assert [str(c.id) for c in claimed] == [revoke["id"]]
    assert api.client.get(f"/v1/tickets/{o3['id']}",
                          headers=api.headers()).json()["status"] == "done"
    with api.db.sessions() as s:
        actions = s.scalars(select(AuditEvent.action)
                            .where(AuditEvent.subject_id == o3["id"])).all()
    assert "ticket.revoke_requested" in actions
