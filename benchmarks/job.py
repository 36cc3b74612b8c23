"""What does DeepSpeed on Ray cost over a plain loop, from submission to live?

Runs the same forget ticket (a well-known person's QA pairs from the shipped probe sets) on
the real bundled model through the whole product path — queue -> dispatcher -> training ->
evaluation -> object store -> registry -> promotion — once per trainer, each in a fresh
process and data dir, and prints one table side by side:

    plain   one in-process PyTorch loop (OBLIVIO_TRAINER=plain)
    zero2   Ray Train, 2 workers, DeepSpeed ZeRO-2
    zero3   Ray Train, 2 workers, DeepSpeed ZeRO-3

Columns: submission-to-live seconds, training seconds (the loop itself), steps, peak
resident memory of a training process, and each time as a ratio to the plain loop; then the
job's own phase record (queue wait, preparing, training, teardown, evaluation, upload,
promote) side by side. Runs share one data dir (`--cache-dir`), as jobs of one service do,
so the base model's probe answers and retain answers are computed once; `--cold` empties
those caches before every mode.
Goals: DeepSpeed overhead <= 1.5x the plain loop; submission-to-live < 2 min for
`--steps 10` with ZeRO-2 spending <= 25% of it outside the training loop.

    .venv/bin/python benchmarks/job.py                 # all three
    .venv/bin/python benchmarks/job.py --modes plain,zero2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, benchmarks/ would shadow stdlib modules (queue.py): use the repo root.
sys.path[:] = [str(REPO)] + [p for p in sys.path
                             if Path(p or ".").resolve() != Path(__file__).resolve().parent]

MODES = {
    "plain": {"trainer": "plain", "zero_stage": 2},
    "zero2": {"trainer": "deepspeed", "zero_stage": 2},
    "zero3": {"trainer": "deepspeed", "zero_stage": 3},
}


def run_one(mode: str, person: str, steps: int | None, workdir: Path,
            cache_dir: Path) -> dict:
    """One ticket through the product path with `mode`; returns its timings.

    The database and object store are fresh (`workdir`); the data dir is `cache_dir`, shared
    by every run, so what a service caches across jobs on one base model (base-model probe
    answers, retain answers) is cached here too, as in a running service.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from service.settings import Settings
    from storage import registry, tickets
    from storage.db import make_engine, make_session_factory, transaction
    from storage.migrate import upgrade
    from storage.models import Job, Ticket, TicketKind
    from workers.dispatcher import DispatcherLoop
    from workers.engines import DEFAULT_ENGINES
    from workers.evaluation.probes import load_forget_set
    from workers.model import resolve_base_model
    from workers.runtime import connect_ray

    base = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data")
    # --steps: a fixed number of steps (early stopping off), so train times compare 1:1.
    recipe = {"max_steps": steps, "min_steps": steps} if steps else {}
    if mode == "plain":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the plain loop gets every core
    caches_before = _cache_files(cache_dir)
    settings = Settings(data_dir=cache_dir, database_url=f"sqlite:///{workdir / 'oblivio.db'}",
                        object_store=f"file://{workdir / 'objects'}",
                        base_model=str(base.local_path), num_workers=2,
                        batch_window_seconds=0.0, recipe=recipe, **MODES[mode])
    upgrade(settings.resolved_database_url)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(sessions) as s:
        registry.ensure_lineage(s, name="default", base_model=settings.base_model)
    if settings.trainer == "deepspeed":
        connect_ray(settings.worker_config(), num_cpus=2, include_dashboard=False)
    # As `oblivio serve` does when it starts: the evaluation model is loaded and the warm
    # training ranks come up before any ticket arrives (OBLIVIO_WARM_TRAIN_WORKERS).
    dispatcher = DispatcherLoop(settings.worker_config())
    dispatcher.warm_up()
    target = load_forget_set(person)
    qa = [{"question": p.question, "answer": p.answer} for p in target.ticket]

    submitted = time.perf_counter()
    with transaction(sessions) as s:
        ticket_id = tickets.submit(s, request=tickets.TicketRequest(
            kind=TicketKind.forget, engine=DEFAULT_ENGINES["forget"],
            target=target.target,
            payload={"target": target.target, "forget": {"texts": [], "qa": qa},
                     "retain": None}), requester="benchmark").id
    dispatcher.run_once()
    live_after = time.perf_counter() - submitted
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        receipt = ticket.receipt or {}
        status = ticket.status.value
        job = s.get_one(Job, ticket.job_id) if ticket.job_id else None
        record = dict(job.progress or {}) if job else {}
    training = (receipt.get("metrics") or {}).get("training") or {}
    phases = {name: span["seconds"] for name, span in (record.get("phases") or {}).items()}
    return {"mode": mode, "status": status, "live": record.get("live"),
            "phases": phases, "total_s": record.get("total_seconds"),
            "outside_training_share": record.get("outside_training_share"),
            "caches": "warm" if caches_before else "cold",
            "warm_ranks": bool(training.get("warm_ranks")),
            "submission_to_live_s": live_after, "train_s": training.get("train_seconds"),
            "steps": training.get("steps"), "peak_rss_mb": training.get("peak_rss_mb"),
            "rank_setup_s": training.get("setup_seconds") or {},
            "s_per_step": (training["train_seconds"] / training["steps"]
                           if training.get("steps") else None),
            "forget_items": len(qa), "forget_ratio": (receipt.get("metrics") or {}).get(
                "forget_ratio"),
            "utility_ratio": (receipt.get("metrics") or {}).get("utility_ratio")}


def _cache_files(cache_dir: Path) -> list[str]:
    """The cross-job caches present in the data dir (probe answers, retain answers)."""
    names = []
    for sub in ("eval-cache", "retain-cache"):
        folder = cache_dir / sub
        if folder.is_dir():
            names += [f"{sub}/{p.name}" for p in folder.iterdir() if p.suffix == ".json"]
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="plain,zero2,zero3")
    parser.add_argument("--person", default="charles_darwin")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench-job-data",
                        help="data dir shared by the runs (caches across jobs, as a service)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the cross-job caches before every mode")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this mode
    args = parser.parse_args()

    if args.one:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="oblivio-bench-") as tmp:
            print(json.dumps(run_one(args.one, args.person, args.steps, Path(tmp),
                                     args.cache_dir)))
        return

    rows = []
    for mode in args.modes.split(","):
        if args.cold:
            for name in _cache_files(args.cache_dir):
                (args.cache_dir / name).unlink()
        # A fresh process per mode: no Ray state or loaded models shared between them.
        cmd = [sys.executable, __file__, "--one", mode, "--person", args.person,
               "--cache-dir", str(args.cache_dir)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            rows.append({"mode": mode, "status": f"error (exit {out.returncode})"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # as it comes

    plain = next((r for r in rows if r["mode"] == "plain" and r.get("train_s")), None)
    print(f"\nforget ticket: {rows[0].get('forget_items', '?')} QA pairs about "
          f"{args.person}; {os.cpu_count()} CPU cores visible; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    header = (f"{'mode':<7} {'status':<15} {'to live s':>9} {'x plain':>7} {'train s':>8} "
              f"{'steps':>5} {'s/step':>6} {'x plain':>7} {'peak RSS MB':>11} {'forget':>6} "
              f"{'utility':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        def ratio(key: str) -> str:
            if not plain or not r.get(key) or not plain.get(key):
                return "-"
            return f"{r[key] / plain[key]:.2f}"

        def num(key: str, fmt: str) -> str:
            return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"

        print(f"{r['mode']:<7} {r.get('status', '-'):<15} {num('submission_to_live_s', '9.1f')}"
              f" {ratio('submission_to_live_s'):>7} {num('train_s', '8.1f')}"
              f" {num('steps', '5d')} {num('s_per_step', '6.2f')} {ratio('s_per_step'):>7}"
              f" {num('peak_rss_mb', '11.0f')} {num('forget_ratio', '6.2f')}"
              f" {num('utility_ratio', '7.2f')}")
    print("\nto live: submission -> promoted (or held for review); train s: the training "
          "loop alone;\npeak RSS: one training process (plain: the whole service process); "
          "forget/utility: the job's own evaluation, after / before")
    print_phases(rows)


def print_phases(rows: list[dict]) -> None:
    """The job's own phase record (GET /v1/jobs/{id}), one column per mode, as Markdown."""
    from workers.job_phases import PHASES

    done = [r for r in rows if r.get("phases")]
    if not done:
        return
    print("\nphases of the job, seconds (share of the total):\n")
    print("| phase | " + " | ".join(r["mode"] for r in done) + " |")
    print("|---|" + "---|" * len(done))
    for name in PHASES:
        cells = []
        for r in done:
            value = r["phases"].get(name)
            cells.append("-" if value is None else
                         f"{value:.1f} ({value / r['total_s']:.0%})" if r.get("total_s")
                         else f"{value:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **total (submission to live)** | "
          + " | ".join(f"{r['total_s']:.1f}" + ("" if r.get("live") else " (held)")
                       for r in done) + " |")
    print("| outside training | "
          + " | ".join(f"{r['total_s'] - r['phases'].get('training', 0):.1f} "
                       f"({r['outside_training_share']:.0%})" for r in done) + " |")
    # Inside "preparing": a training rank's own start-up, step by step (rank 0's).
    steps = list(dict.fromkeys(name for r in done for name in r.get("rank_setup_s", {})))
    for name in steps:
        print(f"| (rank: {name}) | " + " | ".join(
            f"{r['rank_setup_s'][name]:.1f}" if name in r.get("rank_setup_s", {}) else "-"
            for r in done) + " |")
    print("| caches at start | " + " | ".join(r.get("caches", "?") for r in done) + " |")
    print("| warm training ranks | " + " | ".join("yes" if r.get("warm_ranks") else "no"
                                                for r in done) + " |")
    print("\ngoal: ZeRO-2 outside training <= 25% of submission to live, and submission to "
          "live < 120 s (10 steps, 2 cores)")


if __name__ == "__main__":
    main()
