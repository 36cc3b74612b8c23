"""The OpenAI-compatible endpoint, driven by the `openai` Python client against a real uvicorn.

The serving path is the real one: Ray Serve's Generator on the tiny random-weight model,
with real LoRA versions stored in the object store and resolved through the registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import tokens
from storage.db import transaction
from tests.fixtures.versions import add_version, random_adapter
from tests.service.conftest import free_socket

openai = pytest.importorskip("openai")


@dataclass
class Served:
    url: str
    secret: str
    client: TestClient
    settings: Settings


def _uvicorn(app: object) -> Iterator[str]:
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _settings(tmp_path: Path, base_model: str) -> Settings:
    return Settings(data_dir=tmp_path / "data",
                    database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                    object_store=f"file://{tmp_path / 'objects'}", base_model=base_model)


def _start(settings: Settings) -> Iterator[tuple[TestClient, str]]:
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            secret = tokens.create_token(s, role="operator", name="openai-test")[1]
        yield client, secret


@pytest.fixture
def served(tmp_path: Path, tiny_model_dir: Path, ray_cluster) -> Iterator[Served]:
    from ray import serve

    from workers.runtime import serving_config
    from workers.serving import deploy

    settings = _settings(tmp_path, str(tiny_model_dir))
    for client, secret in _start(settings):
        client.app.state.generator = deploy(serving_config(settings.worker_config()))
        try:
            for url in _uvicorn(client.app):
                yield Served(url=url, secret=secret, client=client, settings=settings)
        finally:
            serve.shutdown()


def _generate(served: Served, version: str | None, prompt: str) -> dict:
    res = httpx.post(f"{served.url}/v1/generate", timeout=60,
                     headers={"Authorization": f"Bearer {served.secret}"},
                     json={"prompt": prompt, "version": version, "max_new_tokens": 8})
    assert res.status_code == 200, res.text
    return res.json()


def test_openai_client_chats_with_the_live_version(served: Served, tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    app = served.client.app
    store = served.settings.store_config().open()
    v1 = add_version(app.state.sessions, store, lineage="default", promote=True,
                     adapter_dir=random_adapter(tiny_model_dir, tmp_path / "a1", seed=1),
                     metrics={"forget_ratio": 0.1, "utility_ratio": 0.95})
    add_version(app.state.sessions, store, lineage="default", promote=False,
                adapter_dir=random_adapter(tiny_model_dir, tmp_path / "a2", seed=2))

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.secret, max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert {"default", "default@base", "default@live", "default@v1", "default@v2"} <= ids
    assert client.models.retrieve("default").model_extra["version"] == 1

    prompt = "Where does Zorblat 3 live?"
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=8)
    assert reply.model == "default@v1"
    answer = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    # The random tiny model never ends its turn: the answer is cut at its 8 tokens.
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    # The same answer /v1/generate gives from the live version, and not the base model's.
    assert answer == _generate(served, None, prompt)["text"]
    base = client.chat.completions.create(model="default@base", messages=messages,
                                          max_tokens=8)
    assert base.model == "default@base"
    assert base.choices[0].message.content == _generate(served, "base", prompt)["text"]
    assert base.choices[0].message.content != answer, "the adapter must change the answer"

    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                            stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"default@v1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == "length"
    # Asked for, usage ends the stream in a chunk of its own, as in the whole reply.
    *counted, last = client.chat.completions.create(
        model="default", messages=messages, max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    assert last.choices == [] and last.usage == reply.usage
    assert "".join(c.choices[0].delta.content or "" for c in counted) == answer

    # Token by token: the first pieces arrive while the rest is still being decoded, and
    # they join to the whole answer, cut at a stop sequence as the whole answer is.
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    whole = client.chat.completions.create(model="default", messages=story, max_tokens=300)
    whole_text = whole.choices[0].message.content
    started, pieces, arrivals = time.monotonic(), [], []
    for chunk in client.chat.completions.create(model="default", messages=story,
                                                max_tokens=300, stream=True):
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            arrivals.append(time.monotonic() - started)
    assert "".join(pieces) == whole_text
    assert len(pieces) > 30 and arrivals[0] < arrivals[-1] / 2, arrivals
    stop = whole_text[len(whole_text) // 2:][:3]
    cut = client.chat.completions.create(model="default", messages=story, max_tokens=300,
                                         stop=[stop]).choices[0]
    assert cut.message.content == whole_text[:whole_text.index(stop)]
    assert cut.finish_reason == "stop"
    cut_chunks = list(client.chat.completions.create(
        model="default", messages=story, max_tokens=300, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in cut_chunks) == cut.message.content
    assert cut_chunks[-1].choices[0].finish_reason == "stop"
    # Cut by a stop sequence, the stream counts the tokens decoded up to it, not the budget.
    *_, cut_usage = client.chat.completions.create(
        model="default", messages=story, max_tokens=300, stop=[stop], stream=True,
        stream_options={"include_usage": True})
    assert 0 < cut_usage.usage.completion_tokens < whole.usage.completion_tokens
    assert cut_usage.usage.prompt_tokens == whole.usage.prompt_tokens

    # An operator moves live: the same model name now answers from v2.
    promoted = httpx.post(f"{served.url}/v1/lineages/default/promote", timeout=10,
                          headers={"Authorization": f"Bearer {served.secret}"},
                          json={"version": 2})
    assert promoted.status_code == 200, promoted.text
    after = client.chat.completions.create(model="default", messages=messages, max_tokens=8)
    assert after.model == "default@v2"
    assert after.choices[0].message.content == _generate(served, "v2", prompt)["text"]
    pinned = client.chat.completions.create(model=f"default@v{v1.version}", messages=messages,
                                            max_tokens=8)
    assert pinned.model == "default@v1" and pinned.choices[0].message.content == answer


def test_openai_errors_are_in_openai_shape(tmp_path: Path) -> None:
    """No serving backend needed: auth, validation and unknown models fail before it."""
    for client, secret in _start(_settings(tmp_path, "tiny-test-model")):
        for url in _uvicorn(client.app):
            oa = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
            msgs = [{"role": "user", "content": "hi"}]
            with pytest.raises(openai.NotFoundError) as missing:
                oa.chat.completions.create(model="nope", messages=msgs)
            assert "unknown lineage 'nope'" in missing.value.message
            assert missing.value.code == "model_not_found"
            with pytest.raises(openai.NotFoundError):
                oa.chat.completions.create(model="default@candidate", messages=msgs)
            with pytest.raises(openai.BadRequestError) as empty:
                oa.chat.completions.create(model="default", messages=[])
            assert empty.value.param == "messages"
            with pytest.raises(openai.BadRequestError):
                oa.chat.completions.create(model="default",
                                           messages=[{"role": "system", "content": "x"}])
            with pytest.raises(openai.AuthenticationError) as denied:
                openai.OpenAI(base_url=f"{url}/v1", api_key="obl_wrong", max_retries=0) \
                    .models.list()
            assert denied.value.code == "invalid_api_key"
            # Generation itself: a clear 503 when this process does not serve.
            with pytest.raises(openai.InternalServerError) as down:
                oa.chat.completions.create(model="default", messages=msgs)
            assert "oblivio serve" in down.value.message
            assert [m.id for m in oa.models.list().data] == ["default", "default@base"]
            body = httpx.get(f"{url}/v1/models/none", headers={
                "Authorization": f"Bearer {secret}"}).json()
            assert body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("text,stops", [
    ("Paris is the capital. END of it", ["END"]),
    ("abcabcabd", ["abd", "cab"]),
    ("no stop here", ["zz", "q"]),
    ("stop at the very end!!", ["!!"]),
    ("ends with a prefix E", ["EN"]),
    ("", ["x"]),
])
def test_a_streamed_answer_is_cut_where_the_whole_answer_is(text: str, stops: list[str]) -> None:
    import random

    from service.api.openai_compat import StopScan, apply_stops

    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) \
            if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        scan = StopScan(stops)
        sent = "".join(scan.feed(p) for p in pieces) + scan.flush()
        assert sent == apply_stops(text, stops)[0], pieces
