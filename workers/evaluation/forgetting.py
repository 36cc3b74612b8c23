"""The job's own evaluation of a forgetting version, and its verdict: one function for every
forgetting engine (the LoRA methods today, O3 when it lands).

forget: the tickets' own questions, and their texts' continuation / fill-in-the-blank
prompts (the only forget probes a job may know about).
utility: the shipped unrelated probe set, far from any target.
Each is read as the new version's correct-answer rate over the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from workers.evaluation.generation import DEFAULT_MAX_NEW_TOKENS
from workers.evaluation.metrics import answer_rate
from workers.evaluation.probes import Probe, load_unrelated_probes, text_probes, ticket_probes

VERDICTS = ("pass", "hold", "reject")


class Answers(Protocol):
    """What is evaluated: a `workers.engines.base.Servable`."""

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class EvalPolicy:
    """When a freshly trained version may go live without an operator.

    Args:
        max_forget_ratio: forget probes answered correctly after / before must be <= this.
        min_utility_ratio: unrelated probes answered correctly after / before must be >= this;
            below `reject_utility_ratio` the version is not kept at all.
        reject_utility_ratio: a version this damaging is marked failed, not left as candidate.
    """

    max_forget_ratio: float = 0.2
    min_utility_ratio: float = 0.9
    reject_utility_ratio: float = 0.5


def forget_probes(requests: Sequence[Any]) -> list[Probe]:
    """Probes for what the requests (EngineRequest) ask to forget: their own questions and
    their texts' prompts (workers.evaluation.probes.text_probes)."""
    qa = [item for r in requests for item in r.forget_qa]
    texts = [t for r in requests for t in r.forget_texts]
    return ticket_probes(qa) + text_probes(texts)


def evaluate_forgetting(requests: Sequence[Any], *, before: Answers, after: Answers,
                        policy: EvalPolicy | None = None,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Forget and utility rates before/after, their ratios, and the verdict.

    Returns metrics with "verdict" ("pass" | "hold" | "reject") and "verdict_reason".
    """
    policy = policy or EvalPolicy()
    forget = forget_probes(requests)
    utility = list(load_unrelated_probes())

    def rate(servable: Answers, probes: list[Probe]) -> float | None:
        if not probes:
            return None
        return answer_rate(lambda qs: servable.generate(qs, [max_new_tokens] * len(qs)), probes)

    before_rates = {"forget": rate(before, forget), "utility": rate(before, utility)}
    after_rates = {"forget": rate(after, forget), "utility": rate(after, utility)}
    metrics: dict[str, Any] = {
        "forget_rate_before": before_rates["forget"], "forget_rate_after": after_rates["forget"],
        "utility_rate_before": before_rates["utility"],
        "utility_rate_after": after_rates["utility"],
        # A base that never answered had nothing to forget (ratio 0) and nothing to lose (1).
        "forget_ratio": _ratio(after_rates["forget"], before_rates["forget"], if_base_zero=0.0),
        "utility_ratio": _ratio(after_rates["utility"], before_rates["utility"],
                                if_base_zero=1.0),
        "forget_probes": len(forget), "utility_probes": len(utility),
    }
    metrics["verdict"], metrics["verdict_reason"] = judge_version(metrics, policy)
    return metrics


def judge_version(metrics: dict[str, Any], policy: EvalPolicy) -> tuple[str, str]:
    """('pass' | 'hold' | 'reject', why) for a version's forget/utility ratios."""
    utility = metrics.get("utility_ratio")
    forget = metrics.get("forget_ratio")
    if utility is not None and utility < policy.reject_utility_ratio:
        return "reject", (f"kept too little utility ({utility:.2f} of the base model's "
                          f"answers; the floor is {policy.reject_utility_ratio:.2f})")
    if forget is None or utility is None:
        return "hold", "no forget probes to judge by; an operator decides"
    if forget <= policy.max_forget_ratio and utility >= policy.min_utility_ratio:
        return "pass", (f"forgot (ratio {forget:.2f} <= {policy.max_forget_ratio:.2f}) and kept "
                        f"utility ({utility:.2f} >= {policy.min_utility_ratio:.2f})")
    return "hold", (f"forget ratio {forget:.2f} (limit {policy.max_forget_ratio:.2f}), utility "
                    f"ratio {utility:.2f} (floor {policy.min_utility_ratio:.2f}): an operator "
                    "decides")


def _ratio(after: float | None, before: float | None, *, if_base_zero: float) -> float | None:
    if after is None or before is None:
        return None
    return after / before if before > 0 else if_base_zero
