"""Does forgetting last? Relearning attacks and many sequential requests.

- relearning (Hu et al., 2024, "Unlearning or obfuscating?"; Lynch et al., 2024): fine-tune
  the unlearned model for a few steps on a small part of the forget set and measure
  forgetting again on the rest. Knowledge that was only hidden comes back in a handful of
  steps; `relearning_recovery` says how much of what was forgotten came back.
- sustainability (MUSE): every metric after each of many sequential requests; here the
  forget efficacy on *every* target so far and the utility, per request count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def relearning_recovery(*, before: float, after: float, relearned: float) -> float | None:
    """Share of the forgotten knowledge that relearning brought back.

    before/after/relearned: correct-answer rates on the same probes for the original model,
    the unlearned one and the unlearned one after relearning. 0 means nothing came back, 1
    means all of it (values outside [0, 1] are clipped); None when nothing was forgotten
    (after >= before), since there is then nothing to recover.
    """
    forgotten = before - after
    if forgotten <= 0:
        return None
    return min(1.0, max(0.0, (relearned - after) / forgotten))


@dataclass(frozen=True)
class SustainabilityPoint:
    """Metrics after the k-th sequential request.

    Args:
        requests: how many requests the model has absorbed (k).
        forget_ratio: mean over all k targets of their forget ratio (after / base); the
            older targets must stay forgotten while new ones arrive.
        utility_ratio: utility relative to the base after k requests.
        utility_retention: utility_ratio relative to the one after the first request.
    """

    requests: int
    forget_ratio: float
    utility_ratio: float
    utility_retention: float


def sustainability(per_request: Sequence[Mapping[str, object]]) -> list[SustainabilityPoint]:
    """Summarise snapshots taken after each sequential request.

    per_request[k-1]: {"forget_ratios": [ratio of target 1..k after request k],
    "utility_ratio": float}.
    """
    points: list[SustainabilityPoint] = []
    first_utility: float | None = None
    for k, snap in enumerate(per_request, start=1):
        ratios = [float(r) for r in snap["forget_ratios"]]  # type: ignore[union-attr]
        if len(ratios) != k:
            raise ValueError(f"snapshot {k} has {len(ratios)} targets' forget ratios; "
                             f"expected {k} (one per request so far)")
        utility = float(snap["utility_ratio"])  # type: ignore[arg-type]
        if first_utility is None:
            first_utility = utility
        retention = utility / first_utility if first_utility > 0 else 0.0
        points.append(SustainabilityPoint(k, sum(ratios) / k, utility, retention))
    return points
