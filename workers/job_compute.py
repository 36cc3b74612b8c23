"""The model side of a job (compute): tickets -> training spec -> adapter, and its evaluation.

`workers.job_runner` owns the database side and calls only the functions here, so the
orchestration can be read without knowing how training works and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.queue import ClaimedTicket
from workers.config import WorkerConfig
from workers.evaluation.probes import ticket_probes

@dataclass(frozen=True)
class TrainOutput:
    adapter_dir: Path
    metrics: dict[str, Any]
    method_config: dict[str, Any]
    peft_config: dict[str, Any]


def resolve_base(config: WorkerConfig) -> Any:
    """The configured base model, converted and hashed once (see workers.model)."""
    from workers.model import resolve_base_model

    return resolve_base_model(config.base_model, config.data_dir)


def payload_items(tickets: list[ClaimedTicket], part: str = "forget"
                  ) -> tuple[list[dict[str, str]], list[str]]:
    """The QA pairs and texts of every ticket's `part` ("forget" or "retain"), in order."""
    qa: list[dict[str, str]] = []
    texts: list[str] = []
    for ticket in tickets:
        items = (ticket.payload or {}).get(part) or {}
        qa += [{"question": i["question"], "answer": i["answer"]} for i in items.get("qa", [])]
        texts += list(items.get("texts", []))
    return qa, texts


def train(config: WorkerConfig, *, base: Any, tickets: list[ClaimedTicket], parent_dir: Path | None,
          output_dir: Path, progress: Callable[[dict[str, Any]], None]) -> TrainOutput:
    """Train one adapter for `tickets` on Ray Train + DeepSpeed; returns where it was written."""
    from workers.training.runner import train_plain, train_unlearning_adapter
    from workers.training.spec import TrainJobSpec

    qa, texts = payload_items(tickets, "forget")
    retain_qa, retain_texts = payload_items(tickets, "retain")
    spec = TrainJobSpec.for_engine(
        tickets[0].engine, overrides=config.recipe, base_model_path=str(base.local_path), base_model_sha256=base.sha256,
        output_dir=str(output_dir), data_dir=str(config.data_dir),
        forget_qa=qa, forget_texts=texts, target=tickets[0].target,
        retain_qa=retain_qa or None, retain_texts=retain_texts or None,
        parent_adapter_dir=str(parent_dir) if parent_dir else None,
        num_workers=config.num_workers, zero_stage=config.zero_stage,
        device=config.device)
    if config.trainer == "plain":
        result = train_plain(spec, progress_cb=progress)
    else:
        result = train_unlearning_adapter(spec, progress_cb=progress,
                                          warm=config.warm_train_workers)
    return TrainOutput(adapter_dir=Path(result.adapter_dir), metrics=result.metrics,
                       method_config=spec.method_summary(), peft_config=result.peft_config)


def evaluate(config: WorkerConfig, *, base: Any, tickets: list[ClaimedTicket], adapter_dir: Path,
             parent_dir: Path | None) -> dict[str, Any]:
    """Forget and utility, each as the adapted model's correct-answer rate over the base's.

    forget: the tickets' own questions (the only forget probes a job may know about).
    utility: the shipped unrelated probe set, far from any target.
    The base model's answers come from the answer cache when an earlier job on the same
    weights computed them (they never change); the new version answers every probe in one
    batched call.
    """
    from peft import PeftModel

    from workers.evaluation.answer_cache import AnswerCache, CachedAnswers
    from workers.evaluation.generation import DEFAULT_MAX_NEW_TOKENS, EVAL_BATCH_SIZE, greedy_answers
    from workers.evaluation.metrics import correct_flags
    from workers.evaluation.probes import load_unrelated_probes
    from workers.model import load_model_and_tokenizer

    qa, _texts = payload_items(tickets, "forget")
    forget = ticket_probes(qa)
    utility = list(load_unrelated_probes())
    model, tokenizer = load_model_and_tokenizer(base, device=config.device)

    class _Answers:
        def __init__(self, m: Any) -> None:
            self.m = m

        def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
            return greedy_answers(self.m, tokenizer, prompts, max_new_tokens=max(max_new_tokens),
                                  batch_size=EVAL_BATCH_SIZE)

    cache = AnswerCache(Path(config.data_dir) / "eval-cache")
    budget = DEFAULT_MAX_NEW_TOKENS
    before = CachedAnswers(_Answers(model), cache, model_sha256=base.sha256,
                           decoding={"batch_size": EVAL_BATCH_SIZE, "device": config.device})

    def rate(answers: list[str], probes: list[Any]) -> float | None:
        if not probes:
            return None
        flags = correct_flags(answers, probes)
        return sum(flags) / len(flags)

    def ask(servable: Any, probes: list[Any]) -> list[str]:
        return servable.generate([p.question for p in probes], [budget] * len(probes)) \
            if probes else []

    # The base: each probe set on its own, so the shipped sets hit the cache.
    before_rates = {"forget": rate(ask(before, forget), forget),
                    "utility": rate(ask(before, utility), utility)}
    adapted = PeftModel.from_pretrained(model, str(adapter_dir))
    after_answers = ask(_Answers(adapted), forget + utility)  # one batched call
    after_rates = {"forget": rate(after_answers[:len(forget)], forget),
                   "utility": rate(after_answers[len(forget):], utility)}
    return {
        "forget_rate_before": before_rates["forget"], "forget_rate_after": after_rates["forget"],
        "utility_rate_before": before_rates["utility"],
        "utility_rate_after": after_rates["utility"],
        # A base that never answered had nothing to forget (ratio 0) and nothing to lose (1).
        "forget_ratio": _ratio(after_rates["forget"], before_rates["forget"], if_base_zero=0.0),
        "utility_ratio": _ratio(after_rates["utility"], before_rates["utility"],
                                if_base_zero=1.0),
        "forget_probes": len(forget), "utility_probes": len(utility),
        "base_answers_cached": cache.hits, "base_answers_generated": cache.misses,
    }


def _ratio(after: float | None, before: float | None, *, if_base_zero: float) -> float | None:
    if after is None or before is None:
        return None
    return after / before if before > 0 else if_base_zero


