"""/v1/generate refuses what it must not serve before any model is asked.

The serving backend here is a recorder: a request that reached it although it names an
unknown, unfinished or foreign version would show up in `asked` (and answer 200).
"""

from __future__ import annotations

import sys
import types
import uuid
from typing import Any

import pytest

from storage import registry
from storage.db import transaction
from tests.service.conftest import Api
from tests.service.test_api_lineages import add_version


@pytest.fixture
def asked(api: Api, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Requests that reached the (stand-in) serving backend."""
    calls: list[dict[str, Any]] = []

    def fake_generate(_backend: Any, **kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return {"text": f"answer with {kw['adapter_key']}"}

    # The route imports workers.serving.generate when it needs it: a stand-in module keeps
    # Ray out of this test.
    fake = types.ModuleType("workers.serving")
    fake.generate = fake_generate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workers.serving", fake)
    monkeypatch.setattr(api.client.app.state, "generator", object(), raising=False)
    return calls


def test_generate_refuses_unknown_unfinished_and_foreign_versions(api: Api, asked) -> None:
    sub = api.headers("submitter")
    ready = add_version(api)
    training = add_version(api, ready=False)
    with transaction(api.db.sessions) as s:
        registry.ensure_lineage(s, name="other", base_model="tiny-test-model")
    foreign = add_version(api, "other")
    with transaction(api.db.sessions) as s:
        failed = registry.create_version(s, lineage=registry.get_lineage(s, "default"),
                                         parent_id=None, ticket_ids=[], job_id=None,
                                         peft_config=None, base_model_sha256=None, actor="t")
        registry.mark_failed(s, version_id=failed.id, actor="t", reason="broke")
        failed_id = failed.id

    ok = api.client.post("/v1/generate", json={"prompt": "hi", "version": str(ready)},
                         headers=sub)
    assert ok.status_code == 200, ok.text
    assert ok.json()["version"] == "default@v1" and len(asked) == 1

    cases = [
        ({"version": "v9"}, 404, "default@v9"),
        ({"version": str(uuid.uuid4())}, 404, "no version"),
        ({"version": "latest"}, 422, "cannot read version reference"),
        ({"version": "v2"}, 409, "training"),
        ({"version": str(training)}, 409, "training"),
        ({"version": str(failed_id)}, 409, "failed"),
        # A version of another lineage is not a version of this one, even by its id.
        ({"version": str(foreign)}, 404, "lineage 'default'"),
        ({"lineage": "nope"}, 404, "unknown lineage 'nope'"),
    ]
    for extra, status, words in cases:
        r = api.client.post("/v1/generate", json={"prompt": "hi", **extra}, headers=sub)
        assert r.status_code == status, (extra, r.text)
        assert words in r.json()["message"], (extra, r.json()["message"])
    assert len(asked) == 1  # none of the refused requests reached the model
    # The other lineage's version is served when asked through its own lineage.
    r = api.client.post("/v1/generate", json={"prompt": "hi", "lineage": "other",
                                              "version": str(foreign)}, headers=sub)
    assert r.status_code == 200 and r.json()["version"] == "other@v1", r.text
