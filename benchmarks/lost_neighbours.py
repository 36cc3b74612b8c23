"""Which neighbour questions an O3 version gets wrong that the base model gets right, and why.

`benchmarks/continual.py` reports the neighbours' rate; this lists each one lost by a
version it left (or any O3 version of the same targets), with the gates' weights, what
was applied after the answer check, and both answers, so a miss can be put down to a
gate (a weight on a question about someone else) or to a block (an answer changed with
no weight on it cannot happen: w = 0 is the base model exactly).

    .venv/bin/python benchmarks/lost_neighbours.py /tmp/oblivio-continual-*/o3/v10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("version_dir", type=Path, help="an O3 version's folder")
    parser.add_argument("--requests", type=int, default=10,
                        help="the targets whose neighbours are asked (continual.py's order)")
    args = parser.parse_args()

    import torch

    from benchmarks.continual import load_targets
    from workers.engines.o3.engine import read_blocks
    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers
    from workers.evaluation.metrics import correct_flags
    from workers.model import load_model_and_tokenizer, resolve_base_model

    torch.set_num_threads(2)
    ref = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data")
    model, tok = load_model_and_tokenizer(ref, device="cpu")
    probes = [p for t in load_targets(args.requests) for p in t.neighbours]
    questions = [p.question for p in probes]
    base = greedy_answers(model, tok, questions, max_new_tokens=32, batch_size=16)
    kept = [i for i, ok in enumerate(correct_flags(base, probes)) if ok]

    servable = O3Servable.load(args.version_dir, model=model, tokenizer=tok, device="cpu")
    subjects = [b.target or b.ticket_id for b in read_blocks(args.version_dir)]
    answers, weights, applied = [], [], []
    for start in range(0, len(kept), 16):
        batch = [questions[i] for i in kept[start:start + 16]]
        answers += servable.generate(batch, [32] * len(batch))
        weights.append(servable.last_weights)
        applied.append(servable.last_applied)
    w, on = torch.cat(weights), torch.cat(applied)
    flags = correct_flags(answers, [probes[i] for i in kept])
    lost = [n for n, ok in enumerate(flags) if not ok]
    print(f"\n{args.version_dir}: {len(kept)} neighbour questions the base model answers, "
          f"{len(lost)} lost\n")
    print("| question | weights > 0 (gate -> applied) | base answer | version answer |")
    print("|---|---|---|---|")
    for n in lost:
        gates = ", ".join(f"{subjects[b]} {float(w[n, b]):.2f}->{float(on[n, b]):.2f}"
                          for b in (w[n] > 0).nonzero().flatten().tolist()) or "none"
        print(f"| {questions[kept[n]]} | {gates} | {_cell(base[kept[n]])} | "
              f"{_cell(answers[n])} |")
    gated = int(((w > 0).any(1)).sum())
    print(f"\nneighbour questions with a weight > 0: {gated}/{len(kept)}; "
          f"with a block applied after the check: {int((on > 0).any(1).sum())}/{len(kept)}")


def _cell(text: str) -> str:
    return " ".join(text.split())[:80].replace("|", "/")


if __name__ == "__main__":
    main()
