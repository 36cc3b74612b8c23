"""`oblivio dataset add/show` and `oblivio lineage finetune` against a live server."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from storage import queue
from tests.fixtures.people import people_records
from tests.service.conftest import LiveServer
from tests.service.test_cli import oblivio
from tests.service.test_cli_watch import _done_with_a_version, play_worker


def test_dataset_add_show_and_finetune(live_server: LiveServer, tmp_path: Path) -> None:
    records = people_records(3)
    file = tmp_path / "people.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in records))
    r = oblivio(live_server, "dataset", "add", "people", str(file))
    assert r.exit_code == 0, r.output
    assert "6 records, 3 subjects" in r.stdout
    again = oblivio(live_server, "dataset", "add", "people", str(file))
    assert again.exit_code == 2 and "'person-0-town'" in again.stderr and "409" in again.stderr
    missing = oblivio(live_server, "dataset", "add", "x", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and "cannot read" in missing.stderr

    assert oblivio(live_server, "lineage", "create", "people", "--engine", "s3t").exit_code == 0
    queued = oblivio(live_server, "lineage", "finetune", "people", "--dataset", "people",
                     "--option", "epochs=3", "--json")
    assert queued.exit_code == 0, queued.output
    out = json.loads(queued.stdout)
    assert out["status"] == "queued" and out["job_id"]
    bad = oblivio(live_server, "lineage", "finetune", "people", "--dataset", "people",
                  "--slices", "2", "--sequences-per-shard", "5")
    assert bad.exit_code == 2 and "orderings" in bad.stderr
    shown = oblivio(live_server, "dataset", "show", "people", "--json")
    assert json.loads(shown.stdout)["records"] == 6


def _finetune_and_wait(live_server: LiveServer, worker: threading.Thread) -> Any:
    """`oblivio lineage finetune l --wait` (lineage and dataset from
    `_s3t_lineage_and_dataset`), while `worker`, already started, plays the worker side."""
    r = oblivio(live_server, "lineage", "finetune", "l", "--dataset", "d", "--shards", "1",
                "--slices", "1", "--sequences-per-shard", "1", "--wait")
    worker.join(timeout=30)
    return r


def _s3t_lineage_and_dataset(live_server: LiveServer) -> None:
    api = live_server.api
    h = api.headers()
    api.client.post("/v1/datasets", json={"name": "d", "records": people_records(1)}, headers=h)
    api.client.post("/v1/lineages", json={"name": "l", "engine": "s3t"}, headers=h)


def test_finetune_wait_follows_the_ticket_to_its_end(live_server: LiveServer) -> None:
    api = live_server.api
    _s3t_lineage_and_dataset(live_server)

    def fail_it_once_claimed() -> None:  # a stand-in worker: claim, report progress, fail
        import time

        for _ in range(100):
            claimed = queue.claim(api.db.sessions, owner="w", lease_seconds=60,
                                  max_attempts=1, kinds=["finetune"])
            if claimed:
                queue.set_progress(api.db.sessions, ticket_ids=[claimed[0].id], owner="w",
                                   progress={"phase": "training", "step": 3, "max_steps": 9})
                time.sleep(1.5)
                queue.fail(api.db.sessions, ticket_id=claimed[0].id, owner="w",
                           error="boom", retry=False, max_attempts=1)
                return
            time.sleep(0.1)

    worker = threading.Thread(target=fail_it_once_claimed)
    worker.start()
    r = _finetune_and_wait(live_server, worker)
    assert r.exit_code == 1 and "fine-tune failed: boom" in r.stderr


def test_finetune_wait_ends_at_review_with_the_promote_line(live_server: LiveServer) -> None:
    # The wait is cli_watch's: a held version ends it (exit 0, how to promote) as for a ticket.
    _s3t_lineage_and_dataset(live_server)
    worker = play_worker(live_server, lambda sessions, ticket: _done_with_a_version(
        sessions, ticket, live=False))
    r = _finetune_and_wait(live_server, worker)
    assert r.exit_code == 0, r.output
    assert "waiting for review" in r.stdout and "oblivio promote --lineage l 1" in r.stdout
    assert "3/3" in r.stderr  # cli_watch's bar, at the worker's last step
