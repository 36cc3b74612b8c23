"""O3's per-request detector vs the training-free baseline, on the real bundled model.

For each shipped forget set (a well-known person): the detector is fitted on the ticket's
questions (plus generic retain prompts the service ships); the test is the held-out
rephrased questions about the person (positives) against the unrelated utility questions
and against questions about neighbours (same field, never naming the target;
workers/engines/o3/data/people_questions.json). Prints AUROC per person and detector, and the share of
inputs each calibrated detector would gate on (w > 0).

    flock /tmp/oblivio-heavy.lock .venv/bin/python benchmarks/detector_auroc.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)


def baseline_scores(feats, forget, generic):  # type: ignore[no-untyped-def]
    """The issue's training-free detector: all-token mean-pooled states, standardised with
    generic prompts per layer, max cosine to the forget items, averaged over layers."""
    import torch.nn.functional as F

    mean, std = generic.mean(1, keepdim=True), generic.std(1, keepdim=True).clamp(min=1e-4)
    f = F.normalize((forget - mean) / std, dim=-1)
    x = F.normalize((feats - mean) / std, dim=-1)
    return (x @ f.transpose(-1, -2)).max(-1).values.mean(0)


def all_token_features(model, tokenizer, prompts, layers):  # type: ignore[no-untyped-def]
    import torch

    from workers.engines.o3.detector import encode_prompts, pooled_from_hidden

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            enc = encode_prompts(tokenizer, prompts[i:i + 16])
            res = model(**enc, output_hidden_states=True, use_cache=False)
            out.append(pooled_from_hidden(res.hidden_states, layers, enc["attention_mask"].bool()))
    return torch.cat(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", default="all")
    parser.add_argument("--detector", default="{}", help="DetectorConfig overrides (JSON)")
    parser.add_argument("--generic", type=int, default=60, help="generic prompts used")
    args = parser.parse_args()

    import torch

    from workers.engines.o3.config import DetectorConfig
    from workers.engines.o3.detector import auroc, fit_detector, masked_view, prompt_features
    from workers.evaluation.probes import (
        available_forget_sets,
        load_forget_set,
        load_retain_prompts,
        load_unrelated_probes,
    )
    from workers.model import load_model_and_tokenizer, resolve_base_model

    torch.set_num_threads(2)
    # Neighbours: the continual benchmark's (people near each target, disjoint from the
    # engine's shipped bank of other-people questions, which the detector may train on).
    neighbours = {p["name"]: [q["question"] for q in p.get("neighbours", [])]
                  for p in json.loads((REPO / "benchmarks/data/continual_probes.json")
                                      .read_text())["people"]}
    bank = [q["question"] for q in json.loads(
        (REPO / "workers/engines/o3/data/people_questions.json").read_text())["questions"]]
    people = available_forget_sets() if args.people == "all" else args.people.split(",")
    ref = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache/oblivio-data")
    model, tok = load_model_and_tokenizer(ref)
    cfg = DetectorConfig(**json.loads(args.detector))
    n_hidden = model.config.num_hidden_layers
    layers = cfg.layer_indices(n_hidden)
    all_layers = list(range(n_hidden + 1))
    generic_prompts = list(load_retain_prompts())[:args.generic]
    unrelated = [p.question for p in load_unrelated_probes()]
    t0 = time.perf_counter()
    from workers.engines.o3.detector import split_generic

    train_g, calib_g = split_generic(generic_prompts, cfg)

    def feats(prompts):  # type: ignore[no-untyped-def]
        # (2 * (L+1), N, d): content features of every layer, then last-token ones.
        return prompt_features(model, tok, prompts, all_layers, pooling="both")

    train_h, calib_h = split_generic(bank, cfg)
    g_all, c_all = feats(train_g), feats(calib_g)
    gh_all, ch_all = feats(train_g + train_h), feats(calib_g + calib_h)
    u_all = feats(unrelated)
    g_base = all_token_features(model, tok, generic_prompts, all_layers)
    u_base = all_token_features(model, tok, unrelated, all_layers)
    rows = []
    cfg = replace(cfg, hard_negatives=False)
    variants = {"o3 content (ocsvm)": replace(cfg, pooling="content"),
                "o3 last token (ocsvm)": replace(cfg, pooling="last"),
                "o3 both (ocsvm)": replace(cfg, pooling="both"),
                "o3 both (mean)": replace(cfg, pooling="both", aggregator="mean"),
                "o3 both, no training": replace(cfg, pooling="both", epochs=0),
                "o3 content + hard negatives": replace(cfg, pooling="content",
                                                       hard_negatives=True),
                "o3 both + hard negatives": replace(cfg, pooling="both", hard_negatives=True)}
    width = len(all_layers)
    for name in people:
        person = load_forget_set(name)
        forget_q = [p.question for p in person.ticket]
        held = [p.question for p in person.held_out]
        neigh = neighbours.get(name, [])
        rng = random.Random(cfg.seed)
        views = [masked_view(q, cfg.mask_prob, rng) for q in forget_q for _ in range(cfg.views)]
        items = torch.tensor([i for i in range(len(forget_q)) for _ in range(cfg.views)])
        f_all, v_all, h_all, n_all = feats(forget_q), feats(views), feats(held), feats(neigh)
        # Baseline: all-token pooling, all layers.
        fb = all_token_features(model, tok, forget_q, all_layers)
        hb = baseline_scores(all_token_features(model, tok, held, all_layers), fb, g_base)
        ub = baseline_scores(u_base, fb, g_base)
        nb = baseline_scores(all_token_features(model, tok, neigh, all_layers), fb, g_base)
        rows.append((name, "training-free baseline", auroc(hb.tolist(), ub.tolist()),
                     auroc(hb.tolist(), nb.tolist()), None, None, None))
        for label, vcfg in variants.items():
            sel = ([*layers] if vcfg.pooling != "last" else []) + (
                [width + i for i in layers] if vcfg.pooling != "content" else [])
            neg, cal = (gh_all, ch_all) if vcfg.hard_negatives else (g_all, c_all)
            det, summary = fit_detector(forget=f_all[sel], views=v_all[sel], view_items=items,
                                        generic=neg[sel], layers=layers, cfg=vcfg,
                                        calibration=cal[sel])
            hs, us, ns = (det.score(x[sel]) for x in (h_all, u_all, n_all))
            hw, uw, nw = (det.weights(x[sel]) for x in (h_all, u_all, n_all))
            rows.append((name, label, auroc(hs.tolist(), us.tolist()),
                         auroc(hs.tolist(), ns.tolist()), float((hw > 0.5).float().mean()),
                         float((uw > 0).float().mean()), float((nw > 0).float().mean())))
    print(f"\nlayers {list(layers)}, {len(train_g)} + {len(calib_g)} generic prompts, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| target | detector | AUROC vs unrelated | AUROC vs neighbours | held-out w>0.5 "
          "| unrelated w>0 | neighbours w>0 |")
    print("|---|---|---|---|---|---|---|")
    for name, label, au, an, hw, uw, nw in rows:
        fmt = (lambda x: "-" if x is None else f"{x:.2f}")
        print(f"| {name} | {label} | {au:.3f} | {an:.3f} | {fmt(hw)} | {fmt(uw)} | {fmt(nw)} |")


if __name__ == "__main__":
    main()
