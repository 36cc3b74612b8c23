"""Continual forgetting: N sequential requests about different real people, method by method.

Each method forgets target 1, then target 2 on top of that version, ... (one lineage per
method), and after every request the current version is measured against the base model:

- forget now / earlier: correct answers on the current target's rephrased, fill-in-the-
  blank and adversarial probes (never in the ticket), and on every earlier target's, as
  ratios to the base model (goal <= 0.20);
- neighbours / unrelated: questions about people near the targets, and the shipped
  unrelated questions, as ratios to base (goals >= 0.90 and >= 0.95 after all requests);
- AUROC: the newest request's gate (o3 only: its subject probe, else its contrastive
  detector), held-out probes vs unrelated / vs neighbours; gate now: its mean weight on
  the current target's held-out probes;
- train s: wall seconds of the request's training (detector included for o3);
- serve x: time to answer the unrelated questions, relative to the base model answering
  them right before (both timed back to back at every step, so that what else the machine
  does moves both alike; goal with 10 requests <= 1.1).

Probe sets: workers/evaluation/probesets (3 people) + benchmarks/data/continual_probes.json
(fill-in-the-blank, adversarial and neighbours for those, and 7 more people); only probes
the base model answers correctly are kept. Methods: o3, o3-noorth (lambda 0), o3-nogate
(o3's blocks served ungated), o3-nocheck (served without the answer check),
o3-partialcheck (the check on weights below 1 only; these three reuse o3's versions when
o3 runs too), idk, npo, graddiff.

    flock /tmp/oblivio-heavy.lock .venv/bin/python benchmarks/continual.py \
        --requests 3 --methods o3,idk --steps 30

A serving change is measured on an earlier run's o3 versions, without training them again:
`--methods o3,o3-partialcheck,o3-nocheck --o3-versions /tmp/oblivio-continual-XXXX/o3`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)

ALL_METHODS = ("o3", "o3-noorth", "o3-nogate", "o3-nocheck", "o3-partialcheck", "idk", "npo",
               "graddiff")
# o3's own versions, served another way
REUSE_O3 = ("o3-nogate", "o3-nocheck", "o3-partialcheck")


@dataclass
class Target:
    name: str
    target: str
    ticket: list[dict[str, str]]
    probes: list[Any]       # rephrased + fill-in-the-blank + adversarial (the forget test)
    neighbours: list[Any]


@dataclass
class Row:
    step: int
    method: str
    values: dict[str, Any] = field(default_factory=dict)


def load_targets(n: int) -> list[Target]:
    from workers.evaluation.probes import Probe, available_forget_sets, load_forget_set

    raw = json.loads((REPO / "benchmarks/data/continual_probes.json").read_text())["people"]
    shipped = set(available_forget_sets())

    def probes(items: list[dict[str, Any]]) -> list[Probe]:
        return [Probe(question=i["question"], accept=tuple(i["accept"]), answer=i.get("answer"))
                for i in items]

    out = []
    for person in raw:
        if person["name"] in shipped:
            fs = load_forget_set(person["name"])
            ticket = [{"question": p.question, "answer": p.answer or ""} for p in fs.ticket]
            held = list(fs.held_out)
        else:
            ticket = [{"question": i["question"], "answer": i["answer"]} for i in person["ticket"]]
            held = probes(person["held_out"])
        out.append(Target(person["name"], person["target"], ticket,
                          held + probes(person.get("fill_blank", []))
                          + probes(person.get("adversarial", [])),
                          probes(person.get("neighbours", []))))
    if n > len(out):
        raise SystemExit(f"only {len(out)} targets are available")
    return out[:n]


class Answerer:
    """Greedy answers (32 tokens) in batches of 16, from a servable or a plain model."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def answers(self, questions: list[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(questions), 16):
            out += self.fn(questions[i:i + 16])
        return out

    def rate(self, probes: list[Any]) -> float:
        from workers.evaluation.metrics import correct_flags

        if not probes:
            return float("nan")
        flags = correct_flags(self.answers([p.question for p in probes]), probes)
        return sum(flags) / len(flags)

    def timed(self, questions: list[str]) -> float:
        started = time.perf_counter()
        self.answers(questions)
        return time.perf_counter() - started


def main() -> None:  # noqa: C901 (a benchmark script reads best top to bottom)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--steps", type=int, default=30, help="max training steps per request")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trainer", default="plain", choices=["plain", "deepspeed"],
                        help="plain: one process; deepspeed: Ray Train + DeepSpeed ZeRO-2")
    parser.add_argument("--ticket-items", type=int, default=20, help="forget QA per ticket")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--o3-versions", type=Path, default=None,
                        help="serve the o3 versions v1, v2, ... in this folder (an earlier "
                             "run's <scratch>/o3) instead of training them again")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ALL_METHODS}")

    import torch

    from workers.evaluation.generation import greedy_answers
    from workers.evaluation.probes import load_unrelated_probes
    from workers.model import load_model_and_tokenizer, resolve_base_model

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(2)
    data_dir = REPO / ".cache" / "oblivio-data"
    ref = resolve_base_model("bundled:smollm2-135m-instruct", data_dir)
    model, tok = load_model_and_tokenizer(ref, device=args.device)
    targets = load_targets(args.requests)
    unrelated = list(load_unrelated_probes())
    base = Answerer(lambda qs: greedy_answers(model, tok, qs, max_new_tokens=32, batch_size=16))

    # Keep only what the base model answers correctly (the probe sets are built from it).
    from workers.evaluation.metrics import correct_flags

    def known(probes: list[Any]) -> list[Any]:
        if not probes:
            return []
        flags = correct_flags(base.answers([p.question for p in probes]), probes)
        return [p for p, ok in zip(probes, flags) if ok]

    dropped = 0
    for t in targets:
        before = len(t.probes) + len(t.neighbours)
        t.probes, t.neighbours = known(t.probes), known(t.neighbours)
        dropped += before - len(t.probes) - len(t.neighbours)
    unrelated = known(unrelated)
    neighbours = [p for t in targets for p in t.neighbours]
    print(f"{len(targets)} targets; forget probes per target "
          f"{[len(t.probes) for t in targets]}; {len(neighbours)} neighbours, "
          f"{len(unrelated)} unrelated (dropped {dropped} the base model gets wrong)",
          flush=True)
    unrelated_questions = [p.question for p in unrelated]

    if args.trainer == "deepspeed":
        import os

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2 if args.device == "cpu" else None, include_dashboard=False,
                 log_to_driver=False)

    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="oblivio-continual-"))
    o3_versions: list[Path] = []
    order = sorted(methods, key=lambda m: m in REUSE_O3)
    for method in order:
        parent: Path | None = None
        for step, target in enumerate(targets, 1):
            started = time.perf_counter()
            extra: dict[str, Any] = {}
            if method in REUSE_O3 and len(o3_versions) >= step:
                version = o3_versions[step - 1]
                seconds = float("nan")
            elif method == "o3" and args.o3_versions is not None:
                version = args.o3_versions / f"v{step}"
                seconds = float("nan")
                o3_versions.append(version)
            else:
                version, extra = train_one(method, target, parent, work / method / f"v{step}",
                                           ref, data_dir, args)
                seconds = time.perf_counter() - started
                if method == "o3":
                    o3_versions.append(version)
            answerer, close = serve(method, version, model, tok, args.device)
            earlier = [p for t in targets[:step - 1] for p in t.probes]
            # Every probe was kept because the base model answers it, so each rate below is
            # already the ratio to the base model.
            values = {
                "forget now": answerer.rate(target.probes),
                "forget earlier": answerer.rate(earlier) if earlier else None,
                "neighbours": answerer.rate(neighbours),
                "unrelated": answerer.rate(unrelated),
                "train s": seconds,
                "serve x": serve_ratio(answerer, base, unrelated_questions),
                **extra,
            }
            if method.startswith("o3"):
                values.update(detector_auroc(version, model, tok, target, neighbours, unrelated))
            close()
            rows.append(Row(step, method, values))
            print_row(rows[-1], header=len(rows) == 1)
            parent = version
    print("\n" + table(rows, methods, len(targets)))
    if args.out:
        Path(args.out).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))


def serve_ratio(answerer: Answerer, base: Answerer, questions: list[str]) -> float:
    """The version's time over the base model's on the same questions, timed back to back
    (with one base timing at the start of a run of half an hour or more, a busier machine
    later on read as a slower version)."""
    base_s = base.timed(questions)
    return answerer.timed(questions) / base_s


def train_one(method: str, target: Target, parent: Path | None, out: Path, ref: Any,
              data_dir: Path, args: Any) -> tuple[Path, dict[str, Any]]:
    qa = target.ticket[:args.ticket_items]
    if method.startswith("o3"):
        from workers.engines import get_engine
        from workers.engines.base import EngineRequest, JobInput, WorkerConfig

        options: dict[str, Any] = {"max_steps": args.steps}
        if method == "o3-noorth":
            options["lambda_orth"] = 0.0
        request = EngineRequest(kind="forget", engine="o3", target=target.target, forget_qa=qa,
                                options=options)
        job = JobInput(job_id=f"{method}-{target.name}", lineage=method, requests=[request],
                       ticket_ids=[target.name], base_model_path=Path(ref.local_path),
                       base_model_sha256=ref.sha256, parent_dir=parent, output_dir=out,
                       config=WorkerConfig(data_dir=data_dir, device=args.device,
                                           trainer=args.trainer, num_workers=2, zero_stage=2))
        artifacts = get_engine("o3").train(job, lambda u: None)
        block = artifacts.metrics["blocks"][-1]
        return out, {"steps": block.get("steps"),
                     "det s": block.get("detector_seconds")}
    from workers.training.runner import train_plain, train_unlearning_adapter
    from workers.training.spec import TrainJobSpec

    spec = TrainJobSpec.for_engine(
        method, overrides={"max_steps": args.steps}, base_model_path=str(ref.local_path),
        base_model_sha256=ref.sha256, output_dir=str(out), data_dir=str(data_dir),
        forget_qa=qa, target=target.target,
        parent_adapter_dir=str(parent) if parent else None, num_workers=2, zero_stage=2,
        device=args.device)
    run = train_plain if args.trainer == "plain" else train_unlearning_adapter
    result = run(spec)
    return out, {"steps": result.metrics.get("steps")}


def serve(method: str, version: Path, model: Any, tok: Any, device: str) -> tuple[Answerer, Any]:
    if method.startswith("o3"):
        from workers.engines.o3.serving import O3Servable

        servable = O3Servable.load(version, model=model, tokenizer=tok, device=device,
                                   gating=False if method == "o3-nogate" else None,
                                   confirm_by_name=False if method == "o3-nocheck" else None,
                                   confirm_full=False if method == "o3-partialcheck" else None)
        return (Answerer(lambda qs: servable.generate(list(qs), [32] * len(qs))),
                servable.close)
    from peft import PeftModel

    from workers.evaluation.generation import greedy_answers

    peft = PeftModel.from_pretrained(model, str(version))
    return (Answerer(lambda qs: greedy_answers(peft, tok, qs, max_new_tokens=32,
                                               batch_size=16)),
            peft.unload)


def detector_auroc(version: Path, model: Any, tok: Any, target: Target, neighbours: list[Any],
                   unrelated: list[Any]) -> dict[str, Any]:
    """The newest block's gate (its subject probe, else its contrastive detector): the
    target's probes vs unrelated / vs neighbours."""
    from workers.engines.o3.detector import Detector, auroc, prompt_features
    from workers.engines.o3.engine import read_blocks
    from workers.engines.o3.subject_probe import SubjectProbe, subject_scores

    import torch

    block = read_blocks(version)[-1]
    probe = SubjectProbe.load(version / block.detector)
    det = Detector.load(version / block.detector)

    def scores(probes: list[Any]) -> list[float]:
        if not probes:
            return []
        questions = [p.question for p in probes]
        if probe is not None:
            return subject_scores(model, tok, questions, [probe.subject],
                                  rivals=[probe.rivals])[:, 0].tolist()
        return det.score(prompt_features(model, tok, questions, list(det.layers),
                                         pooling=det.pooling)).tolist()

    pos = scores(target.probes)
    gate = probe.weight_from_score if probe is not None else det.weight_from_score
    return {"AUROC unrel": auroc(pos, scores(unrelated)),
            "AUROC neigh": auroc(pos, scores(neighbours)),
            "gate now": float(gate(torch.tensor(pos)).mean()) if pos else None}


COLUMNS = ("forget now", "forget earlier", "neighbours", "unrelated", "AUROC unrel",
           "AUROC neigh", "gate now", "train s", "serve x", "steps")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.2f}"
    return str(value)


def print_row(row: Row, header: bool) -> None:
    if header:
        print("| step | method | " + " | ".join(COLUMNS) + " |", flush=True)
        print("|---|---|" + "---|" * len(COLUMNS), flush=True)
    print(f"| {row.step} | {row.method} | "
          + " | ".join(_fmt(row.values.get(c)) for c in COLUMNS) + " |", flush=True)


def table(rows: list[Row], methods: list[str], steps: int) -> str:
    """Per request step, the methods side by side."""
    lines = ["| step | method | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for step in range(1, steps + 1):
        for method in methods:
            for row in rows:
                if row.step == step and row.method == method:
                    lines.append(f"| {step} | {method} | "
                                 + " | ".join(_fmt(row.values.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
