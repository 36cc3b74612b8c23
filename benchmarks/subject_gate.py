"""How specific is the O3 subject probe? The name alone vs weighed against rivals.

For each of the continual benchmark's targets a subject probe is calibrated as the engine
does it (generic prompts' 0.95 quantile -> w = 0; halfway to the median of the ticket's
questions -> w = 1), once per score (workers/engines/o3/subject_probe.py):

- name alone: mean log p of the target's name as the reply to "Who is this question about?";
- against rivals: plus log P(target | target or a rival), the rivals being the shipped
  well-known people (data/known_people.json) and the other targets, as the engine does,
  but with every neighbour's name left out: the neighbours below are people the probe has
  never heard of, so what it gains on them is not from knowing their names.
- against rivals, hard negatives: the same score, with w = 0 raised to the 0.95 quantile of
  the engine's questions about other people (people_questions.json, again without any
  about a neighbour's person), capped halfway to the ticket's median (the engine default).

Then, on probes never in the ticket: the share of the target's held-out / fill-in-the-blank
/ adversarial probes the block applies to fully (w = 1), at least half (w >= 0.5) and at all
(w > 0), and the share of its neighbours' questions, of the OTHER targets' probes and of
the unrelated questions that it applies to at all (w > 0) and at least half. A block that
fires on another target's or a neighbour's question is what costs neighbour accuracy in a
continual run, and what kept a revoked target forgotten in tests/e2e/test_o3_service.py.

    flock /tmp/oblivio-heavy.lock .venv/bin/python benchmarks/subject_gate.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=10)
    args = parser.parse_args()

    import json

    import torch

    from benchmarks.continual import load_targets
    from workers.engines.o3.detector import auroc
    from workers.engines.o3.engine import known_people
    from workers.engines.o3.subject_probe import calibrate, rivals_for, subject_scores
    from workers.evaluation.probes import load_retain_prompts, load_unrelated_probes
    from workers.model import load_model_and_tokenizer, resolve_base_model

    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer(
        resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data"))
    targets = load_targets(args.targets)
    unheard = {a.lower() for t in targets for p in t.neighbours for a in p.accept}
    known = [k for k in known_people() if not any(a in k.lower() for a in unheard)]
    generic = list(load_retain_prompts())
    unrelated = [p.question for p in load_unrelated_probes()]
    # The engine's hard negatives (questions about other people), without any question
    # about a neighbour's person.
    bank = json.loads((REPO / "workers/engines/o3/data/people_questions.json").read_text())
    hard = [(q["about"], q["question"]) for q in bank["questions"]
            if not any(a in q["about"].lower() for a in unheard)]
    groups = {"generic": generic, "unrelated": unrelated, "hard": [q for _, q in hard]}
    for t in targets:
        groups[f"ticket:{t.name}"] = [i["question"] for i in t.ticket]
        groups[f"probes:{t.name}"] = [p.question for p in t.probes]
        groups[f"neighbours:{t.name}"] = [p.question for p in t.neighbours]
    order = [(g, q) for g, qs in groups.items() for q in qs]
    prompts = [q for _, q in order]
    subjects = [t.target for t in targets]
    rivals = [rivals_for(t.target, known + subjects) for t in targets]
    timed: dict[str, tuple[torch.Tensor, float]] = {}
    for label, r in (("name alone", None), ("against rivals", rivals)):
        started = time.perf_counter()
        timed[label] = (subject_scores(model, tok, prompts, subjects, rivals=r),
                        time.perf_counter() - started)

    def rows_of(group: str) -> list[int]:
        return [i for i, (g, _) in enumerate(order) if g == group]

    print(f"\n{len(targets)} targets, {len(prompts)} prompts, {len(known)} known people "
          "(every neighbour's name left out); scoring seconds: "
          + ", ".join(f"{k} {v[1]:.0f}" for k, v in timed.items()) + "\n")
    print("| target | score | probes w=1 | probes w>=0.5 | probes w>0 | neighbours w>0 "
          "| neighbours w>=0.5 | other targets w>0 | unrelated w>0 | AUROC probes vs "
          "neighbours + others |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals: dict[str, list[list[float]]] = {}
    for j, t in enumerate(targets):
        pos, neigh = rows_of(f"probes:{t.name}"), rows_of(f"neighbours:{t.name}")
        others = [i for u in targets if u is not t for i in rows_of(f"probes:{u.name}")]
        own_hard = [i for i, (about, _) in zip(rows_of("hard"), hard)
                    if rivals_for(t.target, [about])]
        variants = [(label, scores, None) for label, (scores, _) in timed.items()] + [
            ("against rivals, hard negatives", timed["against rivals"][0], own_hard)]
        for label, scores, hard_rows in variants:
            col = scores[:, j]
            probe, _ = calibrate(t.target, col[rows_of("generic")],
                                 col[rows_of(f"ticket:{t.name}")],
                                 hard_scores=col[hard_rows] if hard_rows else None)
            w = probe.weight_from_score(col)

            def share(rows: list[int], at: float = 0.0, above: bool = True) -> float:
                if not rows:
                    return float("nan")
                picked = w[rows]
                return float(((picked > at) if above else (picked >= at)).float().mean())

            cells = [share(pos, 1.0, False), share(pos, 0.5, False), share(pos),
                     share(neigh), share(neigh, 0.5, False), share(others),
                     share(rows_of("unrelated")),
                     auroc(col[pos].tolist(), col[neigh + others].tolist())]
            totals.setdefault(label, []).append(cells)
            print(f"| {t.name} | {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    for label, rows in totals.items():
        mean = torch.tensor(rows).nanmean(0).tolist()
        print(f"| mean | {label} | " + " | ".join(f"{c:.2f}" for c in mean) + " |")


if __name__ == "__main__":
    main()
