"""The `oblivio` CLI against a real server (uvicorn on 127.0.0.1) and a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from storage import registry
from storage.db import transaction
from tests.service.conftest import LiveServer, closed_port

runner = CliRunner()


def oblivio(server: LiveServer, *args: str, role: str = "admin", token: str | None = None,
            env: dict[str, str] | None = None) -> Any:
    """Run one CLI command in-process against the live server."""
    secret = token or server.api.secrets[role]
    return runner.invoke(app, [*args, "--api-url", server.url, "--token", secret], env=env)


def test_submit_show_list_cancel(live_server: LiveServer) -> None:
    r = oblivio(live_server, "ticket", "submit", "--text", "Marie Curie was born in Warsaw.",
                "--qa", "Who discovered polonium? => Marie Curie", "--target", "Marie Curie",
                "--idempotency-key", "cli-1", "--json")
    assert r.exit_code == 0, r.output
    ticket = json.loads(r.stdout)
    assert ticket["status"] == "queued" and ticket["target"] == "Marie Curie"
    assert ticket["summary"] == {"forget_texts": 1, "forget_qa": 1}
    tid = ticket["id"]

    again = oblivio(live_server, "ticket", "submit", "--text", "Marie Curie was born in Warsaw.",
                    "--qa", "Who discovered polonium? => Marie Curie", "--target", "Marie Curie",
                    "--idempotency-key", "cli-1", "--quiet")
    assert again.exit_code == 0 and again.stdout.strip() == tid

    shown = oblivio(live_server, "ticket", "show", tid)
    assert shown.exit_code == 0, shown.output
    assert tid in shown.stdout and "queued" in shown.stdout and "Marie Curie" in shown.stdout

    listed = oblivio(live_server, "ticket", "list", "--status", "queued")
    assert listed.exit_code == 0 and tid in listed.stdout
    as_json = json.loads(oblivio(live_server, "ticket", "list", "--json").stdout)
    assert [t["id"] for t in as_json["items"]] == [tid]

    # Only a done ticket can be revoked: refused with the reason and a non-zero exit.
    refused = oblivio(live_server, "ticket", "revoke", tid, "--reason", "withdrawn")
    assert refused.exit_code != 0 and "only a done ticket" in refused.output

    cancelled = oblivio(live_server, "ticket", "cancel", tid)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    shown = json.loads(oblivio(live_server, "ticket", "show", tid, "--json").stdout)
    assert shown["status"] == "cancelled"
    empty = oblivio(live_server, "ticket", "list", "--status", "queued")
    assert empty.exit_code == 0 and "no tickets" in empty.stdout


def test_submit_from_a_json_file_and_refusals(live_server: LiveServer, tmp_path: Path) -> None:
    from tests.fixtures.datasets import register_s3t_lineage

    register_s3t_lineage(live_server.api, dataset="chats", lineage="chats", records=[
        {"id": "r1", "text": "a"}, {"id": "r2", "text": "b"}])
    body = tmp_path / "ticket.json"
    body.write_text(json.dumps({"kind": "delete_records", "dataset": "chats", "lineage": "chats",
                                "record_ids": ["r1", "r2"]}))
    r = oblivio(live_server, "ticket", "submit", str(body), "--priority", "7", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"] == "s3t" and json.loads(r.stdout)["priority"] == 7

    refused = oblivio(live_server, "ticket", "submit", "--text", "x", "--engine", "s3t")
    assert refused.exit_code == 2
    assert "engine 's3t' cannot serve" in refused.stderr and "HTTP 422" in refused.stderr
    bad_qa = oblivio(live_server, "ticket", "submit", "--qa", "no arrow here")
    assert bad_qa.exit_code == 2 and "question=>answer" in bad_qa.stderr
    both = oblivio(live_server, "ticket", "submit", str(body), "--text", "x")
    assert both.exit_code == 2 and "not both" in both.stderr
    nothing = oblivio(live_server, "ticket", "submit")
    assert nothing.exit_code == 2 and "nothing to submit" in nothing.stderr
    body.write_text("{not json")
    broken = oblivio(live_server, "ticket", "submit", str(body))
    assert broken.exit_code == 2 and "not valid JSON" in broken.stderr
    missing = oblivio(live_server, "ticket", "show", str(uuid.uuid4()))
    assert missing.exit_code == 2 and "not found" in missing.stderr
    not_done = json.loads(oblivio(live_server, "ticket", "list", "--json").stdout)["items"][0]
    receipt = oblivio(live_server, "ticket", "receipt", not_done["id"])
    assert receipt.exit_code == 2 and "once it is done" in receipt.stderr
    for r in (refused, bad_qa, both, nothing, broken, missing, receipt):
        assert "Traceback" not in r.output


def test_wrong_token_and_wrong_role(live_server: LiveServer) -> None:
    r = oblivio(live_server, "ticket", "list", token="obl_wrong")
    assert r.exit_code == 2 and "HTTP 401" in r.stderr and "--token" in r.stderr
    r = oblivio(live_server, "versions", "list", role="submitter")
    assert r.exit_code == 2 and "HTTP 403" in r.stderr


def test_versions_promote_rollback_revoke(live_server: LiveServer) -> None:
    sessions = live_server.api.db.sessions
    ids = []
    with transaction(sessions) as s:
        lineage = registry.get_lineage(s, "default")
        for _ in range(2):
            v = registry.create_version(s, lineage=lineage, parent_id=None, ticket_ids=[],
                                        job_id=None, peft_config=None, base_model_sha256=None,
                                        actor="test")
            sha = uuid.uuid4().hex * 2
            registry.mark_ready(s, version_id=v.id, object_key=f"adapters/{sha}", sha256=sha,
                                size=1, metrics=None, actor="test")
            ids.append(str(v.id))

    r = oblivio(live_server, "promote", "--lineage", "default", "1")
    assert r.exit_code == 0 and "live -> default@v1" in r.stdout
    r = oblivio(live_server, "promote", "2", role="operator")
    assert r.exit_code == 0 and "default@v2" in r.stdout
    listed = oblivio(live_server, "versions", "list", "--lineage", "default")
    assert listed.exit_code == 0 and "default@v2" in listed.stdout and ids[0] in listed.stdout
    r = oblivio(live_server, "rollback", "--lineage", "default")
    assert r.exit_code == 0 and "live -> default@v1" in r.stdout
    r = oblivio(live_server, "rollback", "--lineage", "default")
    assert r.exit_code == 2 and "nothing to roll back" in r.stderr
    r = oblivio(live_server, "revoke", ids[1], "--reason", "bad utility")
    assert r.exit_code == 0 and "default@v2 revoked" in r.stdout
    versions = json.loads(oblivio(live_server, "versions", "list", "--json").stdout)
    assert [v["status"] for v in versions] == ["ready", "revoked"]
    r = oblivio(live_server, "lineage", "create", "support", "--base-model", "/models/x")
    assert r.exit_code == 0 and "support" in r.stdout
    r = oblivio(live_server, "lineage", "list")
    assert r.exit_code == 0 and "support" in r.stdout and "live=default@v1" in r.stdout


def test_token_create_prints_a_token_that_works(live_server: LiveServer) -> None:
    env = {"OBLIVIO_DATABASE_URL": live_server.api.db.url}
    r = runner.invoke(app, ["token", "create", "--role", "submitter", "--name", "backend"],
                      env=env)
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip()
    assert secret.startswith("obl_") and "\n" not in secret
    assert "not shown again" in r.stderr
    submitted = oblivio(live_server, "ticket", "submit", "--text", "forget me", "--json",
                        token=secret)
    assert submitted.exit_code == 0, submitted.output
    assert json.loads(submitted.stdout)["status"] == "queued"

    listed = runner.invoke(app, ["token", "list", "--json"], env=env)
    entry = next(t for t in json.loads(listed.stdout) if t["name"] == "backend")
    assert secret not in listed.stdout
    revoked = runner.invoke(app, ["token", "revoke", entry["id"]], env=env)
    assert revoked.exit_code == 0
    assert oblivio(live_server, "ticket", "list", token=secret).exit_code == 2
    bad = runner.invoke(app, ["token", "create", "--role", "root"], env=env)
    assert bad.exit_code == 2 and "unknown role" in bad.stderr


def test_token_create_on_an_empty_database_says_to_upgrade(tmp_path: Path) -> None:
    env = {"OBLIVIO_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    r = runner.invoke(app, ["token", "create", "--role", "admin"], env=env)
    assert r.exit_code == 1 and "oblivio db upgrade" in r.stderr
    r = runner.invoke(app, ["db", "upgrade"], env=env)
    assert r.exit_code == 0 and "revision" in r.stdout
    r = runner.invoke(app, ["token", "create", "--role", "admin"], env=env)
    assert r.exit_code == 0 and r.stdout.startswith("obl_")


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "oblivio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def test_an_unreachable_server_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBLIVIO_")}
    env["OBLIVIO_DATA_DIR"] = str(tmp_path)
    for args in (["ticket", "list"], ["ticket", "submit", "--text", "x"], ["promote", "2"]):
        out = subprocess.run([*_cli_command(), *args, "--api-url", url, "--token", "obl_x"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1, out
        assert f"cannot reach the oblivio API at {url}" in out.stderr
        assert "oblivio serve" in out.stderr
        assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["ticket", "show", "x", "--api-url", "not a url"], 1, "cannot reach the oblivio API"),
    (["ticket", "list", "--limit", "0"], 2, "--limit"),
])
def test_bad_arguments_fail_cleanly(args: list[str], code: int, needle: str) -> None:
    r = runner.invoke(app, [*args, "--token", "obl_x"])
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit | None)
    assert needle in r.stderr


def test_ask_streams_the_live_versions_answer_and_names_it(live_server: LiveServer,
                                                           tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    """`oblivio ask` answers from the live version (real serving code on the tiny model, a
    real stored adapter), as /v1/generate does, and says which version answered."""
    from tests.fixtures.service_process import InProcessGenerator
    from tests.fixtures.versions import add_version, random_adapter

    api = live_server.api
    settings = api.settings.model_copy(update={"base_model": str(tiny_model_dir)})
    api.client.app.state.generator = InProcessGenerator(settings)
    add_version(api.db.sessions, settings.store_config().open(), lineage="default",
                promote=True, adapter_dir=random_adapter(tiny_model_dir, tmp_path / "a", seed=1))
    prompt = "Where does Zorblat live?"

    asked = oblivio(live_server, "ask", prompt, "--max-new-tokens", "8", role="submitter")
    assert asked.exit_code == 0, asked.output
    whole = json.loads(oblivio(live_server, "ask", prompt, "--max-new-tokens", "8", "--json",
                               role="submitter").stdout)
    assert whole["version"] == "default@v1" and whole["text"]
    assert asked.stdout == whole["text"] + "\n" and "(default@v1)" in asked.stderr
    base = oblivio(live_server, "ask", prompt, "--version", "base", "--max-new-tokens", "8",
                   role="submitter")
    assert base.exit_code == 0 and "(default@base)" in base.stderr
    assert base.stdout != asked.stdout, "the adapter changes the answer: the test can fail"

    missing = oblivio(live_server, "ask", prompt, "--lineage", "nope", role="submitter")
    assert missing.exit_code == 2 and "unknown lineage 'nope'" in missing.stderr
