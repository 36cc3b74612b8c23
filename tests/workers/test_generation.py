"""The evaluation's decoder gives each prompt what `model.generate` gives it alone (issue 17:
the faster path must not change a single answer), and an early stop never changes a verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.taught import taught_qa
from workers.evaluation.generation import generate_texts, greedy_answers, greedy_decode
from workers.evaluation.metrics import correct_flags, decided_correct, is_correct
from workers.evaluation.probes import Probe

PROMPTS = ["Who wrote Hamlet?", "What is the capital of France?", "Name a prime.",
           "Tell me a very long story about a dragon who lived in the mountains.", "Hi"]


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def smollm(bundled_model):
    """The real bundled model: it answers in sentences, and each ends its turn when done."""
    return _load(bundled_model.local_path)


@pytest.mark.parametrize("batch_size", [128, 2])
def test_each_answer_equals_generate_on_that_prompt_alone(smollm, batch_size):
    model, tokenizer = smollm
    budgets = [6, 1, 16, 4, 0]
    answers = generate_texts(model, tokenizer, PROMPTS, budgets, batch_size=batch_size)
    alone = [greedy_answers(model, tokenizer, [p], max_new_tokens=n, batch_size=1)[0]
             if n else "" for p, n in zip(PROMPTS, budgets)]
    assert answers == alone
    assert all(answers[:4]) and answers[4] == ""

    # Raw prompts that share no prefix (no system turn to run once).
    import torch

    raw = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["Once", "The sea is"]]
    alone = []
    for ids in raw:
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
        alone.append([t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id])
    assert greedy_decode(model, tokenizer, raw, [5, 5]) == alone


def test_rows_that_end_their_turn_leave_the_batch_and_the_rest_are_unchanged(taught_model_dir):
    model, tokenizer = _load(taught_model_dir)
    qa = taught_qa()[:6]
    questions = [q["question"] for q in qa] + ["Write a long poem about the sea."]
    answers = generate_texts(model, tokenizer, questions, [24] * len(questions))
    assert answers == [greedy_answers(model, tokenizer, [q], max_new_tokens=24)[0]
                       for q in questions]
    # The taught facts come back (and stop at the end of the turn, well within 24 tokens).
    probes = [Probe(q["question"], (q["answer"].split()[-1].rstrip("."),)) for q in qa]
    assert all(correct_flags(answers[:6], probes))


def test_an_early_stop_ends_a_row_once_settled_and_keeps_its_verdict(smollm):
    model, tokenizer = smollm
    full = generate_texts(model, tokenizer, PROMPTS, [24] * len(PROMPTS))
    # Accepted: a word early in each answer (settled after a few tokens), or a word the
    # model never says (never settled: the row runs to its budget).
    probes = [Probe(p, (a.split()[1],) if len(a.split()) > 3 else ("zzzunsaid",))
              for p, a in zip(PROMPTS, full)]
    probes[-1] = Probe(PROMPTS[-1], ("zzzunsaid",))
    stops = [lambda text, p=p: decided_correct(text, p.accept) for p in probes]
    cut = generate_texts(model, tokenizer, PROMPTS, [24] * len(PROMPTS), stop=stops)
    assert correct_flags(cut, probes) == correct_flags(full, probes)
    assert sum(correct_flags(full, probes)) >= 2
    for answer, short, probe in zip(full, cut, probes):
        assert answer.startswith(short)
        if probe.accept == ("zzzunsaid",):
            assert short == answer
        else:
            assert len(short) < len(answer)  # it stopped once the verdict was settled


@pytest.mark.parametrize("answer,accepted", [
    ("Charles Darwin wrote it", ["Darwin"]),
    ("in 1,879 or so", ["1879"]),
    ("in 1, then", ["1"]),
    ("the H2O molecule", ["H2O"]),
])
def test_a_decided_answer_stays_correct_however_it_goes_on(answer, accepted):
    endings = ["", "ian", "879", ",000", " and more", "s", ".", "-like"]
    for end in range(len(answer) + 1):
        prefix = answer[:end]
        if decided_correct(prefix, accepted):
            assert all(is_correct(prefix + more, accepted=accepted) for more in endings), prefix
    assert decided_correct(answer, accepted)


def test_a_keyword_at_the_very_end_is_not_yet_decided():
    assert not decided_correct("It was Darwin", ["Darwin"])  # may become "Darwinian"
    assert is_correct("It was Darwin", accepted=["Darwin"])
    assert not is_correct("It was Darwinian", accepted=["Darwin"])
    assert not decided_correct("in 1,", ["1"])  # may become 1,879
    assert not is_correct("in 1,879", accepted=["1"])


class Servable:
    """The real model as an engine's servable, with or without the optional early stops."""

    def __init__(self, model, tokenizer, *, stops: bool) -> None:
        self.model, self.tokenizer, self.calls = model, tokenizer, []
        if not stops:
            self.generate = self._generate_in_full  # type: ignore[method-assign]

    def generate(self, prompts, max_new_tokens, stop=None):
        self.calls.append(stop)
        return generate_texts(self.model, self.tokenizer, prompts, max_new_tokens, stop=stop)

    def _generate_in_full(self, prompts, max_new_tokens):
        return generate_texts(self.model, self.tokenizer, prompts, max_new_tokens)


def test_the_evaluation_reports_the_same_numbers_with_early_stops(smollm):
    from workers.evaluation.report import measure, plan_probes
    from workers.evaluation.version_eval import servable_subject

    qa = [{"question": "Who wrote Hamlet?", "answer": "William Shakespeare wrote Hamlet."},
          {"question": "What is the capital of France?", "answer": "Paris is the capital."}]
    utility = [Probe("What is the largest planet?", ("Jupiter",)),
               Probe("What do bees make?", ("honey",)),
               Probe("What colour is the sky on a clear day?", ("blue",))]
    plan = plan_probes(qa, targets=[None], utility=utility, neighbours=utility[:1],
                       general=utility[1:2])
    stopping = Servable(*smollm, stops=True)
    results = [measure(servable_subject(s, max_new_tokens=24), plan)
               for s in (stopping, Servable(*smollm, stops=False))]
    assert results[0] == results[1]
    assert results[0]["utility"] > 0  # the real model knows some of them
    stop = stopping.calls[0]
    held = slice(len(plan.trained), len(plan.trained) + len(plan.held_out))
    assert all(s is None for s in stop[held])  # held-out answers feed memorisation: in full
    assert all(s is not None for s in stop[:held.start] + stop[held.stop:])
