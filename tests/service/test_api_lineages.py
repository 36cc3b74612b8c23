"""Lineages, versions, promote / rollback / revoke through the API."""

from __future__ import annotations

import uuid

import pytest

from storage import registry
from storage.db import transaction
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
