"""A new version's evaluation with Hugging Face models: base, parent and new version.

`evaluate_adapter` is what the job runs for adapter versions (PEFT directories): it loads
the base once, measures it, then the parent adapter (if any) and the new one on the same
weights, writes the full report into the version directory (stored and hashed with it) and
returns the flat summary that becomes the version's DB metrics. `evaluate_subjects` is the
engine-agnostic core for engines that hand over `Servable`s instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.evaluation.relearning import RelearnConfig, relearned_model, split_for_relearning
from workers.evaluation.report import (
    ProbePlan,
    ReportConfig,
    Subject,
    compare,
    measure,
    plan_probes,
    write_report,
)
from workers.evaluation.robustness import relearning_recovery
from workers.evaluation.metrics import StopFn
from workers.evaluation.scoring import ScoreFn


def configs_from(overrides: dict[str, Any] | None) -> tuple[ReportConfig, RelearnConfig | None]:
    """ReportConfig (and the relearning attack, if `relearn_steps` > 0) from operator
    overrides; unknown keys are refused so that a typo does not silently do nothing."""
    from dataclasses import fields

    values = dict(overrides or {})
    relearn_steps = int(values.pop("relearn_steps", 0))
    relearn_lr = float(values.pop("relearn_lr", RelearnConfig().lr))
    known = {f.name for f in fields(ReportConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}; known: "
                         f"{', '.join(sorted(known | {'relearn_steps', 'relearn_lr'}))}")
    relearn = RelearnConfig(steps=relearn_steps, lr=relearn_lr) if relearn_steps > 0 else None
    return ReportConfig(**values), relearn


def servable_subject(servable: Any, *, max_new_tokens: int = 32,
                     score: ScoreFn | None = None) -> Subject:
    """A `Subject` over an engine's `Servable` (generate(prompts, max_new_tokens))."""

    def generate(prompts: list[str]) -> list[str]:
        return list(servable.generate(prompts, [max_new_tokens] * len(prompts)))

    # A servable that caches per probe set (answer_cache.CachedAnswers: the base model) is
    # asked set by set, so each shipped set is its own cache entry.
    each_set = getattr(servable, "generate_each_set", None)
    generate_sets = ((lambda sets: each_set(sets, max_new_tokens)) if callable(each_set)
                     else None)
    generate_until = None
    if "stop" in inspect.signature(servable.generate).parameters:  # the optional early stops
        def generate_until(prompts: list[str], stop: list[StopFn | None]) -> list[str]:
            return list(servable.generate(prompts, [max_new_tokens] * len(prompts), stop=stop))

    return Subject(generate=generate, score=score, generate_sets=generate_sets,
                   generate_until=generate_until)


def evaluate_subjects(plan: ProbePlan, subjects: dict[str, Subject], *,
                      reference_score: ScoreFn | None = None,
                      config: ReportConfig = ReportConfig(),
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure every subject ("base", "after", optional "parent") and compare them."""
    measurements = {name: measure(s, plan, reference_score=reference_score, config=config)
                    for name, s in subjects.items()}
    return compare(measurements, plan=plan, config=config, extra=extra)


def _hf_subject(model: Any, tokenizer: Any, config: ReportConfig) -> Subject:
    from workers.evaluation.generation import hf_generate_fn
    from workers.evaluation.scoring import hf_score_fn

    return Subject(hf_generate_fn(model, tokenizer, max_new_tokens=config.max_new_tokens),
                   hf_score_fn(model, tokenizer))


def evaluate_adapter(base_ref: Any, *, device: str, qa: Sequence[dict[str, str]],
                     texts: Sequence[str], targets: Sequence[str | None], adapter_dir: Path,
                     parent_dir: Path | None, config: ReportConfig = ReportConfig(),
                     relearn: RelearnConfig | None = None) -> dict[str, Any]:
    """Evaluate the PEFT version in `adapter_dir` against the base and `parent_dir`.

    Writes the report into `adapter_dir` and returns the summary metrics, with
    {"report": {"path", "sha256"}} pointing at it.
    """
    from peft import PeftModel

    from workers.evaluation.scoring import token_stats
    from workers.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base_ref, device=device)
    plan = plan_probes(qa, texts, targets=targets, config=config)
    base = _hf_subject(model, tokenizer, config)
    measurements = {"base": measure(base, plan, reference_score=base.score, config=config)}

    if parent_dir is not None:
        adapted = PeftModel.from_pretrained(model, str(parent_dir), adapter_name="parent")
        adapted.load_adapter(str(adapter_dir), adapter_name="after")
    else:
        adapted = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="after")

    def base_score(pairs: list[tuple[str | None, str]]) -> Any:
        # The adapters are injected into the base's layers: switch them off to score.
        with adapted.disable_adapter():
            return token_stats(adapted, tokenizer, pairs)

    if parent_dir is not None:
        adapted.set_adapter("parent")
        measurements["parent"] = measure(_hf_subject(adapted, tokenizer, config), plan,
                                         reference_score=base_score, config=config)
    adapted.set_adapter("after")
    measurements["after"] = measure(_hf_subject(adapted, tokenizer, config), plan,
                                    reference_score=base_score, config=config)
    extra = {"relearning": relearning_block(adapted, tokenizer, qa, plan, measurements,
                                            config, relearn)}
    report = compare(measurements, plan=plan, config=config, extra=extra)
    summary = dict(report["summary"])
    summary["report"] = write_report(report, adapter_dir)
    return summary


def relearning_block(model: Any, tokenizer: Any, qa: Sequence[dict[str, str]],
                     plan: ProbePlan, measurements: dict[str, dict[str, Any]],
                     config: ReportConfig, relearn: RelearnConfig | None
                     ) -> dict[str, Any] | None:
    """Forgetting after the relearning attack, on the held-out forms of the pairs it did
    not relearn; None when not asked for or with fewer than two forget QA pairs."""
    if relearn is None or relearn.steps < 1:
        return None
    learn, measure_on = split_for_relearning(qa, relearn.fraction)
    keep = set(measure_on)
    idx = [j for j, f in enumerate(plan.held_out) if f.source in keep]
    if not learn or not idx:
        return None
    sub = ProbePlan(trained=[], held_out=[plan.held_out[j] for j in idx], neighbours=[],
                    utility=[], general=[])
    attacked = relearned_model(model, tokenizer, [qa[i] for i in learn], relearn)
    relearned = measure(_hf_subject(attacked, tokenizer, config), sub, config=config)
    del attacked
    return relearning_result(
        before=[measurements["base"]["held_out_flags"][j] for j in idx],
        after=[measurements["after"]["held_out_flags"][j] for j in idx],
        relearned_rate=relearned["forget_held_out"], config=relearn,
        relearn_items=len(learn), probes=len(idx))


def relearning_result(*, before: Sequence[bool], after: Sequence[bool], relearned_rate: float,
                      config: RelearnConfig, relearn_items: int, probes: int
                      ) -> dict[str, Any]:
    """Rates on the measured split before / after unlearning / after relearning."""
    rate_before = sum(before) / len(before)
    rate_after = sum(after) / len(after)
    return {"steps": config.steps, "lr": config.lr, "relearn_items": relearn_items,
            "probes": probes, "rate_before": rate_before, "rate_after": rate_after,
            "rate_relearned": relearned_rate,
            "forget_ratio": relearned_rate / rate_before if rate_before > 0 else 0.0,
            "recovery": relearning_recovery(before=rate_before, after=rate_after,
                                            relearned=relearned_rate)}


def evaluate_forgetting(job: Any, *, before: Any, after: Any, base: Any | None = None,
                        version_dir: Path | None = None,
                        config: ReportConfig | None = None) -> dict[str, Any]:
    """The shared `Engine.evaluate` of forgetting engines (workers/engines/base.py).

    job: a `JobInput` (its requests' forget QA, texts and targets are the forget set).
    before: the parent version (or the base when there is none); after: the new version;
    base: the base model when `before` is a parent (ratios are always relative to the base).
    Servables that also offer `score(pairs) -> list[TokenStats]` get membership inference.
    The report is written into `version_dir` (default `job.output_dir`) when it exists.
    Returns the summary metrics, including "verdict".
    """
    if config is None:  # the operator's overrides (OBLIVIO_EVALUATION), via the job
        config, _relearn = configs_from(getattr(job.config, "evaluation", None))
    qa = [q for r in job.requests for q in r.forget_qa]
    texts = [t for r in job.requests for t in r.forget_texts]
    plan = plan_probes(qa, texts, targets=[r.target for r in job.requests], config=config)

    def subject(servable: Any) -> Subject:
        return servable_subject(servable, max_new_tokens=config.max_new_tokens,
                                score=getattr(servable, "score", None))

    subjects = {"base": subject(base if base is not None else before)}
    if base is not None:
        subjects["parent"] = subject(before)
    subjects["after"] = subject(after)
    report = evaluate_subjects(plan, subjects, reference_score=subjects["base"].score,
                               config=config)
    summary = dict(report["summary"])
    target_dir = Path(version_dir or job.output_dir)
    if target_dir.is_dir():
        summary["report"] = write_report(report, target_dir)
    return summary
