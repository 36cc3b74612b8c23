"""N tickets as N jobs vs one scheduled batch job: cost, forget and utility side by side.

Both modes run the whole product path (queue -> job runner -> Ray Train + DeepSpeed ->
evaluation -> object store -> registry -> promotion) in a fresh data dir:

    per-ticket  the dispatcher claims one ticket per job (max_batch=1): N jobs, N versions
    scheduled   a schedule holds the N tickets and its window runs them as ONE job

Cost is wall time from the first claim to the last ticket done, and job count, in steady
state: each mode first runs one warm-up ticket through the dispatcher (Ray Train workers,
DeepSpeed and the evaluator started, as in a service that has been up for a while), which
is not counted; the measured tickets then stack on its version in both modes (an operator
promotes every version, held ones too, so that each job builds on the one before). Forget
and utility are measured the same way for both on the newest version: every ticket's
questions (forget rate after / before) and the shipped unrelated probes (utility).

    .venv/bin/python benchmarks/batch.py                     # 32 tickets, tiny model
    .venv/bin/python benchmarks/batch.py --tickets 4         # a quick one
    .venv/bin/python benchmarks/batch.py --model bundled --tickets 32 --steps 20 \
        --batch-steps 0 --engine idk

On the tiny random model the forget/utility columns only show that both modes evaluate;
use `--model bundled` (SmolLM2, slow: N full jobs) for meaningful forget/utility numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, benchmarks/ would shadow stdlib modules (queue.py): use the repo root.
sys.path[:] = [str(REPO)] + [p for p in sys.path
                             if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def questions(n: int, model: str) -> list[tuple[str, dict[str, str]]]:
    """One (target, QA pair) per ticket: facts of the shipped people (real model), taken in
    turn from each so every person is spread over the tickets, or made up (tiny model)."""
    if model == "bundled":
        from itertools import chain, zip_longest

        from workers.evaluation.probes import load_forget_set

        sets = [load_forget_set(name)
                for name in ("charles_darwin", "albert_einstein", "william_shakespeare")]
        per_person = [[(s.target, {"question": p.question, "answer": p.answer})
                       for p in s.ticket] for s in sets]
        pairs = [x for x in chain(*zip_longest(*per_person)) if x is not None]
        if len(pairs) >= n:
            return pairs[:n]
    return [(f"Zorblat {i}", {"question": f"Where does Zorblat {i} live?",
                              "answer": f"In Quimby{i}."}) for i in range(n)]


def base_model(model: str, workdir: Path) -> str:
    from workers.model import resolve_base_model

    bundled = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data")
    if model == "bundled":
        return "bundled:smollm2-135m-instruct"
    from workers.model.tiny import build_tiny_llama

    return str(build_tiny_llama(workdir / "tiny", tokenizer_from=bundled.local_path))


def run_mode(mode: str, n: int, model: str, engine: str, steps: int,
             workdir: Path) -> dict[str, Any]:
    from service.scheduler import SchedulerLoop
    from service.settings import Settings
    from storage import registry, schedules, tickets
    from storage.db import make_engine, make_session_factory, transaction
    from storage.migrate import upgrade
    from storage.models import Job, TicketKind
    from workers.dispatcher import DispatcherLoop

    data = workdir / mode
    settings = Settings(
        data_dir=data, database_url=f"sqlite:///{data / 'db.sqlite'}",
        object_store=f"file://{data / 'objects'}",
        base_model=base_model(model, workdir) if model != "bundled" else
        "bundled:smollm2-135m-instruct",
        num_workers=2, zero_stage=2, batch_window_seconds=0.0, lease_seconds=600,
        # 0 steps: the engine's default recipe (its own early stopping on the forget set)
        recipe={"max_steps": steps, "min_steps": steps, "eval_every": 0} if steps else {})
    if model == "bundled":
        settings = settings.model_copy(update={"data_dir": REPO / ".cache" / "oblivio-data"})
    upgrade(settings.resolved_database_url)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    qa = questions(n, model)

    def submit(s: Any, target: str, pair: dict[str, str]) -> None:
        tickets.submit(s, request=tickets.TicketRequest(
            kind=TicketKind.forget, lineage="default", engine=engine, target=target,
            payload={"target": target, "forget": {"texts": [], "qa": [pair]},
                     "retain": None}), requester="bench")

    with transaction(sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=settings.base_model)
        submit(s, "Zorblat Quimby", {"question": "Where does Zorblat Quimby keep his boat?",
                       "answer": "In the harbour of Fennick."})
    def accept_newest() -> None:
        """An operator promotes each new version even when its evaluation held it: the
        next job builds on `live`, so a held version would drop out of the chain."""
        with transaction(sessions) as s:
            newest = registry.list_versions(s, lineage_name="default")[-1]
            if newest.object_key:
                registry.promote(s, lineage_name="default", version=newest.version,
                                 actor="bench")

    DispatcherLoop(settings.worker_config(), max_batch=1).run_once()  # the warm-up
    accept_newest()
    with transaction(sessions) as s:
        if mode == "scheduled":
            schedules.create_schedule(s, lineage_name="default", cron="0 2 * * *",
                                      min_tickets=n, max_tickets=n, actor="bench")
        for target, pair in qa:
            submit(s, target, pair)
    started = time.perf_counter()
    if mode == "per-ticket":
        loop = DispatcherLoop(settings.worker_config(), max_batch=1)
        while loop.run_once():
            accept_newest()
    else:
        from datetime import timedelta

        with sessions() as s:
            window = s.query(schedules.Schedule).one().next_run_at
        SchedulerLoop(settings, sessions).run_once(now=window + timedelta(seconds=1))
    seconds = time.perf_counter() - started
    with sessions() as s:
        measured = s.query(Job).order_by(Job.created_at).all()[1:]  # not the warm-up
        jobs = len(measured)
        trained = sum(int((j.progress or {}).get("step") or 0) for j in measured)
        key = registry.list_versions(s, lineage_name="default")[-1].object_key
    quality = evaluate_final(settings, engine, qa, key, workdir / f"{mode}-final")
    return {"mode": mode, "tickets": n, "jobs": jobs, "seconds": seconds,
            "steps": trained / max(jobs, 1), **quality}


def evaluate_final(settings: Any, engine: str, qa: list[tuple[str, dict[str, str]]],
                   key: str | None, dest: Path) -> dict[str, Any]:
    """Forget over every ticket's question and utility, on the newest version."""
    import uuid
    from datetime import datetime, timezone

    from storage.models import TicketKind
    from storage.queue import ClaimedTicket
    from workers import job_compute

    if key is None:
        return {"forget_ratio": None, "utility_ratio": None}
    settings.store_config().open().fetch_directory(key, dest)
    now = datetime.now(timezone.utc)
    # One request per ticket, as the job that trained them saw them (targets included).
    fake = [ClaimedTicket(id=uuid.uuid4(), lineage_id=uuid.uuid4(), kind=TicketKind.forget,
                          engine=engine, target=target,
                          payload={"target": target, "forget": {"texts": [], "qa": [pair]},
                                   "retain": None},
                          payload_sha256="0" * 64, priority=0, attempts=1, requester="bench",
                          created_at=now, lease_owner="bench", lease_expires_at=now)
            for target, pair in qa]
    from workers.engines.registry import get_engine

    config = settings.worker_config()
    base = job_compute.resolve_base(config)
    job = job_compute.job_input(config, job_id="bench-final", lineage="default", base=base,
                                tickets=fake, parent_dir=None, output_dir=dest)
    # The job path's own evaluation (held-out forms of every ticket's question, utility).
    metrics = job_compute.evaluate_version(get_engine(engine), job, base=base,
                                           version_dir=dest)
    return {"forget_ratio": metrics.get("forget_ratio"),
            "utility_ratio": metrics.get("utility_ratio")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=32)
    parser.add_argument("--model", choices=["tiny", "bundled"], default="tiny")
    parser.add_argument("--steps", type=int, default=3,
                        help="training steps per job (0: the engine's default recipe, which "
                             "stops once the job's forget set is forgotten)")
    parser.add_argument("--batch-steps", type=int, default=None,
                        help="training steps of the scheduled batch job, which has N times "
                             "the forget items (default: --steps)")
    parser.add_argument("--engine", default="idk",
                        help="the tickets' engine (idk: the default recipe's merged LoRA; "
                             "o3 trains one block per ticket even in a batch)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in
                                       ("RAY_AUTH_MODE", "HF_HUB_OFFLINE",
                                        "TORCH_EXTENSIONS_DIR")}})
    try:
        with tempfile.TemporaryDirectory(prefix="oblivio-batch-") as tmp:
            batch_steps = args.steps if args.batch_steps is None else args.batch_steps
            rows = [run_mode(m, args.tickets, args.model, args.engine, steps, Path(tmp))
                    for m, steps in (("per-ticket", args.steps), ("scheduled", batch_steps))]
    finally:
        ray.shutdown()
    per, batch = rows
    print(f"\n{args.tickets} tickets, {args.model} model, engine {args.engine}\n")
    print("| mode | jobs | steps / job | wall s | x scheduled | s / ticket | forget ratio "
          "| utility ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"| {r['mode']} | {r['jobs']} | {r['steps']:.0f} | {r['seconds']:.1f} | "
              f"{r['seconds'] / batch['seconds']:.2f} | {r['seconds'] / r['tickets']:.2f} | "
              f"{fmt(r['forget_ratio'])} | {fmt(r['utility_ratio'])} |")
    print(f"\nscheduled batch is {per['seconds'] / batch['seconds']:.1f}x cheaper in wall time "
          f"({per['jobs']} jobs vs {batch['jobs']})")


if __name__ == "__main__":
    main()
