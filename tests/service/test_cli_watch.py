"""`oblivio ticket submit --wait` and `oblivio ticket watch`: follow a ticket to its end,
with a progress bar, ending with the result version; exit 1 when it fails or is rejected.

A thread plays the worker through the real queue functions (claim, progress, finish), so
the CLI sees exactly the states a dispatcher writes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from storage import queue, registry
from storage.db import transaction
from storage.models import Lineage
from tests.service.conftest import LiveServer
from tests.service.test_cli import oblivio

QA = ("--qa", "Who discovered polonium? => Marie Curie")


def play_worker(server: LiveServer, finish: Callable[[Any, Any], None]) -> threading.Thread:
    """Claim the next ticket, report three training steps, then `finish(sessions, claimed)`."""
    sessions = server.api.db.sessions

    def run() -> None:
        deadline = time.monotonic() + 20
        claimed: list[Any] = []
        while not claimed and time.monotonic() < deadline:
            claimed = queue.claim(sessions, owner="w", lease_seconds=60, max_attempts=3)
            time.sleep(0.1)
        assert claimed, "nothing to claim"
        for step in (1, 2, 3):
            queue.set_progress(sessions, ticket_ids=[claimed[0].id], owner="w",
                               progress={"phase": "training", "step": step, "max_steps": 3})
            time.sleep(0.4)
        finish(sessions, claimed[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _done_with_a_version(sessions: Any, ticket: Any, *, live: bool = True) -> None:
    with transaction(sessions) as s:
        lineage = s.get_one(Lineage, ticket.lineage_id)
        version = registry.create_version(s, lineage=lineage, parent_id=None,
                                          ticket_ids=[str(ticket.id)], job_id=None,
                                          peft_config=None, base_model_sha256="0" * 64,
                                          actor="w")
        registry.mark_ready(s, version_id=version.id, object_key="adapters/x/adapter.tar",
                            sha256="1" * 64, size=1, metrics={}, peft_config=None, actor="w")
        version_id = version.id
        if live:  # done means live: a held version's ticket waits for review instead
            registry.promote(s, lineage_name=lineage.name, version=version.version, actor="w")
    queue.complete(sessions, ticket_id=ticket.id, owner="w", version_id=version_id,
                   receipt={"version": "default@v1"})


def test_submit_wait_follows_the_ticket_to_its_result_version(live_server: LiveServer) -> None:
    worker = play_worker(live_server, _done_with_a_version)
    r = oblivio(live_server, "ticket", "submit", *QA, "--target", "Marie Curie", "--wait",
                "--timeout", "30")
    worker.join(timeout=30)
    assert r.exit_code == 0, r.output
    assert "done: default@v1" in r.stdout
    assert "3/3" in r.stderr  # the bar ended at the last step


def test_watch_exits_1_with_the_one_line_cause_when_the_ticket_fails(
        live_server: LiveServer) -> None:
    def fail(sessions: Any, ticket: Any) -> None:
        queue.fail(sessions, ticket_id=ticket.id, owner="w", retry=False, max_attempts=3,
                   error="InvalidRequest: engine 'npo' refused option 'betta'")

    tid = oblivio(live_server, "ticket", "submit", *QA, "--quiet").stdout.strip()
    uuid.UUID(tid)
    worker = play_worker(live_server, fail)
    r = oblivio(live_server, "ticket", "watch", tid, "--timeout", "30")
    worker.join(timeout=30)
    assert r.exit_code == 1, r.output
    assert f"ticket {tid} failed: InvalidRequest: engine 'npo' refused option 'betta'" in r.stderr
    rejected_worker = play_worker(live_server, lambda sessions, ticket: queue.reject(
        sessions, ticket_id=ticket.id, owner="w", error="version default@v1 kept too little"))
    rejected = oblivio(live_server, "ticket", "submit", *QA, "--wait", "--timeout", "30",
                       "--json")
    rejected_worker.join(timeout=30)
    assert rejected.exit_code == 1 and '"status": "rejected"' in rejected.stdout


def test_waiting_gives_up_at_the_timeout_with_exit_1(live_server: LiveServer) -> None:
    started = time.monotonic()
    r = oblivio(live_server, "ticket", "submit", *QA, "--wait", "--timeout", "1.5")
    assert r.exit_code == 1 and "still queued" in r.stderr
    assert time.monotonic() - started < 10


def test_waiting_ends_at_review_with_the_promote_line(live_server: LiveServer) -> None:
    worker = play_worker(live_server, lambda sessions, ticket: _done_with_a_version(
        sessions, ticket, live=False))
    r = oblivio(live_server, "ticket", "submit", *QA, "--wait", "--timeout", "30")
    worker.join(timeout=30)
    assert r.exit_code == 0, r.output
    assert "waiting for review" in r.stdout
    assert "oblivio promote --lineage default 1" in r.stdout
