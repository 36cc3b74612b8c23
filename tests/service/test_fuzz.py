"""Bad input, generated: schemathesis against the app's own OpenAPI spec, and hypothesis
properties of the limits and the validators. No 5xx, no traceback, limits hold.

Bounded: FUZZ_EXAMPLES cases per operation and mode (OBLIVIO_FUZZ_EXAMPLES overrides),
derandomised so that CI runs the same cases every time.
"""

from __future__ import annotations

import os
import string
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from storage.models import Ticket
from tests.service.conftest import Api, make_settings, start_api

FUZZ_EXAMPLES = int(os.environ.get("OBLIVIO_FUZZ_EXAMPLES", "20"))
# Where a 503 is the documented answer, not a fault: generation needs `oblivio serve`'s
# Ray Serve deployment, which this in-process app does not start.
UNAVAILABLE_BY_DESIGN = {("POST", "/v1/generate"), ("POST", "/v1/chat/completions")}
BOUNDED = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))


@pytest.fixture
def fuzz_api(db: Any, tmp_path: Path) -> Iterator[Api]:
    """No rate limit (the fuzzer is one token sending hundreds of requests), small limits."""
    yield from start_api(db, make_settings(tmp_path, db.url, rate_limit_per_second=0,
                                           max_forget_items=5, max_text_chars=200,
                                           max_record_ids=5, max_body_bytes=16_384))


def _no_fault(method: str, path: str, status: int, body: str) -> str | None:
    """Why this answer is a fault, or None. (Errors the app only logs are caught by the
    caplog check in the test.)"""
    if "Traceback" in body or 'File "' in body:
        return "traceback in the response"
    if status >= 500 and not (status == 503 and (method, path) in UNAVAILABLE_BY_DESIGN):
        return f"server error {status}"
    return None


def _register_jsonl_serializer(schemathesis: Any) -> None:
    """POST /v1/datasets also takes JSON Lines (one record per line), which schemathesis
    does not know: a generated value becomes one line per item, or one line."""
    import json

    @schemathesis.serializer("application/jsonl")
    def jsonl(_ctx: Any, value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        items = value if isinstance(value, list) else [value]
        return "\n".join(json.dumps(item) for item in items).encode()


def test_schemathesis_finds_no_server_error_on_any_operation(
        fuzz_api: Api, caplog: pytest.LogCaptureFixture) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    _register_jsonl_serializer(schemathesis)
    app = fuzz_api.client.app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = fuzz_api.headers("admin")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    sent, faults = 0, []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @BOUNDED
            @given(case=operation.as_strategy(generation_mode=mode))
            def probe(case: Any) -> None:
                nonlocal sent
                response = case.call(headers=auth)
                sent += 1
                why = _no_fault(operation.method.upper(), operation.path, response.status_code,
                                response.text)
                if why:
                    faults.append(f"{why}: {case.as_curl_command(headers=auth)}\n"
                                  f"  -> {response.text[:300]}")

            try:
                probe()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no inputs)
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(f"\nfuzz (schemathesis): operations: {len(operations)}, requests: {sent}, "
          f"faults: {len(faults)}")
    assert sent >= len(operations) * 2
    assert faults == [], "\n".join(faults[:10])
    # Nothing failed behind the answers either (a handler that logs and carries on).
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == [], tracebacks[:3]


# --- properties of the limits ------------------------------------------------------------

_any_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=300)


@BOUNDED
@given(texts=st.lists(_any_text, min_size=0, max_size=8),
       qa=st.lists(st.tuples(_any_text, _any_text), min_size=0, max_size=8),
       target=st.one_of(st.none(), _any_text), lineage=_any_text,
       priority=st.integers(min_value=-10**6, max_value=10**6))
def _ticket_property(api: Api, texts: list[str], qa: list[tuple[str, str]],
                     target: str | None, lineage: str, priority: int) -> None:
    body = {"kind": "forget", "target": target, "lineage": lineage, "priority": priority,
            "forget": {"texts": texts, "qa": [{"question": q, "answer": a} for q, a in qa]}}
    r = api.client.post("/v1/tickets", json=body, headers=api.headers("submitter"))
    assert _no_fault("POST", "/v1/tickets", r.status_code, r.text) is None, r.text
    items = len(texts) + len(qa)
    longest = max([len(t) for t in texts] + [len(x) for pair in qa for x in pair] + [0])
    blank = any(not t.strip() for t in texts) or any(not x.strip() for p in qa for x in p)
    if r.status_code == 202:
        # Accepted means every limit held.
        assert 1 <= items <= 5 and longest <= 200 and not blank
        assert -100 <= priority <= 100 and lineage == "default"
    else:
        assert r.status_code in (404, 422), r.text
        assert r.json()["message"]
        if items > 5 and r.status_code == 422 and lineage == "default" \
                and -100 <= priority <= 100 and not blank and longest <= 200:
            assert "OBLIVIO_MAX_FORGET_ITEMS" in r.json()["message"]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_ticket_bodies_within_limits_are_accepted_and_the_rest_refused(fuzz_api: Api) -> None:
    _ticket_property(fuzz_api)


def test_text_and_list_limits_give_exact_messages(fuzz_api: Api) -> None:
    def post(body: dict[str, Any]) -> Any:
        return fuzz_api.client.post("/v1/tickets", json=body, headers=fuzz_api.headers())

    r = post({"kind": "forget", "forget": {"texts": ["x" * 201]}})
    assert r.status_code == 422
    assert r.json()["message"] == ("invalid request: forget.texts.0: text has 201 characters; "
                                   "the limit is 200 (OBLIVIO_MAX_TEXT_CHARS)")
    r = post({"kind": "forget", "forget": {"texts": ["x"] * 6}})
    assert r.json()["message"] == ("invalid request: forget: forget set has 6 items; the "
                                   "limit is 5 (OBLIVIO_MAX_FORGET_ITEMS)")
    r = post({"kind": "delete_records", "dataset": "d", "record_ids": ["r"] * 6})
    assert r.json()["message"] == ("invalid request: record_ids: 6 record ids; the limit is 5 "
                                   "(OBLIVIO_MAX_RECORD_IDS)")
    r = fuzz_api.client.post("/v1/tickets", content=b'{"kind": "forget", "x": "' +
                             b"y" * 20_000 + b'"}', headers={**fuzz_api.headers(),
                                                           "Content-Type": "application/json"})
    assert (r.status_code, r.json()["message"]) == (
        413, "request body is larger than the limit of 16384 bytes")
    with fuzz_api.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 0


# --- injection ---------------------------------------------------------------------------

HOSTILE = ["default'; DROP TABLE tickets; --", "x' OR '1'='1", "../../etc/passwd",
           "default\x00", "adapters/../../x", "a" * 129, "%2e%2e%2f", "défault", "x y",
           "); DELETE FROM api_tokens; --", "$(rm -rf /)", "{{7*7}}"]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_lineage_and_dataset_names_are_refused_and_harmless(fuzz_api: Api,
                                                                   name: str) -> None:
    api = fuzz_api
    with api.db.sessions() as s:
        tokens_before = s.scalar(text("SELECT count(*) FROM api_tokens"))
    for method, path, body in (
            ("POST", "/v1/tickets", {"kind": "forget", "lineage": name,
                                     "forget": {"texts": ["t"]}}),
            ("POST", "/v1/tickets", {"kind": "delete_records", "dataset": name,
                                     "record_ids": ["r1"]}),
            ("POST", "/v1/lineages", {"name": name}),
            ("POST", "/v1/generate", {"prompt": "hi", "lineage": name})):
        r = api.client.request(method, path, json=body, headers=api.headers("admin"))
        assert r.status_code == 422, (name, path, r.text)
    quoted = urllib.parse.quote(name, safe="")
    for path in (f"/v1/lineages/{quoted}", f"/v1/lineages/{quoted}/versions",
                 f"/v1/lineages/{quoted}/rollback"):
        method = "POST" if path.endswith("rollback") else "GET"
        r = api.client.request(method, path, headers=api.headers("admin"))
        assert r.status_code in (404, 422), (name, path, r.text)
    r = api.client.get("/v1/tickets", params={"lineage": name}, headers=api.headers("admin"))
    assert r.status_code == 422, r.text
    r = api.client.get("/v1/tickets", params={"requester": name}, headers=api.headers("admin"))
    if "\x00" in name or len(name) > 128:
        assert r.status_code == 422, r.text
    else:  # any printable requester is a harmless, bound filter value
        assert (r.status_code, r.json()["items"]) == (200, [])
    # Nothing was interpreted as SQL: every table is still there and still ours.
    with api.db.sessions() as s:
        assert s.scalar(text("SELECT count(*) FROM api_tokens")) == tokens_before
        assert s.scalar(text("SELECT count(*) FROM lineages")) == 1
        assert s.scalar(select(func.count()).select_from(Ticket)) == 0


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(key=st.text(alphabet=string.printable + "\x00é/\\", max_size=80))
def test_object_keys_either_are_refused_or_stay_inside_the_store(tmp_path_factory: Any,
                                                                 key: str) -> None:
    from storage.errors import InvalidRequest
    from storage.objectstore import LocalObjectStore, validate_key

    root = tmp_path_factory.getbasetemp() / "key-store"
    store = LocalObjectStore(root)
    try:
        validate_key(key)
    except InvalidRequest:
        with pytest.raises(InvalidRequest):
            store.put_bytes(key, b"x")
        return
    path = store._path(key)
    assert store.root in path.parents
    assert ".." not in key.split("/") and not key.startswith("/")


def test_prompt_text_is_never_configuration(fuzz_api: Api) -> None:
    """Settings-looking text in a ticket stays data: nothing about the service changes."""
    api = fuzz_api
    sneaky = ['{"max_steps": 100000}', "OBLIVIO_AUTO_PROMOTE=false", "engine: s3t",
              "--rate-limit 0", "${OBLIVIO_PAYLOAD_KEY}"]
    r = api.client.post("/v1/tickets", headers=api.headers(), json={
        "kind": "forget", "target": sneaky[0], "forget": {"texts": sneaky[:5]}})
    assert r.status_code == 202, r.text
    assert r.json()["engine"] == "o3" and r.json()["priority"] == 0
    assert api.settings.recipe == {} and api.settings.auto_promote is True
