"""What O3's gating costs a batch of unrelated prompts, by number of stacked requests.

Issue 9's serving goal: with 10 requests, gated generation on a batch of unrelated prompts
takes <= 1.1x the base model's time. What that batch pays for is detection (the subject
probes on the prompt's cache, workers/engines/o3/subject_probe.py) and the gating hooks;
no block applies to it. That cost does not depend on what the blocks learnt, so this
benchmark builds N stacked blocks of random LoRA weights (rank 8 on every attention and
MLP projection) with a subject probe per real person, calibrated so that no unrelated
prompt gates (w = 0), and times, side by side in one run:

    hf generate      the base model through `greedy_answers` (the plain evaluation path)
    o3, 0 blocks     O3Servable with no version: the serving path's own cost
    o3, N gated      N blocks, their probes run, every w = 0 (what unrelated traffic pays)
    o3, N gated+rivals   the same, each probe weighed against its rivals as the engine
                     stores them (known people + the earlier targets; the default since
                     the subject probe learnt rivals)
    o3, N ungated    N blocks applied at w = 1 to every prompt (o3 without gating)

    .venv/bin/python benchmarks/serve_gating.py                  # N = 1, 3, 10
    .venv/bin/python benchmarks/serve_gating.py --blocks 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_stack(model: Any, blocks: int, rank: int, device: str) -> Any:
    import torch

    from workers.engines.o3.gating import StackedLoRA

    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in MODULES and isinstance(module, torch.nn.Linear):
            r = blocks * rank
            a = torch.randn(r, module.in_features, generator=gen) * 0.01
            b = torch.randn(module.out_features, r, generator=gen) * 0.01
            modules[name] = (a.to(device), b.to(device))
    return StackedLoRA(modules=modules, ranks=[rank] * blocks)


def servable(model: Any, tok: Any, device: str, names: list[str], *, gated: bool,
             rivals: bool = False) -> Any:
    from workers.engines.o3.engine import known_people
    from workers.engines.o3.serving import O3Servable
    from workers.engines.o3.subject_probe import SubjectProbe, rivals_for

    n = len(names)
    # w_low above any log-probability: the probe runs, and its weight is always 0.
    probes = [SubjectProbe(subject=s, w_low=1e9, w_high=1e9 + 1,
                           rivals=rivals_for(s, known_people() + names[:i]) if rivals else [])
              for i, s in enumerate(names)]
    return O3Servable(model=model, tokenizer=tok, device=device, detectors=[None] * n,
                      ranks=[8] * n, stacked=random_stack(model, n, 8, device) if n else None,
                      gating=[gated] * n, probes=probes)


def timed(fn: Any, prompts: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(prompts), 16):
            fn(prompts[i:i + 16])
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="1,3,10", help="numbers of stacked requests")
    parser.add_argument("--prompts", type=int, default=48, help="unrelated prompts per run")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    import torch

    from workers.evaluation.generation import greedy_answers
    from workers.evaluation.probes import load_unrelated_probes
    from workers.model import load_model_and_tokenizer, resolve_base_model

    if args.device == "cpu":
        torch.set_num_threads(2)
    ref = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data")
    model, tok = load_model_and_tokenizer(ref, device=args.device)
    prompts = [p.question for p in load_unrelated_probes()][:args.prompts]
    people = [p["target"] for p in json.loads(
        (REPO / "benchmarks/data/continual_probes.json").read_text())["people"]]
    counts = [int(x) for x in args.blocks.split(",") if x]
    if max(counts) > len(people):
        raise SystemExit(f"at most {len(people)} blocks (one per person with probes)")

    rows: list[tuple[str, float]] = []
    hf = timed(lambda ps: greedy_answers(model, tok, ps, max_new_tokens=32, batch_size=16),
               prompts, args.repeats)
    rows.append(("hf generate", hf))
    base = servable(model, tok, args.device, [], gated=True)
    zero = timed(lambda ps: base.generate(ps, [32] * len(ps)), prompts, args.repeats)
    base.close()
    rows.append(("o3, 0 blocks", zero))
    for n in counts:
        for label, gated, rivals in (("gated", True, False), ("gated+rivals", True, True),
                                     ("ungated", False, False)):
            s = servable(model, tok, args.device, people[:n], gated=gated, rivals=rivals)
            seconds = timed(lambda ps: s.generate(ps, [32] * len(ps)), prompts, args.repeats)
            if gated:
                assert s.last_weights is not None and not bool((s.last_weights > 0).any())
            s.close()
            rows.append((f"o3, {n} {label}", seconds))

    print(f"\n{len(prompts)} unrelated prompts, batches of 16, 32 new tokens, best of "
          f"{args.repeats}, {args.device}\n")
    print("| path | seconds | x hf generate | x o3, 0 blocks |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / hf:.2f} | {seconds / zero:.2f} |")


if __name__ == "__main__":
    main()
