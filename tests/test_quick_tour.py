"""The README's quick tour, walked literally as a new user would (`make test-tour`; CI).

The README is the one source: this test reads the fenced `bash` blocks of its "A quick
tour" section. In a clean copy of the project (tracked files, the installed .venv), with
the default relative data dir (./.oblivio):
- the block with `make run` runs in the background, as the user's first shell;
- once the API answers, every other block runs in one bash (`set -euo pipefail`), as the
  second shell: submits with `--wait` must end `done`, every command must succeed;
- then: both tickets are done, /v1/generate answers from the live version, SIGTERM stops
  the service within 30 s, and no process it started (marked through its environment) is
  left.
The only change to the README's text: its port 8000 becomes a free port, so the tour can
run beside anything else on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
STOP_SECONDS = 30


def tour_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the README's "A quick tour" section, in order."""
    section = readme.split("## A quick tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_the_readme_tour_is_found_and_starts_with_make_run() -> None:
    # In `make test` (cheap): the README keeps a tour this file can walk.
    blocks = tour_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2
    assert "make run" in blocks[0]
    later = "\n".join(blocks[1:])
    assert later.count("--wait") >= 2 and "--text" in later and "--qa" in later
    assert "/v1/generate" in later


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_copy(dest: Path) -> None:
    """The tracked files, as a fresh clone has them, plus the installed virtualenv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    os.symlink(REPO / ".venv", dest / ".venv")


def _check_installed(root: Path) -> None:
    """`make run` must find the virtualenv installed (as `make test` leaves it): were it to
    install here, it would point the shared .venv's editable install at this copy."""
    import glob
    import hashlib

    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()
                            + (root / "scripts" / "bootstrap.sh").read_bytes()).hexdigest()
    stamp = REPO / ".venv" / f".oblivio-installed-{digest[:16]}"
    if not (stamp.exists() or glob.glob(f"{stamp}-*")):
        pytest.fail("the virtualenv is not installed for this pyproject.toml: run "
                    "`bash scripts/bootstrap.sh test` (make test-tour does) first")


def _marked(marker: str) -> list[str]:
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("OBLIVIO_TOUR_MARK") == marker:
                left.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


@pytest.mark.tour
@pytest.mark.timeout(1800)  # the real model, two tickets, start and stop
def test_the_readme_quick_tour_works_for_a_new_user(tmp_path: Path) -> None:
    root = tmp_path / "oblivio"
    root.mkdir()
    _clean_copy(root)
    _check_installed(root)
    port = _free_port()
    blocks = [b.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
              for b in tour_blocks((REPO / "README.md").read_text())]
    start = next(line for line in blocks[0].splitlines() if "make run" in line)
    marker = uuid.uuid4().hex
    env = {**os.environ, "OBLIVIO_API_PORT": str(port), "OBLIVIO_TOUR_MARK": marker}
    for name in [k for k in env if k.startswith("OBLIVIO_") and k not in (
            "OBLIVIO_API_PORT", "OBLIVIO_TOUR_MARK")]:
        del env[name]  # a new user has none of the test suite's settings
    log = (tmp_path / "service.log").open("w")
    started = time.monotonic()
    service = subprocess.Popen(["bash", "-c", start], cwd=root, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(port, service, tmp_path / "service.log")
        up = time.monotonic() - started
        script = "set -euo pipefail\n" + "\n".join(blocks[1:])
        tour = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True,
                              text=True, timeout=1500)
        walked = time.monotonic() - started - up
        assert tour.returncode == 0, (f"the tour failed:\n{tour.stdout[-3000:]}\n"
                                      f"{tour.stderr[-3000:]}\n{_tail(tmp_path / 'service.log')}")
        _check_outcome(root, port)
    finally:
        stop_started = time.monotonic()
        # SIGTERM to the service process (`oblivio serve`, which `make run` execs through
        # scripts/serve.sh), as a process manager stops it; make and bash end with it.
        os.kill(_serve_pid(service.pid), signal.SIGTERM)
        try:
            service.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=10)
            pytest.fail(f"the service did not stop within {STOP_SECONDS} s of SIGTERM")
        stopped = time.monotonic() - stop_started
        log.close()
        deadline = time.monotonic() + 10  # Ray's own processes exit just after the driver
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked(marker)
        for line in left:  # leave nothing behind even when failing
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not left, f"processes left after the service stopped: {left}"
    print(f"\nquick tour: service up {up:.0f} s, tour {walked:.0f} s, stopped in {stopped:.1f} s")


def _serve_pid(root_pid: int) -> int:
    import psutil

    try:
        for proc in [psutil.Process(root_pid), *psutil.Process(root_pid).children(True)]:
            cmdline = proc.cmdline()
            if any(part.endswith("oblivio") for part in cmdline[:2]) and "serve" in cmdline:
                return proc.pid
    except psutil.NoSuchProcess:
        pass
    return root_pid


def _wait_until_up(port: int, service: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600  # the first run converts the bundled model
    while time.monotonic() < deadline:
        if service.poll() is not None:
            pytest.fail(f"`make run` exited with {service.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"the service did not come up:\n{_tail(log)}")


def _check_outcome(root: Path, port: int) -> None:
    token = (root / ".oblivio" / "admin-token").read_text().strip()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)
    items = api.get("/v1/tickets", params={"limit": 10}).json()["items"]
    trained = [t for t in items if t["status"] != "cancelled"]
    assert sorted(t["status"] for t in trained) == ["done", "done"], json.dumps(items)[:2000]
    assert {t["target"] for t in trained} == {"Marie Curie", None}  # the QA and the text
    live = api.get("/v1/lineages/default").json()["aliases"]["live"]
    answer = api.post("/v1/generate", json={"prompt": "Who discovered polonium?"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == live == "default@v2"
    assert isinstance(answer.json()["text"], str)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""
