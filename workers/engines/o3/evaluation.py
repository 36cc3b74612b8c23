"""An O3 version's own evaluation, through the servables (so gating is what is judged).

forget: the tickets' own questions (a job may know no others); utility: the shipped
unrelated questions. Each is the new version's correct-answer rate over the parent's. The
verdict uses the product's thresholds (forget <= 0.2 of before, utility >= 0.9, below 0.5
the version is rejected).
"""

from __future__ import annotations

from typing import Any

from workers.engines.base import JobInput

MAX_FORGET_RATIO = 0.2
MIN_UTILITY_RATIO = 0.9
REJECT_UTILITY_RATIO = 0.5


def evaluate_forgetting(job: JobInput, *, before: Any, after: Any,
                        max_new_tokens: int = 32) -> dict[str, Any]:
    from workers.evaluation.metrics import answer_rate
    from workers.evaluation.probes import Probe, load_unrelated_probes
    from workers.evaluation.probes import answer_keywords

    forget = [Probe(question=i["question"], accept=answer_keywords(i["answer"], i["question"]))
              for r in job.requests for i in r.forget_qa]
    utility = list(load_unrelated_probes())

    def fn(servable: Any) -> Any:
        return lambda qs: servable.generate(list(qs), [max_new_tokens] * len(qs))

    f_before = answer_rate(fn(before), forget) if forget else None
    f_after = answer_rate(fn(after), forget) if forget else None
    u_before, u_after = answer_rate(fn(before), utility), answer_rate(fn(after), utility)
    forget_ratio = (None if f_before is None else
                    (f_after / f_before if f_before > 0 else 0.0))  # type: ignore[operator]
    utility_ratio = u_after / u_before if u_before > 0 else 1.0
    if utility_ratio < REJECT_UTILITY_RATIO:
        verdict = "reject"
    elif forget_ratio is None or forget_ratio > MAX_FORGET_RATIO or utility_ratio < MIN_UTILITY_RATIO:
        verdict = "hold"
    else:
        verdict = "pass"
    return {"forget_rate_before": f_before, "forget_rate_after": f_after,
            "utility_rate_before": u_before, "utility_rate_after": u_after,
            "forget_ratio": forget_ratio, "utility_ratio": utility_ratio,
            "forget_probes": len(forget), "utility_probes": len(utility), "verdict": verdict}
