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
    """The version report (workers.evaluation.version_eval): held-out forms of the forget
    set, neighbours, utility, general benchmark, memorisation, MIA and fluency, against the
    base and the parent. The report is written into `adapter_dir` (stored with the
    version); the returned summary becomes the version's metrics."""
    from workers.evaluation.version_eval import configs_from, evaluate_adapter

    qa, texts = payload_items(tickets, "forget")
    report_config, relearn = configs_from(config.evaluation)
    return evaluate_adapter(base, device=config.device, qa=qa, texts=texts,
                            targets=[t.target for t in tickets], adapter_dir=adapter_dir,
                            parent_dir=parent_dir, config=report_config, relearn=relearn)
