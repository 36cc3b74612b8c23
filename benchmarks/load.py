"""Load: sustained ticket submission with concurrent polling and generation, at 1x and 10x.

    .venv/bin/python benchmarks/load.py [--rate 5] [--seconds 30] [--no-train] [--no-generate]
        [--layouts thread,process]

Starts the service on 127.0.0.1 (tests/fixtures/service_process.py: the API with
in-process generation through the real serving code, and a dispatcher training the tiny
random model with the plain trainer, one job after another while tickets keep coming), in
each layout side by side:
  - thread: the dispatcher is a thread of the API process, at the same priority;
  - process: the dispatcher runs in its own process at the background priority
    (OBLIVIO_BACKGROUND_NICE=10), as `oblivio serve` runs it (a Ray actor) and its ranks;
then drives it with an async httpx client, one phase per rate, for a bounded time each:
  - submissions at `rate` (and 10x) per second, each with its own Idempotency-Key, 10% of
    them sent twice (a client retry) to check that a retry never makes a second ticket;
  - status polls of submitted tickets at 2x the submission rate;
  - generations at a quarter of the submission rate.
Then it reads every ticket back and reports, side by side: throughput, p50/p99 latency per
request kind, errors, lost tickets (a 202 whose ticket is missing) and duplicated tickets
(more tickets than distinct keys). The per-token rate limit is switched off for the run
(one client token sends everything). Run it under the shared lock: it trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/load.py` puts benchmarks/ first on sys.path, where benchmarks/queue.py
# would shadow the standard library's queue (asyncio needs it): use the repository instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Phase:
    rate: float
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {
        "submit": [], "poll": [], "generate": []})
    errors: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> ticket id
    replays: int = 0
    replay_mismatch: int = 0
    requests: int = 0
    wall: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


async def _timed(phase: Phase, kind: str, call: object) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await call  # type: ignore[misc]
    except httpx.HTTPError:
        phase.error(f"{kind}: transport")
        return None
    finally:
        phase.requests += 1
    phase.latencies[kind].append(time.perf_counter() - started)
    return response


async def run_phase(client: httpx.AsyncClient, phase: Phase, *, generate: bool) -> None:
    deadline = time.monotonic() + phase.seconds
    pending: set[asyncio.Task[None]] = set()
    rng = random.Random(int(phase.rate * 1000))

    async def submit() -> None:
        key = f"load-{uuid.uuid4().hex}"
        body = {"kind": "forget", "engine": "npo", "target": "Zorblat",
                "forget": {"qa": [{"question": f"Where does Zorblat {key[-6:]} live?",
                                   "answer": f"In Quimby {key[-6:]}."}]}}
        r = await _timed(phase, "submit", client.post("/v1/tickets", json=body,
                                                      headers={"Idempotency-Key": key}))
        if r is None or r.status_code != 202:
            phase.error(f"submit: {r.status_code if r is not None else 'none'}")
            return
        phase.accepted[key] = r.json()["id"]
        if rng.random() < 0.1:  # a client retrying: must get the same ticket back
            again = await _timed(phase, "submit", client.post(
                "/v1/tickets", json=body, headers={"Idempotency-Key": key}))
            phase.replays += 1
            if again is None or again.status_code != 202 or again.json()["id"] != r.json()["id"]:
                phase.replay_mismatch += 1

    async def poll() -> None:
        if not phase.accepted:
            return
        ticket_id = rng.choice(list(phase.accepted.values()))
        r = await _timed(phase, "poll", client.get(f"/v1/tickets/{ticket_id}"))
        if r is None or r.status_code != 200:
            phase.error(f"poll: {r.status_code if r is not None else 'none'}")

    async def gen() -> None:
        r = await _timed(phase, "generate", client.post(
            "/v1/generate", json={"prompt": "Where does Zorblat live?", "max_new_tokens": 8}))
        if r is None or r.status_code != 200:
            phase.error(f"generate: {r.status_code if r is not None else 'none'}")

    kinds = [(submit, phase.rate), (poll, 2 * phase.rate)]
    if generate:
        kinds.append((gen, phase.rate / 4))
    started = time.monotonic()
    next_at = {fn: started for fn, _ in kinds}
    while time.monotonic() < deadline:
        now = time.monotonic()
        for fn, rate in kinds:
            while next_at[fn] <= now:  # open loop: the schedule does not wait for answers
                task = asyncio.create_task(fn())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at[fn] += 1.0 / rate
        await asyncio.sleep(0.002)
    if pending:  # answers still on their way: wait (bounded), then give up on the rest
        _done, late = await asyncio.wait(pending, timeout=180)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        phase.error("abandoned after the phase") if late else None
    phase.wall = time.monotonic() - started


async def account(client: httpx.AsyncClient, phases: list[Phase]) -> tuple[int, int, int]:
    """(tickets listed, lost, duplicated) over all phases, read back through the API."""
    listed: dict[str, str | None] = {}
    cursor = None
    for _ in range(10_000):
        r = await client.get("/v1/tickets", params={"limit": 500, **({"cursor": cursor}
                                                                     if cursor else {})})
        r.raise_for_status()
        page = r.json()
        for item in page["items"]:
            listed[item["id"]] = item["idempotency_key"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    accepted = {k: v for p in phases for k, v in p.accepted.items()}
    lost = sum(1 for ticket_id in accepted.values() if ticket_id not in listed)
    keys = [k for k in listed.values() if k is not None and k in accepted]
    duplicated = len(keys) - len(set(keys))
    return len(listed), lost, duplicated


def start_service(tmp: Path, *, train: bool, generate: bool, layout: str
                  ) -> tuple[list[subprocess.Popen], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBLIVIO_")}
    env.update({"OBLIVIO_DATA_DIR": str(tmp / "data"),
                "OBLIVIO_RATE_LIMIT_PER_SECOND": "0", "OBLIVIO_TRAINER": "plain",
                "OBLIVIO_BATCH_WINDOW_SECONDS": "0", "PYTHONPATH": str(REPO),
                "OBLIVIO_RECIPE": json.dumps({"max_steps": 6, "eval_every": 0,
                                              "retain_prompts": 4,
                                              "retain_max_new_tokens": 8}),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if train or generate:
        from workers.model import resolve_base_model
        from workers.model.tiny import build_tiny_llama

        bundled = resolve_base_model("bundled:smollm2-135m-instruct",
                                     REPO / ".cache" / "oblivio-data")
        env["OBLIVIO_BASE_MODEL"] = str(build_tiny_llama(tmp / "tiny",
                                                         tokenizer_from=bundled.local_path))
    with socket_port() as port:
        pass
    module = [sys.executable, "-m", "tests.fixtures.service_process"]
    args = [*module, "--port", str(port)]
    if generate:
        args.append("--generate")
    if not train or layout == "process":
        args.append("--no-dispatcher")
    log = open(tmp / "service.log", "wb")
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if procs[0].poll() is not None:
            raise SystemExit(f"service exited: {(tmp / 'service.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    if train and layout == "process":  # after the API has migrated the database
        procs.append(subprocess.Popen([*module, "--dispatcher-only"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    token = (tmp / "data" / "admin-token").read_text().strip()
    return procs, url, token


class socket_port:
    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


async def main_async(args: argparse.Namespace, url: str, token: str, layout: str
                     ) -> tuple[list[Phase], int, int]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        phases = []
        for multiple in (1, 10):
            phase = Phase(rate=args.rate * multiple, seconds=args.seconds)
            await run_phase(client, phase, generate=args.generate)
            phases.append(phase)
        listed, lost, duplicated = await account(client, phases)
        r = await client.get("/v1/jobs", params={"limit": 500})
        jobs = r.json()["items"] if r.status_code == 200 else []
    ended = sum(1 for j in jobs if j.get("status") in ("succeeded", "failed"))
    print(f"\n[{layout}] tickets listed: {listed}, jobs started by the dispatcher during the "
          f"run: {len(jobs)} ({ended} ended), tickets lost: {lost}, duplicated: {duplicated}",
          flush=True)
    return phases, lost, duplicated


def table(results: dict[str, list[Phase]]) -> None:
    print("\n| dispatcher | rate | submitted (202) | throughput req/s | submit p50 ms | "
          "submit p99 ms | poll p50 ms | poll p99 ms | generate p50 ms | generate p99 ms | "
          "errors | retries same ticket |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layout, phases in results.items():
        base = phases[0]
        for p in phases:
            lat = p.latencies
            errors = sum(p.errors.values())
            print(f"| {layout} | {p.rate:g}/s ({p.rate / base.rate:g}x) | {len(p.accepted)} | "
                  f"{p.requests / p.wall:.1f} | {_pct(lat['submit'], .5):.1f} | "
                  f"{_pct(lat['submit'], .99):.1f} | {_pct(lat['poll'], .5):.1f} | "
                  f"{_pct(lat['poll'], .99):.1f} | {_pct(lat['generate'], .5):.1f} | "
                  f"{_pct(lat['generate'], .99):.1f} | {errors} {p.errors or ''} | "
                  f"{p.replays - p.replay_mismatch}/{p.replays} |")
    if len(results) == 2:
        (a, pa), (b, pb) = results.items()
        for n, label in ((0, "1x"), (-1, "10x")):
            ratio = _pct(pb[n].latencies["submit"], .99) / _pct(pa[n].latencies["submit"], .99)
            print(f"submit p99 at {label}, {b} / {a}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=5.0, help="1x submissions per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-generate", dest="generate", action="store_false")
    parser.add_argument("--layouts", default="thread,process",
                        help="where the dispatcher runs (see above), comma separated")
    args = parser.parse_args()
    layouts = [x for x in args.layouts.split(",") if x] if args.train else ["none"]
    results: dict[str, list[Phase]] = {}
    bad = False
    for layout in layouts:
        with tempfile.TemporaryDirectory(prefix="oblivio-load-") as tmp:
            procs, url, token = start_service(Path(tmp), train=args.train,
                                              generate=args.generate, layout=layout)
            try:
                phases, lost, duplicated = asyncio.run(main_async(args, url, token, layout))
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait(timeout=30)
                errors = sorted({line.strip()[:200] for line in
                                 (Path(tmp) / "service.log").read_text(errors="replace")
                                 .splitlines()
                                 if "Error" in line and not line.startswith(" ")})
                if errors:
                    print("\nservice log errors (distinct, first 8):\n" + "\n".join(errors[:8]))
        results[layout] = phases
        bad = bad or bool(lost or duplicated or any(p.replay_mismatch for p in phases))
    table(results)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
