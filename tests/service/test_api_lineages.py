"""Lineages, versions, promote / rollback / revoke through the API."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from storage import registry
from storage.db import transaction
from storage.models import AuditEvent
from tests.service.conftest import Api

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)


def add_version(api: Api, lineage: str = "default", *, ready: bool = True) -> uuid.UUID:
    """A version as a job would leave it: created, then (maybe) stored and verified."""
    with transaction(api.db.sessions) as s:
        version = registry.create_version(s, lineage=registry.get_lineage(s, lineage),
                                          parent_id=None, ticket_ids=[], job_id=None,
                                          peft_config=None, base_model_sha256="ee" * 32,
                                          actor="test-job")
        if ready:
            sha = uuid.uuid4().hex * 2
            registry.mark_ready(s, version_id=version.id, object_key=f"adapters/{sha}",
                                sha256=sha, size=1000, metrics={"utility_ratio": 1.0},
                                actor="test-job")
        return version.id


def test_create_and_list_lineages(api: Api) -> None:
    op = api.headers("operator")
    r = api.client.post("/v1/lineages", json={"name": "support-bot"}, headers=op)
    assert r.status_code == 201, r.text
    assert r.json()["base_model"] == "tiny-test-model"  # the service's default
    r = api.client.post("/v1/lineages", json={"name": "legal", "base_model": "/models/qwen",
                                              "engine": "s3t"}, headers=op)
    assert r.status_code == 201 and r.json()["engine"] == "s3t"
    again = api.client.post("/v1/lineages", json={"name": "legal"}, headers=op)
    assert again.status_code == 409 and "already exists" in again.json()["message"]
    bad = api.client.post("/v1/lineages", json={"name": "no spaces please"}, headers=op)
    assert bad.status_code == 422
    names = [x["name"] for x in api.client.get("/v1/lineages", headers=op).json()]
    assert names == ["default", "legal", "support-bot"]
    r = api.client.get("/v1/lineages/nope/versions", headers=op)
    assert r.status_code == 404 and "unknown lineage 'nope'" in r.json()["message"]


@BOTH
def test_promote_rollback_and_revoke(api: Api) -> None:
    op = api.headers("operator")
    v1, v2 = add_version(api), add_version(api)
    add_version(api, ready=False)  # v3 still training

    r = api.client.post("/v1/lineages/default/promote", json={"version": 1}, headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "default@v1" and r.json()["aliases"] == ["live"]
    r = api.client.post("/v1/lineages/default/promote", json={"version": 2}, headers=op)
    assert r.status_code == 200 and r.json()["id"] == str(v2)

    versions = api.client.get("/v1/lineages/default/versions", headers=op).json()
    assert [(v["version"], v["status"], v["aliases"]) for v in versions] == [
        (1, "superseded", []), (2, "ready", ["live"]), (3, "training", [])]
    lineage = api.client.get("/v1/lineages/default", headers=op).json()
    assert lineage["aliases"] == {"live": "default@v2"}

    refused = api.client.post("/v1/lineages/default/promote", json={"version": 3}, headers=op)
    assert refused.status_code == 409 and "training" in refused.json()["message"]
    missing = api.client.post("/v1/lineages/default/promote", json={"version": 9}, headers=op)
    assert missing.status_code == 404
    assert api.client.post("/v1/lineages/default/promote", json={"version": 0},
                           headers=op).status_code == 422

    r = api.client.post("/v1/lineages/default/rollback", headers=op)
    assert r.status_code == 200 and r.json()["label"] == "default@v1"
    nothing = api.client.post("/v1/lineages/default/rollback", headers=op)
    assert nothing.status_code == 409

    r = api.client.post(f"/v1/versions/{v1}/revoke", json={"reason": "leaks data"}, headers=op)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    lineage = api.client.get("/v1/lineages/default", headers=op).json()
    assert lineage["aliases"] == {}  # nothing earlier to fall back to: the base model serves
    assert api.client.get(f"/v1/versions/{v1}", headers=op).json()["status"] == "revoked"
    no_reason = api.client.post(f"/v1/versions/{v2}/revoke", json={}, headers=op)
    assert no_reason.status_code == 422
    unknown = api.client.post(f"/v1/versions/{uuid.uuid4()}/revoke", json={"reason": "x"},
                              headers=op)
    assert unknown.status_code == 404


@BOTH
def test_candidate_alias_rollback_without_live_revoking_twice_and_404s(api: Api) -> None:
    op = api.headers("operator")
    v1 = add_version(api)
    v2 = add_version(api)

    # Nothing is live yet: rollback has nothing to roll back from (409, not a 500 or a move).
    r = api.client.post("/v1/lineages/default/rollback", headers=op)
    assert r.status_code == 409 and "no live version" in r.json()["message"], r.text

    # Promote to `candidate`: live stays unset (the base model keeps serving).
    r = api.client.post("/v1/lineages/default/promote", json={"version": 2,
                                                             "alias": "candidate"}, headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["aliases"] == ["candidate"] and r.json()["status"] == "ready"
    lineage = api.client.get("/v1/lineages/default", headers=op).json()
    assert lineage["aliases"] == {"candidate": "default@v2"}
    bad_alias = api.client.post("/v1/lineages/default/promote",
                                json={"version": 2, "alias": "staging"}, headers=op)
    assert bad_alias.status_code == 422 and "unknown alias" in bad_alias.json()["message"]
    # Promoting the candidate to live clears `candidate`.
    r = api.client.post("/v1/lineages/default/promote", json={"version": 2}, headers=op)
    assert r.status_code == 200 and r.json()["aliases"] == ["live"]
    assert api.client.get("/v1/lineages/default", headers=op).json()["aliases"] == {
        "live": "default@v2"}

    # Revoking twice: the second answers the same revoked version and moves nothing again.
    first = api.client.post(f"/v1/versions/{v2}/revoke", json={"reason": "leak"}, headers=op)
    assert first.status_code == 200 and first.json()["status"] == "revoked"
    assert api.client.get("/v1/lineages/default", headers=op).json()["aliases"] == {
        "live": "default@v1"}
    again = api.client.post(f"/v1/versions/{v2}/revoke", json={"reason": "again"}, headers=op)
    assert again.status_code == 200 and again.json()["status"] == "revoked"
    assert api.client.get("/v1/lineages/default", headers=op).json()["aliases"] == {
        "live": "default@v1"}
    assert api.client.get(f"/v1/versions/{v1}", headers=op).json()["status"] == "ready"
    with api.db.sessions() as s:  # one revocation on record, with the first reason
        revocations = s.scalars(select(AuditEvent).where(
            AuditEvent.action == "version.revoked", AuditEvent.subject_id == str(v2))).all()
        assert [e.detail["reason"] for e in revocations] == ["leak"]
    # A revoked version cannot come back.
    refused = api.client.post("/v1/lineages/default/promote", json={"version": 2}, headers=op)
    assert refused.status_code == 409 and "revoked" in refused.json()["message"]

    # 404s name what is missing.
    missing = uuid.uuid4()
    for method, path, body in (
            ("GET", f"/v1/versions/{missing}", None),
            ("POST", f"/v1/versions/{missing}/revoke", {"reason": "x"}),
            ("GET", "/v1/lineages/nope", None),
            ("GET", "/v1/lineages/nope/versions", None),
            ("POST", "/v1/lineages/nope/promote", {"version": 1}),
            ("POST", "/v1/lineages/nope/rollback", None),
            ("POST", "/v1/lineages/default/promote", {"version": 7})):
        r = api.client.request(method, path, json=body, headers=op)
        assert r.status_code == 404, (method, path, r.text)
        message = r.json()["message"]
        assert (str(missing) in message or "'nope'" in message
                or "default@v7" in message), (path, message)


def test_system_describes_what_the_service_runs_on(api: Api) -> None:
    r = api.client.get("/v1/system", headers=api.headers("operator"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "base_model": "tiny-test-model", "database": "sqlite", "object_store": "file",
        "device": "cpu", "num_workers": api.settings.num_workers,
        "zero_stage": api.settings.zero_stage, "ray_dashboard": None,
        "dispatcher": None, "serving": False} | {k: v for k, v in body.items()
                                                 if k not in _SYSTEM_KEYS}
    assert api.client.get("/v1/system", headers=api.headers("submitter")).status_code == 403
    assert api.client.get("/v1/system").status_code == 401


_SYSTEM_KEYS = {"base_model", "database", "object_store", "device", "num_workers",
                "zero_stage", "ray_dashboard", "dispatcher", "serving"}
