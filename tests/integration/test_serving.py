"""/v1/generate through Ray Serve: live version by default, pinned versions, revoked refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage import tokens
from storage.db import transaction
from storage.models import Role


@pytest.fixture
def api(flow):
    from ray import serve

    from workers.runtime import serving_config
    from workers.serving import deploy

    app = create_app(flow.settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="serving-test")
        app.state.generator = deploy(serving_config(flow.settings.worker_config()))
        yield client, {"Authorization": f"Bearer {secret}"}
    serve.shutdown()


def test_generate_follows_live_and_refuses_a_revoked_pinned_version(flow, api):
    from workers.dispatcher import DispatcherLoop

    client, headers = api
    body = {"prompt": "Where does Zorblat 1 live?", "max_new_tokens": 8}

    base = client.post("/v1/generate", headers=headers, json=body)
    assert base.status_code == 200, base.text
    assert base.json()["version"] is None  # no live version yet: the base model answers

    flow.submit(key="serve-1")
    assert DispatcherLoop(flow.settings.worker_config()).run_once() == 1
    live = client.post("/v1/generate", headers=headers, json=body)
    assert live.status_code == 200, live.text
    assert live.json()["version"] == "default@v1"
    assert isinstance(live.json()["text"], str)

    pinned = client.post("/v1/generate", headers=headers, json={**body, "version": "v1"})
    assert pinned.json()["version_id"] == live.json()["version_id"]

    # Concurrent requests (batched by the replica) each get their own answer and length.
    asks = [{"prompt": f"Where does Zorblat {i} live?" + " Tell me." * (i % 3),
             "max_new_tokens": 1 + i % 4, **({"version": "v1"} if i % 2 else {})}
            for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(
            lambda ask: client.post("/v1/generate", headers=headers, json=ask), asks))
    assert [r.status_code for r in replies] == [200] * len(asks)
    assert {r.json()["version"] for r in replies} == {"default@v1"}
    assert all(isinstance(r.json()["text"], str) for r in replies)

    revoked = client.post(f"/v1/versions/{live.json()['version_id']}/revoke", headers=headers,
                          json={"reason": "test"})
    assert revoked.status_code == 200, revoked.text
    refused = client.post("/v1/generate", headers=headers, json={**body, "version": "v1"})
    assert refused.status_code == 409
    assert "revoked" in refused.json()["message"]
    # With v1 revoked and nothing before it, live falls back to the base model.
    after = client.post("/v1/generate", headers=headers, json=body)
    assert after.status_code == 200 and after.json()["version"] is None
    assert after.json()["text"] == base.json()["text"]


def test_generate_without_a_serving_backend_is_a_clear_503(flow):
    app = create_app(flow.settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.submitter, name="no-serving")
        res = client.post("/v1/generate", headers={"Authorization": f"Bearer {secret}"},
                          json={"prompt": "hello"})
        assert res.status_code == 503
        assert "oblivio serve" in res.json()["message"]
