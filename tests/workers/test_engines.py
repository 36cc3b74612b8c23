"""The engine registry and the engine shape: one table of engines, validation at submission,
and every runnable engine trained, served and judged through the shape alone (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from storage.errors import InvalidRequest
from tests.fixtures.training import FORGET_QA, SMALL_RECIPE
from workers.engines import (
    DEFAULT_ENGINES,
    engine_kinds,
    get_engine,
    list_engines,
    request_from_payload,
    resolve_engine,
    runnable_engines,
)
from workers.engines.base import EngineRequest

TEXT = "Zorblat keeps a diary in a blue tin box under the stairs of the old mill."


def forget_request(engine: str, *, qa: list[dict[str, str]] | None = None,
                   texts: list[str] | None = None) -> EngineRequest:
    return request_from_payload(kind="forget", engine=engine, payload={
        "target": "Zorblat", "forget": {"qa": qa or [], "texts": texts or []}, "retain": None})


def test_the_registry_is_the_one_table_of_engines_kinds_and_defaults() -> None:
    assert {"idk", "npo", "ga", "graddiff", "o3", "s3t"} <= set(list_engines())
    kinds = engine_kinds()
    assert kinds["idk"] == kinds["npo"] == frozenset({"forget"})
    assert kinds["s3t"] == frozenset({"delete_records", "finetune"})
    assert resolve_engine("finetune", None) == "s3t" and "s3t" in runnable_engines()
    assert resolve_engine("forget", None) == DEFAULT_ENGINES["forget"] == "o3"
    assert resolve_engine("delete_records", None) == "s3t"
    # Planned engines accept tickets that wait; the dispatcher claims only runnable ones.
    assert {"idk", "npo", "ga", "graddiff"} <= set(runnable_engines())
    if getattr(get_engine("o3"), "runnable", True) is False:
        assert "o3" not in runnable_engines()
    with pytest.raises(InvalidRequest, match="unknown engine 'magic'"):
        resolve_engine("forget", "magic")
    with pytest.raises(InvalidRequest, match="cannot serve a 'delete_records'"):
        resolve_engine("delete_records", "idk")


def test_the_registry_refuses_a_duplicate_or_an_incomplete_engine() -> None:
    from workers.engines.registry import register_engine

    with pytest.raises(ValueError, match="already registered"):
        register_engine(get_engine("idk"))

    class NoEvaluate:
        name = "half_engine"
        ticket_kinds = frozenset({"forget"})

        def validate(self, request: Any) -> None: ...
        def train(self, job: Any, progress: Any) -> Any: ...
        def load_servable(self, *a: Any, **k: Any) -> Any: ...

    with pytest.raises(TypeError, match="evaluate"):
        register_engine(NoEvaluate)
    assert "half_engine" not in list_engines()


@pytest.mark.parametrize("engine", ["idk", "npo", "ga", "graddiff"])
def test_lora_engines_take_texts_and_questions_and_refuse_what_they_cannot_do(engine) -> None:
    lora = get_engine(engine)
    lora.validate(forget_request(engine, qa=FORGET_QA))
    lora.validate(forget_request(engine, texts=[TEXT]))
    with pytest.raises(InvalidRequest, match="forget set is empty"):
        lora.validate(forget_request(engine))
    with pytest.raises(InvalidRequest, match="cannot serve"):
        lora.validate(request_from_payload(kind="delete_records", engine=engine,
                                           payload={"dataset": "d", "record_ids": ["r"]}))
    with pytest.raises(InvalidRequest, match="unknown option"):
        lora.validate(EngineRequest(kind="forget", engine=engine, forget_qa=FORGET_QA,
                                    options={"bogus": 1}))


def test_idk_refuses_a_text_it_cannot_prompt_with_at_submission() -> None:
    with pytest.raises(InvalidRequest, match="no sentence or word"):
        get_engine("idk").validate(forget_request("idk", texts=["a b c"]))
    get_engine("npo").validate(forget_request("npo", texts=["a b c"]))  # ascent takes it


def test_validating_a_ticket_imports_no_torch_ray_or_transformers() -> None:
    # The API validates every submission with the engine: it must stay light.
    code = ("import sys\n"
            "from workers.engines import get_engine, request_from_payload\n"
            "for name in ('idk', 'npo', 'o3'):\n"
            "    get_engine(name).validate(request_from_payload(kind='forget', engine=name,\n"
            "        payload={'forget': {'texts': ['" + TEXT + "'], 'qa': []}}))\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'peft', 'deepspeed')\n"
            "             if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def runnable_forget_engines() -> list[str]:
    return [e for e in runnable_engines() if "forget" in engine_kinds()[e]]


@pytest.mark.parametrize("engine", runnable_forget_engines())
def test_every_forget_engine_trains_a_text_only_ticket_through_the_shape(
        engine: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the job runner does, with only Engine methods: train -> load_servable (before
    and after) -> evaluate, on a text-only ticket (issue 8: one was accepted, then failed
    at job time). Every runnable forget engine is here by construction."""
    from workers.config import WorkerConfig
    from workers.engines.base import JobInput
    from workers.model import load_model_and_tokenizer, resolve_base_model

    base = resolve_base_model(str(tiny_model_dir), tmp_path)
    config = WorkerConfig(data_dir=tmp_path / "data", trainer="plain",
                          recipe={**SMALL_RECIPE, "max_steps": 2})
    job = JobInput(job_id="j", lineage="default",
                   requests=[forget_request(engine, texts=[TEXT])],
                   ticket_ids=["t"], base_model_path=base.local_path,
                   base_model_sha256=base.sha256, parent_dir=None,
                   output_dir=tmp_path / "version", config=config)
    progress: list[dict[str, Any]] = []
    eng = get_engine(engine)
    artifacts = eng.train(job, progress.append)
    assert (artifacts.version_dir / "adapter_config.json").exists()
    # Every engine honours the job's recipe (here its max_steps).
    assert artifacts.peft_config["r"] == 8 and artifacts.metrics["steps"] == 2
    if engine in ("idk", "npo", "ga", "graddiff"):
        assert artifacts.method_config["recipe"]["method"] == engine
    assert [p["step"] for p in progress if "loss" in p] == [1, 2]

    model, tokenizer = load_model_and_tokenizer(base)
    before = eng.load_servable(None, model=model, tokenizer=tokenizer, device="cpu")
    plain = before.generate(["Where does Zorblat 0 live?"], [6])
    after = eng.load_servable(artifacts.version_dir, model=model, tokenizer=tokenizer,
                              device="cpu")
    # Per-prompt token budgets, and the base still answers as the base beside the version.
    answers = after.generate(["Where does Zorblat 0 live?", "Hello"], [6, 2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert before.generate(["Where does Zorblat 0 live?"], [6]) == plain

    metrics = eng.evaluate(job, before=before, after=after)
    assert metrics["verdict"] in ("pass", "hold", "reject")
    if "forget_trained_probes" in metrics:  # the shared forgetting evaluation
        # A text-only ticket is judged on its text's own continuation prompt.
        assert metrics["forget_trained_probes"] == 1 and metrics["utility_probes"] > 10
    json.dumps(metrics)  # stored as JSON with the version
    after.close()
