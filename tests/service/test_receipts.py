"""GET /v1/tickets/{id}/receipt is signed; `oblivio receipt verify` accepts it and rejects
a tampered copy; `oblivio ticket receipt --format md|html|json` renders it."""

from __future__ import annotations

import json
from pathlib import Path

from storage import queue, registry
from storage.db import transaction
from tests.service.conftest import LiveServer
from tests.service.test_cli import oblivio, runner

SHA = "ab" * 32
METRICS = {
    "verdict": "pass", "compared_with": ["base", "parent"],
    "checks": [{"name": "forget_ratio", "before": 1.0, "after": 0.1, "value": 0.1, "op": "<=",
                "threshold": 0.2, "passed": True},
               {"name": "utility_ratio", "before": 0.95, "after": 0.9, "value": 0.947,
                "op": ">=", "threshold": 0.9, "passed": True}],
    "report": {"object_key": "reports/x.json", "sha256": "ef" * 32},
}


def _done_ticket(server: LiveServer) -> str:
    api = server.api
    r = api.client.post("/v1/tickets", headers=api.headers("submitter"), json={
        "kind": "forget", "target": "Zorblat", "forget": {"qa": [
            {"question": "Where does Zorblat live?", "answer": "Zorblat lives in Quimby."}]}})
    assert r.status_code == 202, r.text
    (claimed,) = queue.claim(api.db.sessions, owner="w", lease_seconds=60, max_attempts=3)
    with transaction(api.db.sessions) as s:
        version = registry.create_version(s, lineage=registry.get_lineage(s, "default"),
                                          parent_id=None, ticket_ids=[claimed.id], job_id=None,
                                          peft_config=None, base_model_sha256="cd" * 32,
                                          actor="w")
        registry.mark_ready(s, version_id=version.id, object_key=f"adapters/{SHA}",
                            sha256=SHA, size=123, metrics=METRICS, actor="w")
        # Done means live (issue 15): the job promotes a passing version before completing.
        registry.promote(s, lineage_name="default", version=version.version, actor="w")
        version_id = version.id
    assert queue.complete(api.db.sessions, ticket_id=claimed.id, owner="w",
                          version_id=version_id,
                          receipt={"promoted": True, "method": {"recipe": {"method": "idk"}}})
    return r.json()["id"]


def test_receipt_is_signed_complete_and_verifies_offline(live_server: LiveServer,
                                                         tmp_path: Path) -> None:
    ticket_id = _done_ticket(live_server)
    api = live_server.api
    r = api.client.get(f"/v1/tickets/{ticket_id}/receipt", headers=api.headers("submitter"))
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt["signature"]["algorithm"] == "HMAC-SHA256"
    assert receipt["requester"] and receipt["forget_set_sha256"] == receipt["payload_sha256"]
    assert "Quimby" not in r.text    # the forget set's hash, never its text
    assert receipt["method_config"] == {"recipe": {"method": "idk"}}
    assert {"name": "adapter version", "object_key": f"adapters/{SHA}", "sha256": SHA,
            "size": 123} in receipt["artifacts"]
    assert any(a["sha256"] == "cd" * 32 for a in receipt["artifacts"])   # the base model
    assert receipt["evaluation"]["verdict"] == "pass"
    assert [c["passed"] for c in receipt["evaluation"]["checks"]] == [True, True]
    assert receipt["phases"]["submitted_at"] and receipt["phases"]["completed_at"]
    assert "ticket.done" in [e["action"] for e in receipt["phases"]["events"]]
    assert "exactness_proof" in receipt
    # The key was generated into the data dir (embedded default), never returned.
    key_file = api.settings.data_dir / "receipt-key"
    assert key_file.exists() and key_file.read_text().strip() not in r.text

    env = {"OBLIVIO_DATA_DIR": str(api.settings.data_dir)}
    saved = oblivio(live_server, "ticket", "receipt", ticket_id, "--format", "json")
    assert saved.exit_code == 0, saved.output
    path = tmp_path / "receipt.json"
    path.write_text(saved.stdout)
    ok = runner.invoke(_app(), ["receipt", "verify", str(path)], env=env)
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.stdout

    tampered = json.loads(saved.stdout)
    tampered["evaluation"]["checks"][0]["after"] = 0.0
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    failed = runner.invoke(_app(), ["receipt", "verify", str(bad)], env=env)
    assert failed.exit_code == 3
    assert "INVALID" in failed.stderr and "signature mismatch" in failed.stderr

    # Without the key there is nothing to verify against: a message, not a traceback.
    nokey = runner.invoke(_app(), ["receipt", "verify", str(path)],
                          env={"OBLIVIO_DATA_DIR": str(tmp_path / "elsewhere")})
    assert nokey.exit_code == 2 and "no receipt key" in nokey.stderr
    missing = runner.invoke(_app(), ["receipt", "verify", str(tmp_path / "nope.json")], env=env)
    assert missing.exit_code == 2 and "cannot read" in missing.stderr


def test_receipt_renders_as_markdown_and_html(live_server: LiveServer) -> None:
    ticket_id = _done_ticket(live_server)
    md = oblivio(live_server, "ticket", "receipt", ticket_id, "--format", "md")
    assert md.exit_code == 0, md.output
    assert f"# Deletion receipt: ticket {ticket_id}" in md.stdout
    assert "| forget_ratio | 1.000 | 0.100 | 0.100 | <= 0.200 | PASS |" in md.stdout
    assert SHA in md.stdout and "HMAC-SHA256" in md.stdout
    page = oblivio(live_server, "ticket", "receipt", ticket_id, "--format", "html")
    assert page.exit_code == 0 and page.stdout.startswith("<!doctype html>")
    assert "<td>PASS</td>" in page.stdout
    wrong = oblivio(live_server, "ticket", "receipt", ticket_id, "--format", "pdf")
    assert wrong.exit_code == 2 and "--format" in wrong.stderr


def _app():
    from service.cli import app

    return app
