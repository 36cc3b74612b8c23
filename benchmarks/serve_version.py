"""What an O3 version's real, calibrated gates cost unrelated prompts, and why.

`benchmarks/serve_gating.py` forces every weight to 0; this loads a version an engine
trained (e.g. the last one `benchmarks/continual.py` leaves in its scratch folder) and
reports, side by side in one run: how many unrelated prompts and batches get a weight
above 0 from any block, and the time of O3 serving vs HF generate on the same prompts.

    .venv/bin/python benchmarks/serve_version.py /tmp/oblivio-continual-*/o3/v10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Not the script folder: benchmarks/queue.py would shadow the standard library queue.
sys.path[0] = str(REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("version_dir", type=Path, help="an O3 version's folder")
    parser.add_argument("--prompts", type=int, default=48, help="unrelated prompts")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens generated per prompt (the gates cost the same for any)")
    args = parser.parse_args()

    import torch

    from benchmarks.serve_gating import timed
    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers
    from workers.evaluation.probes import load_unrelated_probes
    from workers.model import load_model_and_tokenizer, resolve_base_model

    torch.set_num_threads(2)
    ref = resolve_base_model("bundled:smollm2-135m-instruct", REPO / ".cache" / "oblivio-data")
    model, tok = load_model_and_tokenizer(ref, device="cpu")
    prompts = [p.question for p in load_unrelated_probes()][:args.prompts]
    servable = O3Servable.load(args.version_dir, model=model, tokenizer=tok, device="cpu")

    hf = timed(lambda b: greedy_answers(model, tok, b, max_new_tokens=args.new_tokens,
                                         batch_size=16),
               prompts, args.repeats)
    weights: list[Any] = []  # (batch, blocks) per call, in the order of the batches of 16
    applied: list[Any] = []  # ... what was applied after the answer check

    def o3(batch: list[str]) -> None:
        servable.generate(batch, [args.new_tokens] * len(batch))
        weights.append(servable.last_weights)
        applied.append(servable.last_applied)

    o3_seconds = timed(o3, prompts, args.repeats)
    batches = weights[:len(weights) // args.repeats]  # the first run's
    w = torch.cat(batches)
    on = torch.cat(applied[:len(batches)])
    print(f"\n{args.version_dir}: {w.shape[1]} blocks, {len(prompts)} unrelated prompts, "
          f"batches of 16, {args.new_tokens} new tokens, best of {args.repeats}\n")
    print("| prompts with w > 0 | ... a block applied (answer check) | batches with w > 0 "
          "| hf generate s | o3 s | o3 x hf |")
    print("|---|---|---|---|---|---|")
    gated_batches = sum(int((x > 0).any()) for x in batches)
    print(f"| {int((w > 0).any(1).sum())}/{len(prompts)} | {int((on > 0).any(1).sum())}/"
          f"{len(prompts)} | {gated_batches}/{len(batches)} | {hf:.2f} | {o3_seconds:.2f} | "
          f"{o3_seconds / hf:.2f} |")


if __name__ == "__main__":
    main()
