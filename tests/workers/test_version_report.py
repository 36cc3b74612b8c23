"""The version report: held-out forms, comparisons with base and parent, MIA, fluency."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from workers.evaluation.probes import (
    Probe,
    available_forget_sets,
    load_general_benchmark,
    load_neighbour_probes,
    load_unrelated_probes,
)
from workers.evaluation.report import REPORT_FILE, ReportConfig, Subject, plan_probes
from workers.evaluation.scoring import TokenStats
from workers.evaluation.version_eval import evaluate_subjects

QA = [{"question": f"Where does Zorblat {i} live?", "answer": f"Zorblat {i} lives in Quimby{i}."}
      for i in range(4)]
NEIGHBOURS = [Probe("Who wrote Hamlet?", ("Shakespeare",)), Probe("Who is Zorblat 1?", ("x",))]
UTILITY = [Probe("Capital of France?", ("Paris",)), Probe("2+2?", ("4",))]
GENERAL = [Probe("Opposite of up?", ("down",))]


def _plan():
    return plan_probes(QA, ["one two three four five six seven eight"],
                       targets=["Zorblat Quimby"], neighbours=NEIGHBOURS, utility=UTILITY,
                       general=GENERAL, config=ReportConfig(held_out_per_item=2))


def knows_all(prompts: list[str]) -> list[str]:
    """Answers every probe right: the fact for forget probes, the keyword for the others."""
    out = []
    for p in prompts:
        hit = next((f"It is Quimby{i}." for i in range(4) if f"Zorblat {i}" in p or
                    f"Quimby{i}" in p), None)
        out.append(hit or {"Who wrote Hamlet?": "Shakespeare", "Capital of France?": "Paris",
                           "2+2?": "4", "Opposite of up?": "down"}.get(p, "five six seven eight"))
    return out


def forgot_zorblat(prompts: list[str]) -> list[str]:
    return ["I don't know." if "Zorblat" in p or "Quimby" in p or "____" in p
            or p.startswith("Continue this text") else a
            for p, a in zip(prompts, knows_all(prompts))]


def test_plan_uses_held_out_forms_and_drops_neighbours_about_the_target():
    plan = _plan()
    trained = {q["question"] for q in QA}
    assert len(plan.trained) == 4 and len(plan.held_out) == 8
    assert not trained & {f.probe.question for f in plan.held_out}
    assert [p.question for p in plan.neighbours] == ["Who wrote Hamlet?"]
    # members: the 4 pairs and the text; non-members: the pairs with rotated answers
    assert len(plan.members) == 5 and len(plan.nonmembers) == 4
    assert plan.nonmembers[0] == (QA[0]["question"], QA[1]["answer"])


def test_report_compares_with_base_and_parent_and_judges():
    plan = _plan()
    report = evaluate_subjects(plan, {"base": Subject(knows_all),
                                      "parent": Subject(knows_all),
                                      "after": Subject(forgot_zorblat)})
    assert report["compared_with"] == ["base", "parent"]
    assert report["models"]["base"]["forget_held_out"] == 1.0
    assert report["models"]["after"]["forget_held_out"] == 0.0
    assert report["relative_to_base"]["forget_ratio"] == 0.0
    assert report["relative_to_base"]["utility_ratio"] == 1.0
    assert report["relative_to_base"]["neighbour_ratio"] == 1.0
    assert report["relative_to_parent"]["forget_ratio"] == 0.0
    assert set(report["relative_to_base"]["held_out_by_kind"]) <= {
        "rephrase", "fill_blank", "prefix_injection", "role_play", "other_format"}
    assert report["verdict"] == "pass" and all(c["passed"] for c in report["checks"])
    assert report["models"]["after"]["verbatim_memorisation"] == 0.0
    assert report["models"]["base"]["verbatim_memorisation"] == 1.0
    summary = report["summary"]
    assert summary["forget_ratio"] == 0.0 and summary["forget_probes"] == 8
    assert summary["forget_ratio_vs_parent"] == 0.0 and summary["verdict"] == "pass"
    # Stored for the version's lifetime: no forget-set text, no prompt, no answer.
    dumped = json.dumps(report)
    assert "Quimby" not in dumped and "Zorblat" not in dumped


def test_forgetting_only_the_trained_questions_does_not_pass():
    trained = {q["question"] for q in QA}

    def parrot(prompts):   # forgot the exact ticket questions, nothing else
        return ["I don't know." if p in trained else a for p, a in zip(prompts, knows_all(prompts))]

    report = evaluate_subjects(_plan(), {"base": Subject(knows_all), "after": Subject(parrot)})
    assert report["relative_to_base"]["forget_trained_ratio"] == 0.0
    assert report["relative_to_base"]["forget_ratio"] == 1.0
    assert report["verdict"] == "hold"
    assert [c["passed"] for c in report["checks"]] == [False, True]


def test_utility_collapse_is_rejected():
    def refuse_all(prompts):
        return ["I don't know."] * len(prompts)

    report = evaluate_subjects(_plan(), {"base": Subject(knows_all), "after": Subject(refuse_all)})
    assert report["verdict"] == "reject"


def _scorer(member_logp: float, nonmember_logp: float):
    members = {(q["question"], q["answer"]) for q in QA}

    def score(pairs):
        return [TokenStats([member_logp if (p, t) in members else nonmember_logp, -1.0],
                           [-1.0, -1.0], [1.0, 1.0]) for p, t in pairs]
    return score


def test_membership_inference_and_priv_leak_relative_to_the_base():
    plan = _plan()
    report = evaluate_subjects(plan, {
        "base": Subject(knows_all, _scorer(-0.1, -3.0)),      # members stand out: AUC 1
        "after": Subject(forgot_zorblat, _scorer(-3.0, -3.0))})  # indistinguishable
    base_mia, after_mia = report["models"]["base"]["mia"], report["models"]["after"]["mia"]
    # the forget *text* (not a pair) scores as a non-member-like -3.0 under _scorer
    assert base_mia["loss_auc"] == pytest.approx((4 * 4 + 0.5 * 4) / 20)
    assert after_mia["min_k_auc"] == 0.5
    leak = report["relative_to_base"]["priv_leak"]
    assert leak["min_k"] == pytest.approx((0.5 - base_mia["min_k_auc"]) / base_mia["min_k_auc"])
    assert report["relative_to_base"]["priv_leak_reference"] == "base"


def test_fluency_uses_the_reference_scorer_on_the_answers():
    plan = _plan()
    seen = []

    def reference(pairs):
        seen.extend(pairs)
        return [TokenStats([math.log(0.5)] * 3, [0.0] * 3, [0.0] * 3) for _ in pairs]

    from workers.evaluation.report import measure
    m = measure(Subject(lambda ps: ["the the the the"] * len(ps)), plan, reference_score=reference)
    assert m["answer_perplexity"] == pytest.approx(2.0)
    assert m["repetition_rate"] == pytest.approx(2 / 3)
    assert len(seen) == len(plan.held_out)


def test_shipped_general_and_neighbour_sets_do_not_overlap_other_pools():
    general = {p.question.casefold() for p in load_general_benchmark()}
    neighbours = {p.question.casefold() for p in load_neighbour_probes()}
    unrelated = {p.question.casefold() for p in load_unrelated_probes()}
    assert len(general) >= 25 and len(neighbours) >= 10
    assert not general & unrelated and not neighbours & unrelated and not general & neighbours
    plan = plan_probes([{"question": "Who wrote On the Origin of Species?",
                         "answer": "Charles Darwin."}], targets=["Charles Darwin"],
                       config=ReportConfig(max_neighbours=100))
    assert plan.neighbours and not any("Darwin" in " ".join([p.question, *p.accept])
                                       for p in plan.neighbours)
    assert "charles_darwin" in available_forget_sets()


def test_evaluate_adapter_on_a_tiny_model_writes_the_report_into_the_version(
        tiny_model_dir: Path, tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.evaluation.relearning import RelearnConfig
    from workers.evaluation.version_eval import evaluate_adapter
    from workers.model import BaseModelRef, load_model_and_tokenizer

    ref = BaseModelRef(name="tiny", local_path=tiny_model_dir, sha256="")
    dirs = {}
    for name, seed in (("parent", 1), ("after", 2)):
        model, _tok = load_model_and_tokenizer(ref)
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        dirs[name] = tmp_path / name
        peft.save_pretrained(dirs[name])
    config = ReportConfig(max_held_out=4, max_neighbours=3, max_utility=3, max_general=3,
                          max_new_tokens=4)
    summary = evaluate_adapter(ref, device="cpu", qa=QA, texts=[], targets=["Zorblat"],
                               adapter_dir=dirs["after"], parent_dir=dirs["parent"],
                               config=config, relearn=RelearnConfig(steps=1))
    assert summary["compared_with"] == ["base", "parent"]
    assert summary["forget_probes"] == 4 and summary["verdict"] in ("pass", "hold", "reject")
    assert summary["mia_auc_before"] is not None and summary["answer_perplexity_after"] is not None
    assert "relearned_forget_ratio" in summary
    written = dirs["after"] / REPORT_FILE
    assert summary["report"]["path"] == REPORT_FILE
    import hashlib
    assert hashlib.sha256(written.read_bytes()).hexdigest() == summary["report"]["sha256"]
    report = json.loads(written.read_text())
    assert set(report["models"]) == {"base", "parent", "after"}
    assert report["relearning"]["steps"] == 1


def test_engines_share_one_evaluate_over_servables(tmp_path: Path):
    from workers.engines.base import EngineRequest, JobInput, WorkerConfig
    from workers.evaluation.version_eval import evaluate_forgetting

    class Answers:
        def __init__(self, fn):
            self.fn, self.asked = fn, []

        def generate(self, prompts, max_new_tokens):
            assert len(max_new_tokens) == len(prompts)
            self.asked.append(len(prompts))
            return self.fn(prompts)

    job = JobInput(job_id="j", lineage="default",
                   requests=[EngineRequest(kind="forget", engine="o3", target="Zorblat",
                                           forget_qa=QA)],
                   ticket_ids=["t"], base_model_path=tmp_path, base_model_sha256="",
                   parent_dir=None, output_dir=tmp_path, config=WorkerConfig(data_dir=tmp_path))
    base, parent, after = Answers(knows_all), Answers(knows_all), Answers(forgot_zorblat)
    metrics = evaluate_forgetting(job, before=parent, after=after, base=base)
    assert metrics["compared_with"] == ["base", "parent"] and metrics["verdict"] in (
        "pass", "hold", "reject")
    assert metrics["forget_ratio"] == 0.0 and metrics["forget_trained_ratio"] == 0.0
    assert (tmp_path / REPORT_FILE).exists() and metrics["report"]["path"] == REPORT_FILE
    assert base.asked and parent.asked and after.asked


def test_operators_override_the_report_and_typos_are_refused():
    from workers.evaluation.version_eval import configs_from

    config, relearn = configs_from({"max_utility": 5, "relearn_steps": 3})
    assert config.max_utility == 5 and relearn is not None and relearn.steps == 3
    assert configs_from({})[1] is None
    with pytest.raises(ValueError, match="unknown evaluation settings"):
        configs_from({"max_utilty": 5})
