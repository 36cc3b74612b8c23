"""S3T side by side: deletion-to-live latency vs SISA shard retraining vs full retraining,
retained accuracy vs an unsharded fine-tune, and sequential deletions absorbed per budget.

    .venv/bin/python benchmarks/s3t.py                      # bundled SmolLM2, 8 people
    .venv/bin/python benchmarks/s3t.py --people 4 --epochs 8 --budgets 1,2,4

Runs the S3T engine the way the job runner does (tests/fixtures/s3t.py: a real SQLite
database and local object store, the engine's own train/deactivate/serve), on fictitious
people (tests/fixtures/people.py). Latencies:
- S3T: the deletion job (mark deleted, cut sequences, exactness check from the DB, write
  the version) plus loading the new version for serving. No training.
- SISA shard retrain: training the affected shard's sequences from scratch, measured as the
  per-prefix training times of that shard in the initial fine-tune (same data less one
  subject, so the same work).
- full retrain: training every shard from scratch (the initial fine-tune), and, for
  reference, one unsharded model.
Accuracy is the exact-answer rate (every answer token is the ensemble's argmax given the
right prefix = greedy decoding reproduces the record), on the records not deleted.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repository, not benchmarks/ (its queue.py would shadow the standard library).
sys.path[0] = str(REPO)


def _harness(tmp: Path, model: str) -> Any:
    from storage.db import make_engine, make_session_factory
    from storage.migrate import upgrade
    from storage.objectstore.local import LocalObjectStore
    from tests.fixtures.s3t import S3THarness
    from workers.model import resolve_base_model

    url = f"sqlite:///{tmp / 'bench.db'}"
    upgrade(url)
    base = resolve_base_model(model, REPO / ".cache" / "oblivio-data")
    return S3THarness(sessions=make_session_factory(make_engine(url)),
                      store=LocalObjectStore(tmp / "objects"), base_model_path=base.local_path,
                      work=tmp / "work", base_model_sha256=base.sha256), base


def _register(h: Any, name: str, records: list[dict[str, Any]]) -> None:
    from storage import datasets
    from storage.db import transaction

    with transaction(h.sessions) as s:
        datasets.add_records(s, name=name, records=records, actor="benchmark")


class Scorer:
    def __init__(self, h: Any, base: Any) -> None:
        from workers.engines.registry import get_engine
        from workers.model import load_model_and_tokenizer

        self.h, self.engine = h, get_engine("s3t")
        self.model, self.tokenizer = load_model_and_tokenizer(base)

    def servable(self, version_dir: Path) -> Any:
        return self.engine.load_servable(version_dir, model=self.model,
                                         tokenizer=self.tokenizer, device="cpu",
                                         fetch=self.h.fetch)

    def accuracy(self, version_dir: Path, qa: list[dict[str, str]]) -> float:
        from workers.engines.s3t.evaluation import exact_answer_rate

        return exact_answer_rate(self.servable(version_dir), qa)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--people", type=int, default=8, help="2 records per person")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--slices", type=int, default=2, help="for latency and accuracy")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--layers-per-group", type=int, default=None)
    parser.add_argument("--budgets", default="1,2,4", help="sequences per shard to compare")
    parser.add_argument("--budget-slices", type=int, default=4,
                        help="slices in the sequential-deletion part (B <= slices!)")
    parser.add_argument("--max-deletions", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aggregate", default="logits", choices=("logits", "probs"),
                        help="how serving combines the shards (S3TConfig.aggregate)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: latency, "
                                                   "sequential")
    args = parser.parse_args()

    from tests.fixtures.people import people_records, qa_of
    from tests.fixtures.s3t import delete_request, finetune_request
    from workers.engines.s3t import plan as plans

    tmp = Path(tempfile.mkdtemp(prefix="oblivio-s3t-bench-"))
    h, base = _harness(tmp, args.model)
    scorer = Scorer(h, base)
    records = people_records(args.people)
    qa = qa_of(records)
    common = {"epochs": args.epochs, "eval_records": 0, "aggregate": args.aggregate}
    if args.layers_per_group:
        common["layers_per_group"] = args.layers_per_group
    skip = set(filter(None, args.skip.split(",")))
    print(f"# S3T benchmark: {args.people} people ({len(records)} records), "
          f"{args.shards} shards, {args.epochs} epochs, shards combined by mean "
          f"{args.aggregate}, model {base.name}\n")

    if "latency" not in skip:
        _register(h, "bench", records)
        opts = {**common, "shards": args.shards, "slices": args.slices,
                "sequences_per_shard": 1}
        started = time.perf_counter()
        v1 = h.run([finetune_request("bench", **opts)], None)
        full_s = time.perf_counter() - started
        victim = "person-1"
        gone = {r["id"] for r in records if r["subject_id"] == victim}
        kept = [q for q in qa if q["id"] not in gone]
        acc_v1 = scorer.accuracy(v1.version_dir, qa)

        started = time.perf_counter()
        v2 = h.run([delete_request("bench", subject_id=victim)], v1.version_dir)
        scorer.servable(v2.version_dir)
        s3t_s = time.perf_counter() - started
        shard = next(c["shard"] for c in v2.receipt["cut_sequences"])
        sisa_s = sum(t["seconds"] for t in v1.metrics["prefix_timings"] if t["shard"] == shard)
        acc_v2 = scorer.accuracy(v2.version_dir, kept)
        forgotten_v2 = scorer.accuracy(v2.version_dir, [q for q in qa if q["id"] in gone])
        started = time.perf_counter()
        v3 = h.run([finetune_request("bench", **v2.follow_up[0]["payload"]["options"])],
                   v2.version_dir)
        retrain_s = time.perf_counter() - started
        acc_v3 = scorer.accuracy(v3.version_dir, kept)

        _register(h, "bench-flat", records)
        size = plans.read_manifest(v1.version_dir)["shards"][0]["sequences"][0]["prefixes"]
        flat_layers = sum(len(p["layers"]) for p in size)
        started = time.perf_counter()
        flat = h.run([finetune_request("bench-flat", **{**common, "shards": 1, "slices": 1,
                                                        "sequences_per_shard": 1,
                                                        "layers_per_group": flat_layers})],
                     None)
        flat_s = time.perf_counter() - started
        acc_flat = scorer.accuracy(flat.version_dir, qa)
        acc_flat_kept = scorer.accuracy(flat.version_dir, kept)

        print("## Deleting one subject: time until a model without them is live\n")
        print(_table(["method", "seconds", "x S3T"], [
            ["S3T deactivation (no training)", f"{s3t_s:.2f}", "1"],
            ["SISA: retrain the affected shard", f"{sisa_s:.1f}", f"{sisa_s / s3t_s:.0f}"],
            [f"full retrain: all {args.shards} shards", f"{full_s:.1f}",
             f"{full_s / s3t_s:.0f}"],
            ["full retrain: one unsharded model", f"{flat_s:.1f}", f"{flat_s / s3t_s:.0f}"],
            ["(S3T background retrain of the cut layers)", f"{retrain_s:.1f}",
             f"{retrain_s / s3t_s:.0f}"],
        ]))
        print(f"\nS3T trained {v1.metrics['prefixes_trained']} prefixes at first; the "
              f"retrain trained {v3.metrics['prefixes_trained']} and reused "
              f"{v3.metrics['prefixes_reused']}.\n")
        print("## Exact-answer rate\n")
        print(_table(["model", "all records", "retained records", "deleted subject"], [
            ["unsharded fine-tune (1 shard, 1 slice)", f"{acc_flat:.2f}",
             f"{acc_flat_kept:.2f}", "-"],
            [f"S3T {args.shards}x{args.slices}, before deletion", f"{acc_v1:.2f}", "-", "-"],
            ["S3T after deactivation", "-", f"{acc_v2:.2f}", f"{forgotten_v2:.2f}"],
            ["S3T after background retrain", "-", f"{acc_v3:.2f}", "-"],
        ]))
        ratio = acc_v1 / acc_flat if acc_flat else float("nan")
        print(f"\nS3T before deletion / unsharded: {ratio:.2f}\n")

    if "sequential" not in skip:
        budgets = [int(b) for b in args.budgets.split(",")]
        _register(h, "bench-seq", records)
        order = [r["id"] for r in records]
        random.Random(args.seed).shuffle(order)
        limit = args.max_deletions or len(order)
        rows = []
        for budget in budgets:
            opts = {**common, "shards": args.shards, "slices": args.budget_slices,
                    "sequences_per_shard": budget}
            started = time.perf_counter()
            version = h.run([finetune_request("bench-seq", **opts)], None)
            train_s = time.perf_counter() - started
            start = scorer.accuracy(version.version_dir, qa)
            absorbed, deleted, current = 0, set(), version.version_dir
            trace = []
            for record_id in order[:limit]:
                # Deactivation only: what stays live while retrains are pending.
                deleted.add(record_id)
                nxt = h.run([delete_request("bench-seq", record_ids=[record_id])], current)
                current = nxt.version_dir
                acc = scorer.accuracy(current, [q for q in qa if q["id"] not in deleted])
                trace.append(f"{acc:.2f}")
                if acc < 0.9 * start:
                    break
                absorbed += 1
            _undelete(h, "bench-seq")
            rows.append([budget, f"{start:.2f}", absorbed, " ".join(trace),
                         version.metrics["prefixes_trained"], f"{train_s:.0f}"])
        print(f"## Sequential deletions absorbed before accuracy < 90% of its start "
              f"({args.shards} shards x {args.budget_slices} slices, no retraining)\n")
        print(_table(["sequences per shard", "start accuracy", "deletions absorbed",
                      "accuracy after each deletion", "prefixes trained",
                      "fine-tune seconds"], rows))


def _undelete(h: Any, dataset: str) -> None:
    """Benchmark only: bring the records back for the next budget's run (same placement, so
    every prefix the previous budgets trained is reused by content address)."""
    from sqlalchemy import update

    from storage import datasets
    from storage.db import transaction
    from storage.models import Record
    from tests.fixtures.people import people_records

    originals = {r["id"]: r for r in people_records(200)}
    with transaction(h.sessions) as s:
        ds = datasets.get_dataset(s, dataset)
        for record in datasets.all_records(s, ds):
            if record.deleted_at is not None:
                record.content = datasets.content_of(originals[record.record_id])
        s.execute(update(Record).where(Record.dataset_id == ds.id)
                  .values(deleted_at=None, deleted_by_ticket=None))


if __name__ == "__main__":
    main()
