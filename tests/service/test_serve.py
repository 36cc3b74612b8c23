"""`oblivio serve` as a user runs it: a real process on the embedded defaults."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service.conftest import closed_port


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "oblivio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def test_serve_starts_writes_an_admin_token_and_accepts_tickets(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBLIVIO_")}
    env.update({"OBLIVIO_DATA_DIR": str(data_dir), "OBLIVIO_BASE_MODEL": "tiny-test-model"})
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*_cli_command(), "serve", "--port", str(port), "--no-workers"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz did not answer in 60 s:\n{log.read_text()}")
            time.sleep(0.2)

        token_file = data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        secret = token_file.read_text().strip()
        output = log.read_text()
        assert f"admin token written to {token_file.resolve()}" in output
        assert f"oblivio API:     {url}" in output and f"{url}/docs" in output
        assert secret not in output  # the token itself goes only to the file

        r = httpx.post(f"{url}/v1/tickets", timeout=10,
                       headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": "k-1"},
                       json={"kind": "forget", "target": "Marie Curie",
                             "forget": {"qa": [{"question": "Who discovered polonium?",
                                                "answer": "Marie Curie"}]}})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued" and r.json()["lineage"] == "default"
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
