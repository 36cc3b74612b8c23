"""Idempotency-Key: one ticket per key, whatever the retries and races."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select

from storage import tickets
from storage.errors import Conflict
from storage.models import Ticket, TicketKind
from tests.service.conftest import Api

BOTH = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)

BODY = {"kind": "forget", "target": "Ada Lovelace",
        "forget": {"texts": ["Ada Lovelace wrote the first published algorithm."]}}


def post(api: Api, body: dict[str, Any], key: str, role: str = "submitter") -> Any:
    return api.client.post("/v1/tickets", json=body,
                           headers={**api.headers(role), "Idempotency-Key": key})


def count(api: Api) -> int:
    with api.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(Ticket))


@BOTH
def test_same_key_returns_the_same_ticket(api: Api) -> None:
    first = post(api, BODY, "dpo-0042")
    again = post(api, BODY, "dpo-0042")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    # Scheduling fields are not part of what was asked: a retry that changes them replays.
    assert post(api, {**BODY, "priority": 3}, "dpo-0042").json()["id"] == first.json()["id"]
    assert count(api) == 1


@BOTH
def test_same_key_with_a_different_request_is_a_conflict(api: Api) -> None:
    first = post(api, BODY, "dpo-0043")
    assert first.status_code == 202
    other = {**BODY, "forget": {"texts": ["something else entirely"]}}
    r = post(api, other, "dpo-0043")
    assert r.status_code == 409
    assert "different request" in r.json()["message"]
    r = post(api, {**BODY, "engine": "ga"}, "dpo-0043")
    assert r.status_code == 409
    # Another requester cannot use (or discover) someone else's key.
    r = post(api, BODY, "dpo-0043", role="operator")
    assert r.status_code == 409
    assert first.json()["id"] not in r.text
    assert count(api) == 1


@BOTH
def test_concurrent_submits_with_one_key_make_one_ticket(api: Api) -> None:
    barrier = threading.Barrier(8)

    def one(_: int) -> Any:
        barrier.wait(timeout=10)
        return post(api, BODY, "race-key")

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(one, range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api) == 1


@BOTH
def test_losing_the_insert_race_returns_the_winners_ticket(api: Api) -> None:
    """Force the race: B checks for the key while A's insert is not yet committed."""
    lineage = "default"
    request = tickets.TicketRequest(kind=TicketKind.forget, lineage=lineage, engine="npo",
                                    payload={"target": None, "forget": {"texts": ["x"], "qa": []},
                                             "retain": None})
    with api.db.sessions() as a:
        won = tickets.submit(a, request=request, requester="r", idempotency_key="k1")
        a.flush()
        result: dict[str, Any] = {}

        def b() -> None:
            with api.db.sessions() as s:
                try:
                    result["ticket"] = tickets.submit_or_replay(
                        s, request=request, requester="r", idempotency_key="k1")
                    s.commit()
                except Exception as exc:  # reported below
                    result["error"] = exc

        thread = threading.Thread(target=b)
        thread.start()
        time.sleep(0.5)  # B is now blocked: on the unique index (PG) or the write lock (SQLite)
        a.commit()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert result["ticket"].created is False
    assert result["ticket"].ticket.id == won.id
    assert count(api) == 1


def test_the_domain_refuses_a_changed_request_for_a_used_key(api: Api) -> None:
    payload = {"target": None, "forget": {"texts": ["x"], "qa": []}, "retain": None}
    request = tickets.TicketRequest(kind=TicketKind.forget, engine="npo", payload=payload)
    with api.db.sessions() as s:
        tickets.submit(s, request=request, requester="r", idempotency_key="k2")
        changed = tickets.TicketRequest(kind=TicketKind.forget, engine="npo",
                                        payload={**payload, "target": "someone"})
        with pytest.raises(Conflict):
            tickets.submit(s, request=changed, requester="r", idempotency_key="k2")
