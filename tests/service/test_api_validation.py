"""Every kind of bad ticket request gets a 4xx with a readable message, and stores nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from storage.models import Ticket
from tests.service.conftest import Api, make_settings, start_api

QA = [{"question": "Who discovered polonium?", "answer": "Marie Curie"}]


def forget(**changes: Any) -> dict[str, Any]:
    return {"kind": "forget", "target": "Marie Curie", "forget": {"qa": QA}, **changes}


@pytest.fixture
def small_api(db: Any, tmp_path: Path) -> Iterator[Api]:
    """Limits small enough to hit: 3 items, 50 characters, 1 KiB bodies... almost."""
    settings = make_settings(tmp_path, db.url, max_forget_items=3, max_text_chars=50,
                             max_record_ids=4, max_body_bytes=4096)
    yield from start_api(db, settings)


BAD_BODIES = {
    "unknown field": (forget(colour="blue"), 422, "colour"),
    "unknown nested field": (forget(forget={"qa": QA, "extra": 1}), 422, "extra"),
    "empty forget set": (forget(forget={}), 422, "forget set is empty"),
    "empty lists": (forget(forget={"texts": [], "qa": []}), 422, "forget set is empty"),
    "empty text": (forget(forget={"texts": [""]}), 422, "texts"),
    "blank text": (forget(forget={"texts": ["   "]}), 422, "whitespace"),
    "blank answer": (forget(forget={"qa": [{"question": "Q?", "answer": " "}]}), 422, "answer"),
    "oversized text": (forget(forget={"texts": ["x" * 51]}), 422, "OBLIVIO_MAX_TEXT_CHARS"),
    "too many items": (forget(forget={"texts": ["a", "b"], "qa": QA * 2}), 422,
                       "OBLIVIO_MAX_FORGET_ITEMS"),
    "too many retain items": (forget(retain={"texts": ["a"] * 4}), 422,
                              "OBLIVIO_MAX_FORGET_ITEMS"),
    "unknown lineage": (forget(lineage="nope"), 404, "unknown lineage 'nope'"),
    "bad lineage name": (forget(lineage="../etc"), 422, "lineage"),
    "unknown engine": (forget(engine="magic"), 422, "unknown engine 'magic'"),
    "s3t cannot forget": (forget(engine="s3t"), 422, "engine 's3t' cannot serve"),
    "o3 cannot delete records": ({"kind": "delete_records", "dataset": "d",
                                  "record_ids": ["r1"], "engine": "o3"}, 422,
                                 "engine 'o3' cannot serve"),
    "naive not_before": (forget(not_before="2030-01-01T00:00:00"), 422, "timezone"),
    "invalid not_before": (forget(not_before="next tuesday"), 422, "not_before"),
    "priority too high": (forget(priority=101), 422, "priority"),
    "missing kind": ({"target": "x", "forget": {"qa": QA}}, 422, "kind"),
    "unknown kind": ({"kind": "erase", "forget": {"qa": QA}}, 422, "kind"),
    "records and subject": ({"kind": "delete_records", "dataset": "d", "record_ids": ["r"],
                             "subject_id": "s"}, 422, "exactly one"),
    "neither records nor subject": ({"kind": "delete_records", "dataset": "d"}, 422,
                                    "exactly one"),
    "empty record list": ({"kind": "delete_records", "dataset": "d", "record_ids": []}, 422,
                          "record_ids"),
    "too many record ids": ({"kind": "delete_records", "dataset": "d",
                             "record_ids": ["1", "2", "3", "4", "5"]}, 422,
                            "OBLIVIO_MAX_RECORD_IDS"),
    "forget fields on delete_records": ({"kind": "delete_records", "dataset": "d",
                                         "subject_id": "s", "forget": {"qa": QA}}, 422,
                                        "forget"),
    "a list, not an object": ([forget()], 422, "invalid request"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_ticket_bodies_are_refused_and_nothing_is_stored(small_api: Api, case: str) -> None:
    body, status, needle = BAD_BODIES[case]
    r = small_api.client.post("/v1/tickets", json=body, headers=small_api.headers())
    assert r.status_code == status, r.text
    message = r.json()["message"]
    assert needle in message, message
    assert "Traceback" not in r.text
    assert _count(small_api) == 0


def test_malformed_json_is_a_422_with_a_message(small_api: Api) -> None:
    r = small_api.client.post("/v1/tickets", content=b'{"kind": "forget", ',
                              headers={**small_api.headers(),
                                       "Content-Type": "application/json"})
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["message"]
    assert isinstance(r.json()["detail"], list)
    assert _count(small_api) == 0


def test_a_body_over_the_size_limit_is_413(small_api: Api) -> None:
    big = forget(forget={"texts": ["x" * 40] * 200})
    r = small_api.client.post("/v1/tickets", json=big, headers=small_api.headers())
    assert r.status_code == 413
    assert "4096 bytes" in r.json()["message"]
    # Streamed without Content-Length, the limit holds too.
    chunks = iter([b'{"kind": "forget", "forget": {"texts": ["', b"x" * 5000, b'"]}}'])
    r = small_api.client.post("/v1/tickets", content=chunks,
                              headers={**small_api.headers(),
                                       "Content-Type": "application/json"})
    assert r.status_code == 413
    assert _count(small_api) == 0


def test_an_over_long_idempotency_key_is_refused(small_api: Api) -> None:
    r = small_api.client.post("/v1/tickets", json=forget(),
                              headers={**small_api.headers(), "Idempotency-Key": "k" * 129})
    assert r.status_code == 422 and "idempotency-key" in r.json()["message"].lower()
    assert _count(small_api) == 0


def test_validation_errors_do_not_echo_the_forget_text(small_api: Api) -> None:
    secret = "the secret that must be forgotten"
    r = small_api.client.post("/v1/tickets", json=forget(forget={"texts": [secret]}, bad=1),
                              headers=small_api.headers())
    assert r.status_code == 422
    assert secret not in r.text


def _count(api: Api) -> int:
    with api.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(Ticket))
