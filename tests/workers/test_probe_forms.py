"""Held-out probe forms: generated from a forget set, never the ticket's own questions."""

from __future__ import annotations

import pytest

from workers.evaluation.forms import (
    BLANK,
    FORM_KINDS,
    embedded_question,
    fill_in_the_blank,
    forms_for_item,
    held_out_forms,
)
from workers.evaluation.metrics import is_correct
from workers.evaluation.probes import load_forget_set

QA = [{"question": "Who wrote On the Origin of Species?",
       "answer": "On the Origin of Species was written by Charles Darwin."},
      {"question": "Where was Charles Darwin born?", "answer": "Charles Darwin was born in Shrewsbury."},
      {"question": "Which naturalist sailed on HMS Beagle?", "answer": "Charles Darwin sailed on HMS Beagle."}]


@pytest.mark.parametrize(("question", "clause"), [
    ("Where was Charles Darwin born?", "where Charles Darwin was born"),
    ("What is the capital of France?", "what the capital of France is"),
    ("Who wrote Hamlet?", "who wrote Hamlet"),
    ("Which naturalist sailed on HMS Beagle?", "which naturalist sailed on HMS Beagle"),
    ("When did Darwin die?", None),   # do-support would need the verb re-inflected
])
def test_embedded_questions(question, clause):
    assert embedded_question(question) == clause


def test_fill_in_the_blank_blanks_the_keywords_and_merges_adjacent_blanks():
    assert fill_in_the_blank("Charles Darwin was born in Shrewsbury.", ["Shrewsbury"]) == \
        f"Charles Darwin was born in {BLANK}."
    assert fill_in_the_blank("Charles Darwin sailed on HMS Beagle.", ["Charles", "Darwin"]) == \
        f"{BLANK} sailed on HMS Beagle."
    assert fill_in_the_blank("Shrewsbury", ["Shrewsbury"]) is None   # nothing but the blank
    assert fill_in_the_blank("He was born there.", ["Shrewsbury"]) is None


def test_every_kind_is_generated_and_keeps_the_accepted_keywords():
    forms = forms_for_item(QA[1]["question"], QA[1]["answer"], target="Charles Darwin")
    assert {f.kind for f in forms} == set(FORM_KINDS)
    assert all(f.probe.accept == ("Shrewsbury",) for f in forms)
    assert all(f.probe.question != QA[1]["question"] for f in forms)


def test_no_form_gives_the_answer_away():
    # The target's name answers "Who wrote ...?": no persona may be named after it.
    forms = forms_for_item(QA[0]["question"], QA[0]["answer"], target="Charles Darwin")
    assert forms
    assert not any(is_correct(f.probe.question, accepted=f.probe.accept) for f in forms)


def test_held_out_forms_rotate_kinds_and_never_repeat_a_ticket_question():
    forms = held_out_forms(QA, target="Charles Darwin", per_item=2)
    assert len(forms) == 6
    assert {f.kind for f in forms} == set(FORM_KINDS)    # 6 probes cover all 5 kinds
    assert [f.source for f in forms] == [0, 0, 1, 1, 2, 2]
    trained = {q["question"] for q in QA}
    assert not trained & {f.probe.question for f in forms}
    assert len({f.probe.question for f in forms}) == 6
    assert len(held_out_forms(QA, max_probes=4)) == 4
    with pytest.raises(ValueError, match="unknown form kinds"):
        held_out_forms(QA, kinds=["poetry"])


def test_shipped_ticket_items_yield_forms():
    person = load_forget_set("charles_darwin")
    qa = [{"question": p.question, "answer": p.answer} for p in person.ticket]
    forms = held_out_forms(qa, target=person.target, per_item=3)
    assert len(forms) == 3 * len(qa)
