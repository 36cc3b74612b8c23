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
    run = train_plain if config.trainer == "plain" else train_unlearning_adapter
    result = run(spec, progress_cb=progress)
    return TrainOutput(adapter_dir=Path(result.adapter_dir), metrics=result.metrics,
                       method_config=spec.method_summary(), peft_config=result.peft_config)


def evaluate(config: WorkerConfig, *, base: Any, tickets: list[ClaimedTicket], adapter_dir: Path,
             parent_dir: Path | None) -> dict[str, Any]:
    """Forget and utility, each as the adapted model's correct-answer rate over the base's.

    forget: the tickets' own questions (the only forget probes a job may know about).
    utility: the shipped unrelated probe set, far from any target.
    """
    from peft import PeftModel

    from workers.evaluation.generation import hf_generate_fn
    from workers.evaluation.metrics import answer_rate
    from workers.evaluation.probes import load_unrelated_probes
    from workers.model import load_model_and_tokenizer

    qa, _texts = payload_items(tickets, "forget")
    forget = ticket_probes(qa)
    utility = list(load_unrelated_probes())
    model, tokenizer = load_model_and_tokenizer(base, device=config.device)
    before_fn = hf_generate_fn(model, tokenizer)
    before = {"forget": answer_rate(before_fn, forget) if forget else None,
              "utility": answer_rate(before_fn, utility)}
    adapted = PeftModel.from_pretrained(model, str(adapter_dir))
    after_fn = hf_generate_fn(adapted, tokenizer)
    after = {"forget": answer_rate(after_fn, forget) if forget else None,
             "utility": answer_rate(after_fn, utility)}
    return {
        "forget_rate_before": before["forget"], "forget_rate_after": after["forget"],
        "utility_rate_before": before["utility"], "utility_rate_after": after["utility"],
        # A base that never answered had nothing to forget (ratio 0) and nothing to lose (1).
        "forget_ratio": _ratio(after["forget"], before["forget"], if_base_zero=0.0),
        "utility_ratio": _ratio(after["utility"], before["utility"], if_base_zero=1.0),
        "forget_probes": len(forget), "utility_probes": len(utility),
    }


def _ratio(after: float | None, before: float | None, *, if_base_zero: float) -> float | None:
    if after is None or before is None:
        return None
    return after / before if before > 0 else if_base_zero


