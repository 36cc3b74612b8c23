"""Which LoRA forgetting recipe forgets a person without gating, and at what cost?

Trains a fresh LoRA adapter on the bundled SmolLM2-135M-Instruct for each (recipe, person)
with the product's own training loop in one plain process (workers.training.runner.train_plain:
no DeepSpeed, no Ray; this measures the recipe, not the runner), and prints one table:

    forget  = held-out rephrased questions about the person, correct after / before
    utility = unrelated general questions, correct after / before
    pass    = forget <= 0.2 and utility >= 0.9 (the product's acceptance criterion)

Training sees only the ticket's QA pairs plus self-generated retain data (the base model's
own greedy answers to generic prompts, disjoint from the utility probes). Early stopping
scores only the ticket's own questions; the held-out rephrasings are never looked at until
the end.

    .venv/bin/python benchmarks/forget_recipe.py --recipes default --people all
    .venv/bin/python benchmarks/forget_recipe.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, benchmarks/ would come first on sys.path and its sibling scripts (e.g. a
# queue.py) would shadow standard modules: put the repository root there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path
                             if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from workers.evaluation.generation import greedy_answers  # noqa: E402
from workers.evaluation.metrics import correct_flags  # noqa: E402
from workers.evaluation.probes import (  # noqa: E402
    ForgetProbeSet,
    Probe,
    available_forget_sets,
    load_forget_set,
    load_unrelated_probes,
)
from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe  # noqa: E402

# Candidate recipes compared by the experiments (the winner became DEFAULT_FORGET_RECIPE).
# B4 = forget batch 4 + retain batch 4; the default uses 4 + 8.
_B4 = {"forget_batch_size": 4, "retain_batch_size": 4}
_NO_ES = {"min_steps": 10_000}  # checks still print, never stop: to read a whole trajectory
RECIPES: dict[str, ForgetRecipe] = {
    "default": DEFAULT_FORGET_RECIPE,
    # The planning baseline: NPO alone, no retain term, 40 steps, no early stop.
    "npo": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="none", forget_batch_size=8,
                                       max_steps=40, eval_every=0),
    "npo_es": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="none", forget_batch_size=8,
                                          min_steps=5, stop_forget_ratio=0.1),
    "npo_nll1": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="nll", retain_weight=1.0,
                                            max_steps=30, **_B4, **_NO_ES),
    "npo_kl1": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="kl", retain_weight=1.0,
                                           max_steps=30, **_B4, **_NO_ES),
    "npo_kl3": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="kl", retain_weight=3.0,
                                           max_steps=30, **_B4, **_NO_ES),
    "npo_kw_kl1": DEFAULT_FORGET_RECIPE.with_(method="npo", forget_tokens="keywords",
                                              retain_loss="kl", retain_weight=1.0, max_steps=30,
                                              **_B4),
    "graddiff_kl10": DEFAULT_FORGET_RECIPE.with_(method="graddiff", lr=1e-4),
    "idk_kl1": DEFAULT_FORGET_RECIPE.with_(retain_weight=1.0, min_steps=5, **_B4),
    "idk_kl3": DEFAULT_FORGET_RECIPE.with_(retain_weight=3.0, max_steps=35, **_B4, **_NO_ES),
    "idk_kl10_35": DEFAULT_FORGET_RECIPE.with_(max_steps=35, **_NO_ES),
    "idk_kl30": DEFAULT_FORGET_RECIPE.with_(retain_weight=30.0, max_steps=30, **_NO_ES),
    "idk_kl30_lr6e-4": DEFAULT_FORGET_RECIPE.with_(retain_weight=30.0, lr=6e-4, max_steps=30,
                                                   **_NO_ES),
    # Stop once two checks in a row show the ticket forgotten, instead of waiting for step 30.
    "patience2_min10": DEFAULT_FORGET_RECIPE.with_(stop_patience=2, min_steps=10),
    "patience2_min20": DEFAULT_FORGET_RECIPE.with_(stop_patience=2, min_steps=20),
}


# --------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    recipe: str
    person: str
    seed: int
    steps: int
    train_s: float
    eval_s: float
    ticket_ratio: float
    forget_ratio: float
    utility_ratio: float
    stopped_early: bool

    @property
    def passed(self) -> bool:
        return self.forget_ratio <= 0.2 and self.utility_ratio >= 0.9


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def evaluate(model: Any, tok: Any, probe_set: ForgetProbeSet, unrelated: list[Probe],
             max_new_tokens: int) -> dict[str, list[bool]]:
    """Correct flags per group (ticket, held_out, unrelated), from one batched pass."""
    groups = {"ticket": list(probe_set.ticket), "held_out": list(probe_set.held_out),
              "unrelated": unrelated}
    questions = [p.question for g in groups.values() for p in g]
    answers = greedy_answers(model, tok, questions, max_new_tokens=max_new_tokens)
    out, i = {}, 0
    for name, probes in groups.items():
        out[name] = correct_flags(answers[i:i + len(probes)], probes)
        out[name + "_answers"] = answers[i:i + len(probes)]  # type: ignore[assignment]
        i += len(probes)
    return out


def train_adapter(base: Any, recipe: ForgetRecipe, person: ForgetProbeSet, *, seed: int,
                  data_dir: Path, out_dir: Path, device: str) -> Any:
    """The product's own training loop (train_plain), on the ticket the person's set holds.

    Like a ticket from the API, the QA pairs carry no keyword lists: early stopping uses the
    keywords the job derives from each answer, exactly as in production.
    """
    from workers.training.runner import train_plain
    from workers.training.spec import TrainJobSpec

    spec = TrainJobSpec(
        base_model_path=str(base.local_path), base_model_sha256=base.sha256,
        output_dir=str(out_dir), data_dir=str(data_dir), target=person.target,
        forget_qa=[{"question": p.question, "answer": p.answer} for p in person.ticket],
        recipe=asdict(recipe), seed=seed, device=device, num_workers=1)
    return train_plain(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="default",
                    help="comma-separated names from --list, or 'all'")
    ap.add_argument("--people", default="william_shakespeare,albert_einstein",
                    help="comma-separated forget probe sets, or 'all'")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recipe field for every recipe run (repeatable)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--data-dir", default=str(REPO / ".cache" / "oblivio-data"),
                    help="converted model and self-generated retain data are cached here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (numbers differ slightly)")
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, r in RECIPES.items():
            print(f"{name:16s} {r}")
        return
    torch.set_num_threads(args.threads)
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    for n in names:
        if n not in RECIPES:
            raise SystemExit(f"unknown recipe {n!r}; see --list")
    overrides: dict[str, Any] = {}
    for item in args.set:
        field_name, _, raw = item.partition("=")
        value: Any = json.loads(raw) if raw[:1] in "[{\"0123456789-" or raw in (
            "true", "false") else raw
        overrides[field_name] = tuple(value) if isinstance(value, list) else value
    people_names = available_forget_sets() if args.people == "all" else args.people.split(",")
    people = [load_forget_set(n) for n in people_names]
    unrelated = list(load_unrelated_probes())
    data_dir = Path(args.data_dir)

    from peft import PeftModel

    from workers.model import load_model_and_tokenizer, resolve_base_model

    base = resolve_base_model("bundled:smollm2-135m-instruct", data_dir)
    model, tok = load_model_and_tokenizer(base, device=args.device)
    before = {p.name: evaluate(model, tok, p, unrelated, args.eval_tokens) for p in people}

    results: list[RunResult] = []
    for name in names:
        recipe = RECIPES[name].with_(**overrides)
        for person in people:
            b = before[person.name]
            for seed in [int(s) for s in args.seeds.split(",")]:
                with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
                    trained = train_adapter(base, recipe, person, seed=seed, data_dir=data_dir,
                                            out_dir=Path(tmp) / "adapter", device=args.device)
                    adapted = PeftModel.from_pretrained(model, str(trained.adapter_dir))
                    t = time.perf_counter()
                    flags = evaluate(adapted, tok, person, unrelated, args.eval_tokens)
                    eval_s = time.perf_counter() - t
                    model = adapted.unload()  # the plain base model again
                res = RunResult(
                    recipe=name + ("*" if overrides else ""), person=person.name, seed=seed,
                    steps=trained.steps, train_s=trained.metrics["train_seconds"],
                    eval_s=eval_s,
                    ticket_ratio=rate(flags["ticket"]) / rate(b["ticket"]),
                    forget_ratio=rate(flags["held_out"]) / rate(b["held_out"]),
                    utility_ratio=rate(flags["unrelated"]) / rate(b["unrelated"]),
                    stopped_early=bool(trained.metrics["stopped_early"]))
                results.append(res)
                print(f"  {res.recipe:18s} {person.name:20s} seed {seed} steps {res.steps:3d}"
                      f"{'(es)' if res.stopped_early else '    '} ticket {res.ticket_ratio:.2f} "
                      f"forget {res.forget_ratio:.2f} utility {res.utility_ratio:.2f} "
                      f"train {res.train_s:.0f}s {'PASS' if res.passed else 'fail'} "
                      f"{trained.metrics['ticket_rates']}", flush=True)
                if args.verbose:
                    for q, a in zip(person.held_out, flags["held_out_answers"]):
                        print(f"      H {q.question} -> {a[:80]!r}")
                    lost = [(p.question, a) for p, ok, a in zip(
                        unrelated, flags["unrelated"], flags["unrelated_answers"]) if not ok]
                    for q, a in lost:
                        print(f"      U- {q} -> {a[:80]!r}")

    print()
    print(f"{'recipe':20s} {'person':20s} {'seed':>4s} {'steps':>6s} {'train_s':>8s} "
          f"{'ticket':>7s} {'forget':>7s} {'utility':>8s}  pass")
    for r in results:
        print(f"{r.recipe:20s} {r.person:20s} {r.seed:4d} {r.steps:5d}"
              f"{'e' if r.stopped_early else ' '} {r.train_s:8.0f} {r.ticket_ratio:7.2f} "
              f"{r.forget_ratio:7.2f} {r.utility_ratio:8.2f}  {'yes' if r.passed else 'no'}")
    print("forget/ticket/utility: correct-answer rate after / before (base); "
          "pass: forget <= 0.2 and utility >= 0.9;\nsteps ending in e: stopped early")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"passed": r.passed}
                                               for r in results], indent=1))
    if any(math.isnan(r.utility_ratio) for r in results):
        raise SystemExit("nan in results")


if __name__ == "__main__":
    main()
