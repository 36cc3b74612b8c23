"""The version report: one new version measured the way the field measures unlearning.

Three steps, so that any engine can use it with whatever models it can load:

1. `plan_probes` builds, once per job, what every model is asked: the ticket's own
   questions, held-out forms generated from them (workers.evaluation.forms), neighbour
   knowledge, unrelated QA (utility), the small general benchmark, continuations of forget
   texts, and member / non-member texts for membership inference.
2. `measure` asks one model (a `Subject`: a generate function and, optionally, a scorer
   for token log-probabilities) all of it and returns JSON-able numbers.
3. `compare` turns the measurements of "base", "after" (the new version) and optionally
   "parent" into ratios relative to the base and to the parent, pass/fail checks against
   the thresholds, a verdict, and the flat `summary` stored as the version's DB metrics.

No probe text, answer or forget-set text is kept in the report: it is stored next to the
version for as long as the version lives, while the ticket's raw forget set is purged.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.evaluation.fluency import mean_repetition_rate, perplexity
from workers.evaluation.forms import FORM_KINDS, ProbeForm, held_out_forms
from workers.evaluation.membership import (
    loss_score,
    min_k_plus_plus,
    min_k_prob,
    priv_leak,
    roc_auc,
)
from workers.evaluation.memorisation import (
    ContinuationProbe,
    continuation_probes,
    knowledge_memorisation,
    verbatim_memorisation,
)
from workers.evaluation.metrics import GenerateFn, correct_flags, is_correct
from workers.evaluation.probes import (
    Probe,
    available_forget_sets,
    load_forget_set,
    load_general_benchmark,
    load_neighbour_probes,
    load_unrelated_probes,
)
from workers.evaluation.scoring import ScoreFn

REPORT_FORMAT = "oblivio-eval/1"
REPORT_FILE = "oblivio_eval_report.json"
"""Written into the version's directory, so it is stored (and hashed) with the version."""

CONTINUE_PROMPT = "Continue this text: {prefix}"


@dataclass(frozen=True)
class ReportConfig:
    """How much to ask, and the thresholds a version is judged against.

    Args:
        held_out_per_item: held-out forms per forget QA pair (kinds rotate over items, so
            a 20-question ticket gets 4 probes of each of the 5 kinds with 1).
        max_held_out: cap on held-out forget probes (evaluation time grows with it).
        max_neighbours: cap on neighbour-knowledge probes.
        max_utility: cap on unrelated QA probes (None: all shipped).
        max_general: cap on general-benchmark items (None: all shipped).
        max_new_tokens: tokens generated per answer.
        mia_k: k of Min-K% / Min-K%++.
        max_forget_ratio: held-out forget probes answered after / base must be <= this.
        min_utility_ratio: unrelated probes answered after / base must be >= this.
        reject_utility_ratio: below this the version is rejected, not held.
    """

    held_out_per_item: int = 1
    max_held_out: int = 40
    max_neighbours: int = 16
    max_utility: int | None = None
    max_general: int | None = None
    max_new_tokens: int = 32
    mia_k: float = 0.2
    max_forget_ratio: float = 0.2
    min_utility_ratio: float = 0.9
    reject_utility_ratio: float = 0.5


@dataclass(frozen=True)
class ProbePlan:
    """What every model of one job is asked (see module docstring)."""

    trained: list[Probe]
    held_out: list[ProbeForm]
    neighbours: list[Probe]
    utility: list[Probe]
    general: list[Probe]
    continuations: list[ContinuationProbe] = field(default_factory=list)
    members: list[tuple[str | None, str]] = field(default_factory=list)
    nonmembers: list[tuple[str | None, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        by_kind = {k: sum(1 for f in self.held_out if f.kind == k) for k in FORM_KINDS}
        return {"forget_trained": len(self.trained), "forget_held_out": len(self.held_out),
                **{f"held_out_{k}": n for k, n in by_kind.items()},
                "neighbour": len(self.neighbours), "utility": len(self.utility),
                "general": len(self.general), "continuations": len(self.continuations),
                "mia_members": len(self.members), "mia_nonmembers": len(self.nonmembers)}


@dataclass(frozen=True)
class Subject:
    """A model under test: greedy answers, and (optionally) token log-probabilities."""

    generate: GenerateFn
    score: ScoreFn | None = None


def _mentions(probe: Probe, names: Sequence[str]) -> bool:
    text = " ".join([probe.question, *probe.accept, probe.answer or ""])
    return any(is_correct(text, accepted=[n]) for n in names if n)


def _names(targets: Sequence[str | None]) -> list[str]:
    # "Charles Darwin" excludes probes mentioning "Darwin" too (surnames are how people ask).
    out: list[str] = []
    for t in targets:
        if t:
            out += [t, *(w for w in t.split() if len(w) > 3 and w[0].isupper())]
    return out


def _rotated(pairs: Sequence[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    """Each prompt with the next item's text: same style and words, but never seen paired."""
    if len(pairs) < 2:
        return []
    return [(pairs[i][0], pairs[(i + 1) % len(pairs)][1]) for i in range(len(pairs))]


def plan_probes(qa: Sequence[dict[str, str]], texts: Sequence[str] = (), *,
                targets: Sequence[str | None] = (), config: ReportConfig = ReportConfig(),
                neighbours: Sequence[Probe] | None = None,
                utility: Sequence[Probe] | None = None,
                general: Sequence[Probe] | None = None) -> ProbePlan:
    """The probes of one job. Shipped sets are used where `neighbours` / `utility` /
    `general` are None; neighbour probes that mention a target are dropped.

    Membership inference: members are the forget QA pairs (answer scored given the
    question) and the forget texts; non-members are the same prompts with another item's
    answer (and texts with another text's second half), so both sides share style and
    vocabulary and differ only in having been the forget set.
    """
    from workers.evaluation.keywords import answer_keywords

    names = _names(targets)
    target = next((t for t in targets if t), None)
    from workers.evaluation.probes import text_probes

    trained = [Probe(i["question"], tuple(i.get("accept") or answer_keywords(i["answer"],
                                                                          i["question"])),
                     i["answer"]) for i in qa]
    if not qa:
        # A ticket of plain texts has no questions to rephrase: its texts' own continuation
        # / fill-in-the-blank prompts (what it trains on) are its forget probes.
        trained = text_probes(list(texts))
    held = held_out_forms(qa, target=target, per_item=config.held_out_per_item,
                          max_probes=config.max_held_out)
    if neighbours is None:
        neighbours = list(load_neighbour_probes())
        for name in available_forget_sets():
            neighbours += list(load_forget_set(name).held_out)
    neighbour_probes = [p for p in neighbours if not _mentions(p, names)][:config.max_neighbours]
    utility_probes = list(utility if utility is not None else load_unrelated_probes())
    utility_probes = [p for p in utility_probes if not _mentions(p, names)][:config.max_utility]
    general_probes = list(general if general is not None else load_general_benchmark())
    general_probes = [p for p in general_probes if not _mentions(p, names)][:config.max_general]
    continuations = continuation_probes(texts)
    members = [(i["question"], i["answer"]) for i in qa] + [(None, t) for t in texts]
    nonmembers = _rotated([(i["question"], i["answer"]) for i in qa])
    halves = [(c.prefix, c.reference) for c in continuations]
    nonmembers += [(None, f"{a} {b}") for a, b in _rotated(halves)]
    return ProbePlan(trained=trained, held_out=held, neighbours=neighbour_probes,
                     utility=utility_probes, general=general_probes, continuations=continuations,
                     members=members, nonmembers=nonmembers)


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def measure(subject: Subject, plan: ProbePlan, *, reference_score: ScoreFn | None = None,
            config: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Ask `subject` everything in `plan` (one batched generate call) and score it.

    reference_score: the base model's scorer, for the perplexity of this model's answers
    (fluency is judged by a fixed reference, not by the model being judged).
    """
    groups: list[tuple[str, list[Probe]]] = [
        ("forget_trained", plan.trained), ("forget_held_out", [f.probe for f in plan.held_out]),
        ("neighbour", plan.neighbours), ("utility", plan.utility), ("general", plan.general)]
    prompts = [p.question for _, probes in groups for p in probes]
    prompts += [CONTINUE_PROMPT.format(prefix=c.prefix) for c in plan.continuations]
    answers = subject.generate(prompts) if prompts else []
    if len(answers) != len(prompts):
        raise ValueError(f"the model gave {len(answers)} answers to {len(prompts)} prompts")
    out: dict[str, Any] = {}
    at = 0
    held_answers: list[str] = []
    for name, probes in groups:
        chunk = answers[at:at + len(probes)]
        at += len(probes)
        flags = correct_flags(chunk, probes)
        out[name] = _rate(flags)
        if name == "forget_held_out":
            held_answers = chunk
            out["held_out_flags"] = flags  # per probe, no text: relearning splits use them
            out["held_out_by_kind"] = {
                kind: _rate([f for f, form in zip(flags, plan.held_out) if form.kind == kind])
                for kind in FORM_KINDS if any(form.kind == kind for form in plan.held_out)}
    continuations = answers[at:]
    out["knowledge_memorisation"] = (knowledge_memorisation(
        [f.probe.answer or "" for f in plan.held_out], held_answers) if plan.held_out else None)
    out["verbatim_memorisation"] = (verbatim_memorisation(
        [c.reference for c in plan.continuations], continuations)
        if plan.continuations else None)
    out["repetition_rate"] = mean_repetition_rate(held_answers) if held_answers else None
    out["answer_perplexity"] = None
    if reference_score is not None and held_answers:
        pairs = [(f.probe.question, a) for f, a in zip(plan.held_out, held_answers) if a.strip()]
        if pairs:
            stats = reference_score(pairs)
            out["answer_perplexity"] = _mean([perplexity(s.logps) for s in stats if s.logps])
    out["mia"] = _mia(subject.score, plan, config.mia_k) if subject.score else None
    return out


def _mia(score: ScoreFn, plan: ProbePlan, k: float) -> dict[str, float] | None:
    if not plan.members or not plan.nonmembers:
        return None
    stats = score(plan.members + plan.nonmembers)
    members, nonmembers = stats[:len(plan.members)], stats[len(plan.members):]
    members = [s for s in members if s.logps]
    nonmembers = [s for s in nonmembers if s.logps]
    if not members or not nonmembers:
        return None
    attacks: dict[str, Callable[[Any], float]] = {
        "loss_auc": lambda s: loss_score(s.logps),
        "min_k_auc": lambda s: min_k_prob(s.logps, k),
        "min_k_plus_plus_auc": lambda s: min_k_plus_plus(s.logps, s.means, s.stds, k),
    }
    return {name: roc_auc([f(s) for s in members], [f(s) for s in nonmembers])
            for name, f in attacks.items()}


def _ratio(after: float | None, before: float | None) -> float | None:
    """after / before; None (undefined) when either is missing or the reference answered
    none of the probes: a base that never answered proves neither forgetting nor kept
    utility, so such a ratio must never count towards a pass."""
    if after is None or before is None or before <= 0:
        return None
    return after / before


RATIO_KEYS = (("forget_held_out", "forget_ratio"),
              ("forget_trained", "forget_trained_ratio"),
              ("neighbour", "neighbour_ratio"),
              ("utility", "utility_ratio"),
              ("general", "general_ratio"))
"""(measurement, ratio name): each ratio is the version's rate over the reference's."""


def ratios(after: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: _ratio(after.get(key), reference.get(key))
                           for key, name in RATIO_KEYS}
    out["held_out_by_kind"] = {
        kind: _ratio(rate, (reference.get("held_out_by_kind") or {}).get(kind))
        for kind, rate in (after.get("held_out_by_kind") or {}).items()}
    return out


VERDICTS = ("pass", "hold", "reject")


def verdict(forget_ratio: float | None, utility_ratio: float | None,
            config: ReportConfig) -> str:
    """The one promotion decision of a forgetting version (the job runner acts on it):
    'pass' (may go live), 'hold' (candidate for an operator) or 'reject' (not kept).

    reject: utility fell below `reject_utility_ratio` of the base's. pass: forget ratio at
    most `max_forget_ratio` and utility ratio at least `min_utility_ratio`. hold:
    everything else, including a ratio that is undefined (no probes, or a base that
    answered none of them): what cannot be measured is never auto-promoted.
    """
    return verdict_and_reason(forget_ratio, utility_ratio, config)[0]


def verdict_and_reason(forget_ratio: float | None, utility_ratio: float | None,
                       config: ReportConfig) -> tuple[str, str]:
    """`verdict` and one sentence saying why (shown to the operator who reviews a hold)."""
    if utility_ratio is not None and utility_ratio < config.reject_utility_ratio:
        return "reject", (f"kept too little utility ({utility_ratio:.2f} of the base model's "
                          f"answers; the floor is {config.reject_utility_ratio:.2f})")
    if utility_ratio is None:
        return "hold", ("utility cannot be judged: the base model answered none of the "
                        "unrelated probes")
    if forget_ratio is None:
        return "hold", ("forgetting cannot be judged: the base model answered none of the "
                        "held-out forget probes (or there were none)")
    if forget_ratio <= config.max_forget_ratio and utility_ratio >= config.min_utility_ratio:
        return "pass", (f"forgot (ratio {forget_ratio:.2f} <= {config.max_forget_ratio:.2f}) "
                        f"and kept utility ({utility_ratio:.2f} >= "
                        f"{config.min_utility_ratio:.2f})")
    return "hold", (f"forget ratio {forget_ratio:.2f} (limit {config.max_forget_ratio:.2f}), "
                    f"utility ratio {utility_ratio:.2f} (floor {config.min_utility_ratio:.2f})"
                    ": an operator decides")


def compare(measurements: dict[str, dict[str, Any]], *, plan: ProbePlan,
            config: ReportConfig = ReportConfig(),
            reference_mia: dict[str, float] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report: measurements of "base", "after" and optionally "parent", compared.

    reference_mia: AUCs of a model that never saw the forget set (a retrained model) for
    PrivLeak; without one the base model is the reference, and PrivLeak says how far the
    forget set moved from where the base put it.
    """
    base, after = measurements["base"], measurements["after"]
    parent = measurements.get("parent")
    vs_base = ratios(after, base)
    vs_parent = ratios(after, parent) if parent is not None else None
    mia_ref_name = "retrained" if reference_mia else "base"
    mia_ref = reference_mia or base.get("mia")
    leak = None
    if after.get("mia") and mia_ref:
        leak = {name.replace("_auc", ""): priv_leak(auc, mia_ref[name])
                for name, auc in after["mia"].items() if mia_ref.get(name)}
    # Held-out forms exist for QA pairs; a ticket of plain texts is judged on its texts'
    # own continuation prompts, the only forget probes it has.
    # (Whether the plan has held-out forms, not whether their ratio is defined: a base
    # that answered none of them leaves forgetting undefined, never judged on easier probes.)
    held_out = bool(plan.held_out)
    forget_key, forget_ratio = (("forget_held_out", vs_base["forget_ratio"]) if held_out else
                                ("forget_trained", vs_base["forget_trained_ratio"]))
    checks = [
        {"name": "forget_ratio",
         "description": ("held-out forget probes, after / base" if held_out else
                         "the forget texts' own prompts, after / base"),
         "before": base.get(forget_key), "after": after.get(forget_key),
         "value": forget_ratio, "op": "<=", "threshold": config.max_forget_ratio},
        {"name": "utility_ratio", "description": "unrelated probes, after / base",
         "before": base.get("utility"), "after": after.get("utility"),
         "value": vs_base["utility_ratio"], "op": ">=", "threshold": config.min_utility_ratio},
    ]
    for check in checks:
        value = check["value"]
        check["passed"] = (None if value is None else
                           value <= check["threshold"] if check["op"] == "<=" else
                           value >= check["threshold"])
    result, reason = verdict_and_reason(forget_ratio, vs_base["utility_ratio"], config)
    report = {
        "format": REPORT_FORMAT,
        "compared_with": ["base"] + (["parent"] if parent is not None else []),
        "probes": plan.counts(),
        "config": asdict(config),
        "models": measurements,
        "relative_to_base": {**vs_base, "priv_leak": leak, "priv_leak_reference": mia_ref_name},
        "relative_to_parent": vs_parent,
        "checks": checks,
        "verdict": result,
        "verdict_reason": reason,
        **(extra or {}),
    }
    report["summary"] = summary(report)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics stored on the version row (and shown by the API) for one report."""
    models, vs_base = report["models"], report["relative_to_base"]
    base, after = models["base"], models["after"]
    vs_parent = report.get("relative_to_parent") or {}
    leak = vs_base.get("priv_leak") or {}
    out: dict[str, Any] = {
        "evaluation_format": report["format"],
        "compared_with": report["compared_with"],
        "forget_rate_before": base.get("forget_held_out"),
        "forget_rate_after": after.get("forget_held_out"),
        "forget_ratio": vs_base["forget_ratio"],
        "forget_probes": report["probes"]["forget_held_out"],
        "forget_trained_rate_before": base.get("forget_trained"),
        "forget_trained_rate_after": after.get("forget_trained"),
        "forget_trained_ratio": vs_base["forget_trained_ratio"],
        "forget_trained_probes": report["probes"]["forget_trained"],
        "forget_ratio_by_kind": vs_base["held_out_by_kind"],
        "utility_rate_before": base.get("utility"),
        "utility_rate_after": after.get("utility"),
        "utility_ratio": vs_base["utility_ratio"],
        "utility_probes": report["probes"]["utility"],
        "neighbour_ratio": vs_base["neighbour_ratio"],
        "neighbour_probes": report["probes"]["neighbour"],
        "general_ratio": vs_base["general_ratio"],
        "general_probes": report["probes"]["general"],
        "knowledge_memorisation_before": base.get("knowledge_memorisation"),
        "knowledge_memorisation_after": after.get("knowledge_memorisation"),
        "verbatim_memorisation_before": base.get("verbatim_memorisation"),
        "verbatim_memorisation_after": after.get("verbatim_memorisation"),
        "mia_auc_before": (base.get("mia") or {}).get("min_k_auc"),
        "mia_auc_after": (after.get("mia") or {}).get("min_k_auc"),
        "priv_leak": leak.get("min_k"),
        "answer_perplexity_before": base.get("answer_perplexity"),
        "answer_perplexity_after": after.get("answer_perplexity"),
        "repetition_rate_after": after.get("repetition_rate"),
        "checks": report["checks"],
        "thresholds": {"forget_ratio": report["config"]["max_forget_ratio"],
                       "utility_ratio": report["config"]["min_utility_ratio"]},
        "verdict": report["verdict"],
        "verdict_reason": report.get("verdict_reason"),
    }
    if vs_parent:
        out["forget_ratio_vs_parent"] = vs_parent.get("forget_ratio")
        out["utility_ratio_vs_parent"] = vs_parent.get("utility_ratio")
        out["neighbour_ratio_vs_parent"] = vs_parent.get("neighbour_ratio")
    if report.get("relearning"):
        out["relearned_forget_ratio"] = report["relearning"].get("forget_ratio")
        out["relearning_recovery"] = report["relearning"].get("recovery")
    return out


def write_report(report: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write `report` as REPORT_FILE into `directory`; returns {"path", "sha256"}."""
    data = json.dumps(report, indent=1, sort_keys=True, allow_nan=False).encode()
    (directory / REPORT_FILE).write_bytes(data)
    return {"path": REPORT_FILE, "sha256": hashlib.sha256(data).hexdigest()}
