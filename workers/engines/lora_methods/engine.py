"""The LoRA unlearning methods (idk, npo, ga, graddiff) as one engine class, by method name.

train: the ticket's forget set -> a TrainJobSpec -> Ray Train + DeepSpeed (workers.training)
-> one stacked PEFT adapter (parent + new LoRA). Serving: the adapter on the base model.
Evaluation: the shared forgetting evaluation (workers.evaluation.version_eval).

This module stays light (no torch): the API imports it to validate tickets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import InvalidRequest
from workers.engines.base import Artifacts, EngineRequest, FetchFn, JobInput, ProgressFn


@dataclass(frozen=True)
class MethodTraits:
    """What a method can take, known without importing it (and so torch).

    Args:
        rewrites_answers: trains on rewritten answers (idk: refusals) rather than against
            the given ones; plain texts then become continuation / fill-in-the-blank
            prompts (workers.evaluation.probes.text_probes), so a text must yield one.
    """

    rewrites_answers: bool = False


METHOD_TRAITS: dict[str, MethodTraits] = {
    "idk": MethodTraits(rewrites_answers=True),
    "npo": MethodTraits(),
    "ga": MethodTraits(),
    "graddiff": MethodTraits(),
}


class LoraMethodEngine:
    """One registered unlearning method (workers/methods) trained as a stacked LoRA."""

    ticket_kinds = frozenset({"forget"})

    def __init__(self, method: str) -> None:
        if method not in METHOD_TRAITS:
            raise ValueError(f"no traits declared for method {method!r}")
        self.name = method
        self.traits = METHOD_TRAITS[method]

    def __repr__(self) -> str:
        return f"LoraMethodEngine({self.name!r})"

    # --- at submission --------------------------------------------------------------
    def validate(self, request: EngineRequest) -> None:
        if request.kind not in self.ticket_kinds:
            raise InvalidRequest(f"engine {self.name!r} cannot serve a {request.kind!r} ticket")
        if not request.forget_qa and not request.forget_texts:
            raise InvalidRequest("the forget set is empty: give at least one text or "
                                 "question/answer pair")
        if self.traits.rewrites_answers and request.forget_texts and not request.forget_qa:
            from workers.evaluation.probes import text_probes

            if not text_probes(request.forget_texts):
                raise InvalidRequest(f"engine {self.name!r} found no sentence or word to "
                                     "prompt with in these texts; give longer texts or "
                                     "question/answer pairs")
        if request.options:
            # Only then: checking options imports the method (and torch).
            from workers.methods import get_method

            get_method(self.name).make_config(request.options)

    # --- on a worker ----------------------------------------------------------------
    def train_spec(self, job: JobInput) -> Any:
        """The TrainJobSpec of `job` (all tickets' forget and retain sets together)."""
        from workers.training.spec import TrainJobSpec

        qa = [i for r in job.requests for i in r.forget_qa]
        texts = [t for r in job.requests for t in r.forget_texts]
        retain_qa = [i for r in job.requests for i in r.retain_qa]
        retain_texts = [t for r in job.requests for t in r.retain_texts]
        first = job.requests[0]
        config = job.config
        try:
            return TrainJobSpec.for_engine(
                self.name, overrides=config.recipe, base_model_path=str(job.base_model_path),
                base_model_sha256=job.base_model_sha256, output_dir=str(job.output_dir),
                data_dir=str(config.data_dir), base_model=config.base_model,
                forget_qa=qa, forget_texts=texts,
                target=first.target, retain_qa=retain_qa or None,
                retain_texts=retain_texts or None, method_options=dict(first.options),
                parent_adapter_dir=str(job.parent_dir) if job.parent_dir else None,
                num_workers=config.num_workers, zero_stage=config.zero_stage,
                device=config.device)
        except ValueError as exc:  # a recipe or ticket that cannot train: not transient
            raise InvalidRequest(f"cannot train this job: {exc}") from exc

    def train(self, job: JobInput, progress: ProgressFn) -> Artifacts:
        from workers.training.runner import train_adapter

        spec = self.train_spec(job)
        result = train_adapter(spec, progress, trainer=job.config.trainer,
                               warm=job.config.warm_train_workers,
                               resources=job.config.worker_resources)
        return Artifacts(version_dir=Path(result.adapter_dir), metrics=result.metrics,
                         method_config=spec.method_summary(), peft_config=result.peft_config)

    def load_servable(self, version_dir: Path | None, *, model: Any, tokenizer: Any,
                      device: str, fetch: FetchFn | None = None) -> Any:
        from workers.engines.lora_methods.servable import load_lora_servable

        return load_lora_servable(version_dir, model=model, tokenizer=tokenizer, device=device)

    def evaluate(self, job: JobInput, *, before: Any, after: Any,
                 parent: Any | None = None) -> dict[str, Any]:
        from workers.evaluation.version_eval import evaluate_forgetting

        if parent is None:
            return evaluate_forgetting(job, before=before, after=after)
        return evaluate_forgetting(job, before=parent, after=after, base=before)
