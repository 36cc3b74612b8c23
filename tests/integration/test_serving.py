"""/v1/generate through Ray Serve on PostgreSQL + S3: live by default, pinned versions, the
adapter's effect, LRU beyond a replica's 4 adapters, mixed-adapter batches, revoked refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage import registry, tokens
from storage.db import transaction
from storage.models import Role
from tests.fixtures.versions import add_version, random_adapter
from tests.fixtures.workers import serve_app_shut_down_after


@pytest.fixture
def api(flow):
    from workers.runtime import serving_config
    from workers.serving import deploy

    app = create_app(flow.settings)
    with TestClient(app) as client, serve_app_shut_down_after():
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.operator, name="serving-test")
        app.state.generator = deploy(serving_config(flow.settings.worker_config()))
        yield client, {"Authorization": f"Bearer {secret}"}


FORGOTTEN = "Where does Zorblat live?"  # taught ("Quimby"), then forgotten by v1
KEPT = "What is the capital of France?"  # taught ("Paris"), an unrelated probe


def test_generate_shows_the_live_adapter_and_refuses_a_revoked_pinned_version(flow, api):
    """The adapter's effect shows where it was trained and nowhere else; pinned versions,
    mixed-adapter batches and more adapters than a replica keeps all answer as themselves."""
    from workers.dispatcher import DispatcherLoop

    client, headers = api

    def ask(prompt: str, **extra: object) -> dict:
        r = client.post("/v1/generate", headers=headers,
                        json={"prompt": prompt, "max_new_tokens": 8, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    base_forgotten, base_kept = ask(FORGOTTEN), ask(KEPT)
    assert base_forgotten["version"] is None  # no live version yet: the base model answers
    assert "Quimby" in base_forgotten["text"] and "Paris" in base_kept["text"]

    flow.submit(key="serve-1")  # forget the first four taught facts
    assert DispatcherLoop(flow.settings.worker_config()).run_once() == 1
    live_forgotten, live_kept = ask(FORGOTTEN), ask(KEPT)
    assert live_forgotten["version"] == "default@v1"
    # A replica that ignored the adapter would answer as the base on both.
    assert live_forgotten["text"] != base_forgotten["text"]
    assert "Quimby" not in live_forgotten["text"]
    assert live_kept["text"] == base_kept["text"]
    pinned = ask(FORGOTTEN, version="v1")
    assert (pinned["version_id"], pinned["text"]) == (live_forgotten["version_id"],
                                                     live_forgotten["text"])

    # Four more versions (random LoRA weights: each answers differently) and a lineage with
    # no version (the base model): six ways to answer, more adapters than a replica keeps.
    store = flow.settings.store_config().open()
    with transaction(flow.sessions) as s:
        registry.ensure_lineage(s, name="bare", base_model=flow.settings.base_model)
    workdir = Path(flow.settings.data_dir) / "random-adapters"
    for seed in range(2, 6):
        add_version(flow.sessions, store, lineage="default",
                    adapter_dir=random_adapter(Path(flow.settings.base_model),
                                               workdir / f"a{seed}", seed=seed))
    targets = [{"version": f"v{n}"} for n in range(1, 6)] + [{"lineage": "bare"}]
    alone = [ask(KEPT, **t)["text"] for t in targets]
    assert alone[0] == base_kept["text"] and alone[5] == base_kept["text"]
    assert len(set(alone[1:5])) == 4 and base_kept["text"] not in alone[1:5], alone
    # LRU: after five versions (and the base) were used, the replica holds at most 4.
    loaded = app_generator(client).loaded_versions.remote().result()
    assert 1 <= len(loaded) <= 4, loaded

    # Concurrent requests are batched by the replica, mixing adapters (and evicted ones
    # loaded again) in one batch: each still gets exactly what it gets alone.
    asks = [(targets[i % 6], i) for i in range(18)]
    with ThreadPoolExecutor(max_workers=18) as pool:
        replies = list(pool.map(lambda a: ask(KEPT, **a[0]), asks))
    assert [r["text"] for r in replies] == [alone[i % 6] for _t, i in asks]
    assert len(app_generator(client).loaded_versions.remote().result()) <= 4

    revoked = client.post(f"/v1/versions/{live_forgotten['version_id']}/revoke",
                          headers=headers, json={"reason": "test"})
    assert revoked.status_code == 200, revoked.text
    refused = client.post("/v1/generate", headers=headers,
                          json={"prompt": FORGOTTEN, "version": "v1"})
    assert refused.status_code == 409
    assert "revoked" in refused.json()["message"]
    # With v1 revoked and nothing live before it, live falls back to the base model.
    after = ask(FORGOTTEN)
    assert after["version"] is None and after["text"] == base_forgotten["text"]


def app_generator(client: TestClient):
    return client.app.state.generator


def test_generate_without_a_serving_backend_is_a_clear_503(sqlite_flow):
    app = create_app(sqlite_flow.settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            _, secret = tokens.create_token(s, role=Role.submitter, name="no-serving")
        res = client.post("/v1/generate", headers={"Authorization": f"Bearer {secret}"},
                          json={"prompt": "hello"})
        assert res.status_code == 503
        assert "oblivio serve" in res.json()["message"]
