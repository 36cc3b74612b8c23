"""The model side of a job (compute): the engine's input, and the version's evaluation.

`workers.job_runner` owns the database side and calls only the functions here and the
engine's, so the orchestration can be read without knowing how training works and vice versa.
Nothing here is engine-specific: every engine goes through `Engine.train`,
`Engine.load_servable` and `Engine.evaluate`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.queue import ClaimedTicket
from workers.config import WorkerConfig
from workers.engines.base import EngineRequest, FetchFn, JobInput, request_from_payload


_EVAL_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_EVAL_MODELS_LOCK = threading.Lock()


def evaluation_model(base: Any, *, device: str, engine: Any) -> tuple[Any, Any]:
    """The base model and tokenizer this process evaluates `engine`'s versions on, loaded
    once and kept: every job's evaluation would otherwise load it again (seconds each).

    One copy per engine class, as a serving replica keeps them (workers/serving.py): an
    engine may inject into its model, so classes never share one; its servables are
    closed after each evaluation, leaving the weights as they were.
    """
    from workers.model import load_model_and_tokenizer

    key = (base.sha256, device, f"{type(engine).__module__}.{type(engine).__qualname__}")
    with _EVAL_MODELS_LOCK:
        if key not in _EVAL_MODELS:
            _EVAL_MODELS[key] = load_model_and_tokenizer(base, device=device)
        return _EVAL_MODELS[key]


def warm_evaluation(config: WorkerConfig, engine_name: str) -> None:
    """Load the evaluation model for `engine_name` (and the libraries it uses) now, before
    the first job needs it."""
    import peft  # noqa: F401  (the LoRA engines' servables; most of the first load's time)

    from workers.engines import get_engine

    evaluation_model(resolve_base(config), device=config.device,
                     engine=get_engine(engine_name))


def resolve_base(config: WorkerConfig) -> Any:
    """The configured base model, converted and hashed once (see workers.model)."""
    from workers.model import resolve_base_model

    return resolve_base_model(config.base_model, config.data_dir)


def engine_requests(tickets: list[ClaimedTicket]) -> list[EngineRequest]:
    """One EngineRequest per claimed ticket, in claim order."""
    return [request_from_payload(kind=t.kind, engine=t.engine, payload=t.payload,
                                 target=t.target) for t in tickets]


def job_input(config: WorkerConfig, *, job_id: str, lineage: str, base: Any,
              tickets: list[ClaimedTicket], parent_dir: Path | None, output_dir: Path,
              fetch: FetchFn | None = None,
              store_dir: Callable[[Path], str] | None = None, sessions: Any = None) -> JobInput:
    return JobInput(job_id=job_id, lineage=lineage, requests=engine_requests(tickets),
                    ticket_ids=[str(t.id) for t in tickets],
                    base_model_path=Path(base.local_path), base_model_sha256=base.sha256,
                    parent_dir=parent_dir, output_dir=output_dir, config=config, fetch=fetch,
                    store_dir=store_dir, sessions=sessions)


def evaluate_version(engine: Any, job: JobInput, *, base: Any, version_dir: Path,
                     fetch: FetchFn | None = None) -> dict[str, Any]:
    """The engine's evaluation of `version_dir` against the base model (and the parent
    version, for engines whose `evaluate` takes `parent`), all on one loaded base."""
    import inspect

    from workers.evaluation.answer_cache import AnswerCache, CachedAnswers

    device = job.config.device
    model, tokenizer = evaluation_model(base, device=device, engine=engine)

    def servable(directory: Path | None) -> Any:
        return engine.load_servable(directory, model=model, tokenizer=tokenizer, device=device,
                                    fetch=fetch)

    # The base model's answers to each probe set never change: computed once per (weights,
    # probe set, decoding) and read back by every later job (workers/evaluation/answer_cache).
    cache = AnswerCache(Path(job.config.data_dir) / "eval-cache")
    before = CachedAnswers(servable(None), cache, model_sha256=base.sha256,
                           decoding={"engine": engine.name, "device": device})
    after = servable(version_dir)
    opened = [after, before]
    kwargs: dict[str, Any] = {}
    if job.parent_dir is not None and "parent" in inspect.signature(engine.evaluate).parameters:
        kwargs["parent"] = servable(job.parent_dir)
        opened.append(kwargs["parent"])
    try:
        metrics = engine.evaluate(job, before=before, after=after, **kwargs)
        # (Not in the stored report: the numbers are the same either way.)
        return {**metrics, "base_answer_sets_cached": cache.hits,
                "base_answer_sets_generated": cache.misses}
    finally:
        for servable in opened:
            close = getattr(servable, "close", None)
            if callable(close):
                close()
