"""The O3 engine on the tiny model through Ray Train + DeepSpeed: two requests, one lineage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from storage.errors import InvalidRequest
from workers.engines.base import EngineRequest, JobInput, WorkerConfig

TINY = {"max_steps": 4, "eval_every": 0, "lr": 1e-2, "forget_batch_size": 4,
        "detector": {"epochs": 10, "views": 2, "proj_dim": 8}}


def _request(name: str, options: dict | None = None) -> EngineRequest:
    qa = [{"question": f"Where does {name} {i} live?", "answer": f"{name} {i} lives in Q{i}."}
          for i in range(4)]
    return EngineRequest(kind="forget", engine="o3", target=name, forget_qa=qa,
                         options={**TINY, **(options or {})})


def _job(tiny_model_dir: Path, out: Path, request: EngineRequest, ticket: str,
         parent: Path | None) -> JobInput:
    from workers.model.base_model import _weights_sha256

    return JobInput(job_id=ticket, lineage="default", requests=[request], ticket_ids=[ticket],
                    base_model_path=tiny_model_dir, base_model_sha256=_weights_sha256(tiny_model_dir),
                    parent_dir=parent, output_dir=out,
                    config=WorkerConfig(data_dir=out.parent / "data", num_workers=2, zero_stage=2))


def test_validate_refuses_what_o3_cannot_do() -> None:
    from workers.engines import get_engine

    engine = get_engine("o3")
    engine.validate(_request("Zorblat"))
    with pytest.raises(InvalidRequest, match="unknown o3 option"):
        engine.validate(_request("Zorblat", {"lamda": 1}))
    with pytest.raises(InvalidRequest, match="needs forget"):
        engine.validate(EngineRequest(kind="forget", engine="o3"))
    with pytest.raises(InvalidRequest, match="cannot serve"):
        engine.validate(EngineRequest(kind="delete_records", engine="o3", record_ids=["r"]))


def test_two_requests_stack_with_detectors_and_orthogonality(ray_cluster, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    from workers.engines import get_engine
    from workers.engines.o3.engine import read_blocks
    from workers.engines.o3.orthogonality import block_overlap
    from workers.engines.o3.serving import O3Servable
    from tests.fixtures.training import load_tiny
    from workers.training.lora_stack import read_adapter, stack_ranks

    engine = get_engine("o3")
    updates: list[dict] = []
    v1 = engine.train(_job(tiny_model_dir, tmp_path / "v1", _request("Zorblat"), "t1", None),
                      updates.append)
    assert stack_ranks(v1.version_dir) == [8]
    assert v1.metrics["steps"] == 4
    assert 0.0 <= v1.metrics["detector_auroc_unrelated"] <= 1.0
    assert "detector_auroc_neighbours" in v1.metrics
    assert any(u.get("phase") == "detector" for u in updates)

    # Request 2 with a strong orthogonality weight, so the term visibly does its work.
    v2 = engine.train(_job(tiny_model_dir, tmp_path / "v2",
                           _request("Quimby", {"lambda_orth": 50.0}), "t2", v1.version_dir),
                      lambda u: None)
    out = v2.version_dir
    blocks = read_blocks(out)
    assert [b.ticket_id for b in blocks] == ["t1", "t2"] and stack_ranks(out) == [8, 8]
    assert all((out / b.detector / "detector.safetensors").is_file() for b in blocks)
    assert (out / blocks[0].detector / "detector.safetensors").read_bytes() == \
        (v1.version_dir / blocks[0].detector / "detector.safetensors").read_bytes()
    # Each subject probe weighs its target against well-known people and the lineage's
    # earlier targets, and keeps that list: a version's gates never change after the fact.
    from workers.engines.o3.subject_probe import SubjectProbe

    first, second = (SubjectProbe.load(out / b.detector) for b in blocks)
    assert "Zorblat" in second.rivals and "Zorblat" not in first.rivals
    assert "Albert Einstein" in first.rivals and "Quimby" not in second.rivals
    # The stack is exact: block 1's rows are v1's A; block 1's columns are v1's scaled B.
    cfg1, w1 = read_adapter(v1.version_dir)
    cfg2, w2 = read_adapter(out)
    scale1 = cfg1["lora_alpha"] / cfg1["r"]
    for key, a in w1.items():
        if ".lora_A." in key:
            assert torch.equal(w2[key][:8], a)
        else:
            assert torch.allclose(w2[key][:, :8], a * scale1)
    # The orthogonality term fell during training and the blocks barely overlap.
    terms = v2.metrics["blocks"][0]["orthogonal_terms"]
    assert terms and terms[-1] < terms[0]
    a_stack = {k: v for k, v in w2.items() if ".lora_A." in k}
    overlap = block_overlap(a_stack, [8, 8], 0, 1)
    assert overlap == pytest.approx(v2.metrics["orthogonality_max_overlap"], abs=1e-5)
    # Two independent random blocks overlap by about 1/sqrt(d_in) (0.09-0.125 here).
    assert overlap < 0.06

    # The version serves: the detectors give one weight per block and sample.
    model, tokenizer = load_tiny(tiny_model_dir)
    servable = engine.load_servable(out, model=model, tokenizer=tokenizer, device="cpu")
    assert isinstance(servable, O3Servable)
    answers = servable.generate(["Where does Zorblat 1 live?", "What is 2 + 2?"], [6, 6])
    assert len(answers) == 2 and servable.last_weights.shape == (2, 2)


def test_texts_become_prompts_whose_continuation_is_refused(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    from workers.engines import get_engine
    from workers.engines.o3.config import make_config
    from workers.engines.o3.engine import forget_prompts, text_to_prompt

    text = "The secret recipe of Quimby cake uses three eggs, rye flour and a pinch of salt."
    assert text_to_prompt(text, 5) == ("The secret recipe of Quimby",
                                       "cake uses three eggs, rye flour and a pinch of salt.")
    request = EngineRequest(kind="forget", engine="o3", target="Quimby cake",
                            forget_texts=[text])
    engine = get_engine("o3")
    cfg = make_config({"text_prompt_words": 5})
    spec = engine._spec(_job(tiny_model_dir, tmp_path / "v", request, "t", None), request,
                        cfg, None, tmp_path / "v")
    assert spec.forget_texts == [] and spec.forget_qa[0]["question"] == "The secret recipe of Quimby"
    assert spec.forget_recipe().method == "idk" and spec.forget_recipe().retain_loss == "none"
    # The detector learns both the opening (what a user would type) and the whole text.
    assert forget_prompts(request, cfg) == ["The secret recipe of Quimby", text]
    npo = engine._spec(_job(tiny_model_dir, tmp_path / "v", request, "t", None), request,
                       make_config({"objective": "npo"}), None, tmp_path / "v")
    assert npo.forget_texts == [text] and npo.forget_recipe().method == "npo"


def test_without_retain_data_the_block_keeps_the_base_answers_about_other_people(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """people_retain: a ticket with no retain data trains with a KL term on the base
    model's own answers to the shipped questions about other people, none of them about
    the target; a ticket's own retain data replaces them (NLL); off (the default), no term."""
    from workers.engines import get_engine
    from workers.engines.o3.config import make_config
    from workers.engines.o3.engine import neighbour_questions

    engine = get_engine("o3")

    def spec(request: EngineRequest, options: dict | None = None):
        job = _job(tiny_model_dir, tmp_path / "v", request, "t", None)
        return engine._spec(job, request, make_config(options), None, tmp_path / "v")

    turing = _request("Alan Turing")
    people = spec(turing, {"people_retain": True})
    assert people.forget_recipe().retain_loss == "kl"
    assert people.method_config()[1].retain_weight == 1.0
    hard, held = neighbour_questions("Alan Turing")
    assert sorted(people.retain_prompts) == sorted(hard + held)
    assert len(people.retain_prompts) >= 30
    everyone = neighbour_questions(None)
    assert [q for q in sum(everyone, []) if q not in people.retain_prompts] == [
        "Which British mathematician helped break the Enigma code?"]  # his own left out

    own = spec(replace(turing, retain_qa=[{"question": "Who wrote Hamlet?",
                                           "answer": "William Shakespeare."}]),
               {"people_retain": True})
    assert own.forget_recipe().retain_loss == "nll" and own.retain_prompts is None
    off = spec(turing)
    assert off.forget_recipe().retain_loss == "none" and off.retain_prompts is None


def test_the_shipped_people_are_none_of_the_benchmark_or_evaluation_neighbours() -> None:
    """O3 calibrates its gate on, and trains its block to keep, the shipped questions
    about other people; were any of them about a person whose questions measure
    neighbour knowledge (the continual benchmark's targets and neighbours, the
    evaluation's neighbour probes), those numbers would be flattered."""
    import json
    import re
    from importlib import resources

    repo = Path(__file__).resolve().parents[3]
    bench = json.loads((repo / "benchmarks/data/continual_probes.json").read_text())["people"]
    evaluation = json.loads(resources.files("workers.evaluation").joinpath(
        "probesets/neighbours.json").read_text())["probes"]
    measured = ({a.lower() for p in bench for n in p.get("neighbours", []) for a in n["accept"]}
                | {p["target"].split()[-1].lower() for p in bench}
                | {a.lower() for n in evaluation for a in n["accept"]})
    shipped = json.loads(resources.files("workers.engines.o3").joinpath(
        "data/people_questions.json").read_text())["questions"]
    assert len(shipped) >= 60
    for item in shipped:
        words = " ".join(re.findall(r"\w+", f"{item['about']} {item['question']}".lower()))
        assert not [m for m in measured if re.search(rf"\b{re.escape(m)}\b", words)], item


def test_options_over_the_job_recipe_over_o3_defaults() -> None:
    from workers.engines.o3.config import O3_DEFAULT_RECIPE, O3Config, make_config
    from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE

    # O3's own defaults, where it trains differently from the LoRA methods on purpose.
    cfg = make_config(None)
    assert cfg.recipe == O3_DEFAULT_RECIPE and cfg.recipe.max_steps == 30
    assert cfg.recipe.lr == 1e-3 != DEFAULT_FORGET_RECIPE.lr
    assert cfg.recipe.retain_prompts == DEFAULT_FORGET_RECIPE.retain_prompts
    # The job's recipe wins over them; the ticket's options over the recipe.
    job_recipe = {"max_steps": 20, "min_steps": 10, "retain_prompts": 24, "lr": 5e-4,
                  "lora_r": 4, "method": "npo", "retain_loss": "kl"}
    cfg = make_config({"lambda_orth": 0.5}, job_recipe)
    assert (cfg.recipe.max_steps, cfg.recipe.min_steps, cfg.recipe.retain_prompts,
            cfg.recipe.lr, cfg.recipe.lora_r) == (20, 10, 24, 5e-4, 4)
    # ... except what O3 decides itself: its objective is the method, no retain term.
    assert cfg.recipe.method == "idk" and cfg.recipe.retain_loss == "none"
    cfg = make_config({"max_steps": 7, "lr": 1e-2, "objective": "npo"}, job_recipe)
    assert (cfg.recipe.max_steps, cfg.recipe.lr, cfg.recipe.min_steps) == (7, 1e-2, 10)
    assert cfg.recipe.method == "npo" and cfg.lambda_orth == 0.1
    # A stored block config reads back as the same config.
    assert O3Config(**cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="o3 sets method itself"):
        make_config({"method": "ga"})
    with pytest.raises(ValueError, match=r"unknown o3 option\(s\): lamda; known: .*max_steps"):
        make_config({"lamda": 1})
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        make_config({"max_steps": 0})


def test_a_bad_job_recipe_fails_the_o3_job_as_invalid(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    from workers.engines import get_engine

    job = replace(_job(tiny_model_dir, tmp_path / "v", _request("Zorblat"), "t", None),
                  config=WorkerConfig(data_dir=tmp_path / "data", recipe={"max_stepz": 3}))
    with pytest.raises(InvalidRequest, match="cannot train this o3 job: unknown recipe"):
        get_engine("o3").train(job, lambda u: None)


def test_an_o3_job_trains_the_job_recipe_steps_unless_the_ticket_says_otherwise(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two requests in one job under a recipe of 3 steps: the first trains exactly 3, the
    second's ticket asks for 2 and trains exactly 2 (plain trainer, tiny model)."""
    from workers.engines import get_engine
    from workers.model.base_model import _weights_sha256

    detector = {"detector": {"epochs": 5, "views": 2, "proj_dim": 8}}
    first = replace(_request("Zorblat"), options=detector)  # no max_steps of its own
    second = replace(_request("Quimby"), options={**detector, "max_steps": 2})
    recipe = {"max_steps": 3, "min_steps": 3, "eval_every": 0, "lr": 1e-2,
              "retain_prompts": 4}
    job = JobInput(job_id="j", lineage="default", requests=[first, second],
                   ticket_ids=["t1", "t2"], base_model_path=tiny_model_dir,
                   base_model_sha256=_weights_sha256(tiny_model_dir), parent_dir=None,
                   output_dir=tmp_path / "v",
                   config=WorkerConfig(data_dir=tmp_path / "data", trainer="plain",
                                       recipe=recipe))
    progress: list[dict] = []
    artifacts = get_engine("o3").train(job, progress.append)
    assert [b["steps"] for b in artifacts.metrics["blocks"]] == [3, 2]
    assert [p["step"] for p in progress if "loss" in p] == [1, 2, 3, 1, 2]
    configs = artifacts.method_config["configs"]
    assert [c["recipe"]["max_steps"] for c in configs] == [3, 2]
    assert all(c["recipe"]["lr"] == 1e-2 for c in configs)


def test_a_one_question_ticket_then_a_text_without_target(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """The shapes of the README's tour: one QA pair (the subject probe gates it), then a
    text with no target (nothing to name: its contrastive detector gates it)."""
    from workers.engines import get_engine
    from workers.engines.o3.engine import read_blocks
    from workers.engines.o3.serving import O3Servable
    from workers.engines.o3.subject_probe import SubjectProbe
    from tests.fixtures.training import load_tiny

    engine = get_engine("o3")
    one = EngineRequest(kind="forget", engine="o3", target="Zorblat", options=TINY,
                        forget_qa=[{"question": "Where does Zorblat live?",
                                    "answer": "Zorblat lives in Quimby."}])
    text = EngineRequest(kind="forget", engine="o3", options=TINY, forget_texts=[
        "It was the best of times, it was the worst of times, it was the age of wisdom."])
    plain = lambda job: replace(job, config=replace(job.config, trainer="plain"))  # noqa: E731
    engine.validate(one)
    engine.validate(text)
    v1 = engine.train(plain(_job(tiny_model_dir, tmp_path / "v1", one, "t1", None)),
                      lambda u: None)
    v2 = engine.train(plain(_job(tiny_model_dir, tmp_path / "v2", text, "t2", v1.version_dir)),
                      lambda u: None)
    blocks = read_blocks(v2.version_dir)
    assert [b.ticket_id for b in blocks] == ["t1", "t2"]
    probes = [SubjectProbe.load(v2.version_dir / b.detector) for b in blocks]
    assert probes[0] is not None and probes[0].subject == "Zorblat" and probes[1] is None
    model, tokenizer = load_tiny(tiny_model_dir)
    servable = O3Servable.load(v2.version_dir, model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["Where does Zorblat live?", "It was the best of times, it was"]
    answers = servable.generate(prompts, [6, 6])
    servable.close()
    assert len(answers) == 2 and servable.last_weights.shape == (2, 2)
