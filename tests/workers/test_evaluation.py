"""Answer checking, ratios, the acceptance verdict, the recipe's stopping rule, probe sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.evaluation.metrics import answer_rate, correct_flags, is_correct
from workers.evaluation.probes import (
    Probe,
    available_forget_sets,
    load_forget_set,
    load_retain_prompts,
    load_unrelated_probes,
    parse_forget_set,
)
from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe

# --------------------------------------------------------------------------- answer matching


@pytest.mark.parametrize("answer", [
    "William Shakespeare was born in Stratford-upon-Avon.",
    "He was born in STRATFORD, England.",
    "stratford-upon-avon",
])
def test_keyword_match_is_case_insensitive_and_finds_aliases(answer):
    assert is_correct(answer, accepted=["Stratford", "Stratford-upon-Avon"])


def test_keyword_must_be_a_whole_word():
    # "7" must not be found inside "17", nor "Au" inside "August".
    assert not is_correct("There are 17 of them.", accepted=["7", "seven"])
    assert not is_correct("It was in August.", accepted=["Au"])
    assert is_correct("The symbol is Au.", accepted=["Au"])
    assert is_correct("Seven days.", accepted=["7", "seven"])


def test_wrong_or_refusing_answers_are_not_correct():
    assert not is_correct("I'm sorry, but I don't know the answer to that.",
                          accepted=["Shakespeare"])
    assert not is_correct("Hamlet was written by Christopher Marlowe.", accepted=["Shakespeare"])


def test_possessives_typographic_quotes_and_thousands_separators_still_match():
    assert is_correct("Einstein’s equation", accepted=["Einstein's"])
    assert is_correct("It is 1,879 metres high.", accepted=["1879"])
    assert is_correct("E = mc² relates mass and energy", accepted=["mc²"])


def test_correct_flags_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 answers for 1 probes"):
        correct_flags(["a", "b"], [Probe("q?", ("a",))])


def test_answer_rate_asks_every_question_once_in_order():
    probes = [Probe("Capital of France?", ("Paris",)), Probe("Capital of Japan?", ("Tokyo",)),
              Probe("2+2?", ("4", "four"))]
    asked: list[list[str]] = []

    def generate(questions: list[str]) -> list[str]:
        asked.append(list(questions))
        return ["Paris, of course.", "Kyoto.", "Four."]

    assert answer_rate(generate, probes) == pytest.approx(2 / 3)
    assert asked == [[p.question for p in probes]]
    assert answer_rate(generate, []) == 0.0


# --------------------------------------------------------------------------- ratios + verdict
# The one promotion decision (workers.evaluation.report.verdict), which the job runner acts on.


def test_ratios_are_after_over_before_and_undefined_when_the_base_knew_nothing():
    from workers.evaluation.report import ratios

    out = ratios({"forget_held_out": 0.1, "utility": 0.45, "neighbour": 0.3, "general": 0.0},
                 {"forget_held_out": 0.5, "utility": 0.5, "neighbour": 0.0, "general": 0.0})
    assert out["forget_ratio"] == pytest.approx(0.2)
    assert out["utility_ratio"] == pytest.approx(0.9)
    # A base that answered none: not "nothing lost" (1.0) or "all forgotten" (0.0).
    assert out["neighbour_ratio"] is None and out["general_ratio"] is None
    assert out["forget_trained_ratio"] is None  # not measured at all


@pytest.mark.parametrize(("forget", "utility", "expected"), [
    (0.2, 0.9, "pass"),      # exactly on both thresholds
    (0.0, 1.0, "pass"),
    (0.21, 1.0, "hold"),     # forgot too little
    (0.0, 0.89, "hold"),     # lost too much to go live unreviewed
    (1.0, 0.5, "hold"),      # on the rejection floor: still kept for an operator
    (0.0, 0.49, "reject"),   # below the floor: not kept, whatever it forgot
    (None, 0.49, "reject"),
    (None, 1.0, "hold"),     # forgetting undefined (no probes, or a base that knew none)
    (0.0, None, "hold"),     # utility undefined: never counted as kept
    (None, None, "hold"),
])
def test_verdict_passes_holds_and_rejects_by_the_thresholds(forget, utility, expected):
    from workers.evaluation.report import ReportConfig, verdict, verdict_and_reason

    assert verdict(forget, utility, ReportConfig()) == expected
    decided, reason = verdict_and_reason(forget, utility, ReportConfig())
    assert decided == expected and reason
    if utility is None:
        assert "utility cannot be judged" in reason
    # The thresholds are the configuration's, not constants.
    strict = ReportConfig(max_forget_ratio=0.1, min_utility_ratio=0.95,
                          reject_utility_ratio=0.6)
    if (forget, utility) == (0.2, 0.9):
        assert verdict(forget, utility, strict) == "hold"


def test_a_base_that_never_answered_cannot_make_a_version_pass():
    """The case the random-weight tiny model hit: base rate 0 everywhere, so every ratio
    used to read as perfect (forget 0.0, utility 1.0) and any adapter was auto-promoted."""
    from workers.evaluation.report import ReportConfig, ratios, verdict

    zero = {"forget_held_out": 0.0, "forget_trained": 0.0, "utility": 0.0}
    vs_base = ratios(zero, zero)
    assert verdict(vs_base["forget_ratio"], vs_base["utility_ratio"], ReportConfig()) == "hold"


# --------------------------------------------------------------------------- recipe


def test_default_recipe_is_valid_and_stops_only_when_the_ticket_is_forgotten():
    r = DEFAULT_FORGET_RECIPE.with_(stop_patience=1)
    assert not r.should_stop(step=r.min_steps, ticket_rates=[0.5], base_ticket_rate=0.5)
    assert r.should_stop(step=r.min_steps, ticket_rates=[0.5, 0.0], base_ticket_rate=0.5)
    # Never before min_steps, and never on a ticket the base model did not know.
    assert not r.should_stop(step=r.min_steps - 1, ticket_rates=[0.0], base_ticket_rate=0.5)
    assert not r.should_stop(step=r.min_steps, ticket_rates=[0.0], base_ticket_rate=0.0)


def test_stop_patience_needs_consecutive_forgotten_checks():
    r = DEFAULT_FORGET_RECIPE.with_(stop_patience=2, min_steps=10)
    base = 0.5
    assert not r.should_stop(step=10, ticket_rates=[0.0], base_ticket_rate=base)
    assert not r.should_stop(step=15, ticket_rates=[0.0, 0.4], base_ticket_rate=base)
    assert not r.should_stop(step=20, ticket_rates=[0.0, 0.4, 0.05], base_ticket_rate=base)
    assert r.should_stop(step=25, ticket_rates=[0.0, 0.4, 0.05, 0.1], base_ticket_rate=base)


@pytest.mark.parametrize("changes", [
    {"method": "dpo"}, {"retain_loss": "l2"}, {"lr": 0.0}, {"max_steps": 0},
    {"stop_forget_ratio": 1.5}, {"target_modules": ()}, {"method": "graddiff", "retain_loss": "none"},
])
def test_recipe_refuses_bad_values(changes):
    with pytest.raises(ValueError):
        DEFAULT_FORGET_RECIPE.with_(**changes)


def test_recipe_copies_are_independent():
    other = DEFAULT_FORGET_RECIPE.with_(lr=1e-5)
    assert other.lr == 1e-5 and DEFAULT_FORGET_RECIPE.lr != 1e-5
    assert isinstance(other, ForgetRecipe)


# --------------------------------------------------------------------------- probe sets


def _questions(probes) -> set[str]:
    return {p.question.casefold() for p in probes}


def test_shipped_forget_sets_load_with_enough_probes():
    names = available_forget_sets()
    assert len(names) >= 2
    for name in names:
        s = load_forget_set(name)
        assert s.name == name and s.target
        assert len(s.ticket) >= 10 and len(s.held_out) >= 8
        assert all(p.answer for p in s.ticket)


def test_probe_pools_never_overlap():
    unrelated = _questions(load_unrelated_probes())
    retain = {q.casefold() for q in load_retain_prompts()}
    assert len(unrelated) >= 25
    assert not unrelated & retain
    seen_forget: set[str] = set()
    for name in available_forget_sets():
        s = load_forget_set(name)
        ticket, held_out = _questions(s.ticket), _questions(s.held_out)
        assert not ticket & held_out, name
        for pool in (ticket, held_out):
            assert not pool & unrelated and not pool & retain, name
            assert not pool & seen_forget, name
            seen_forget |= pool


def test_unrelated_and_retain_pools_do_not_name_any_target():
    targets = [load_forget_set(n).target for n in available_forget_sets()]
    surnames = [t.split()[-1].lower() for t in targets]
    texts = [p.question for p in load_unrelated_probes()] + list(load_retain_prompts())
    texts += [a for p in load_unrelated_probes() for a in p.accept]
    for text in texts:
        assert not any(s in text.lower() for s in surnames), text


def _valid_set() -> dict:
    return {"name": "x", "target": "X Y",
            "ticket": [{"question": "Who is X?", "answer": "X is X.", "accept": ["X"]}],
            "held_out": [{"question": "Name X.", "accept": ["X"]}]}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("target"), "'target'"),
    (lambda d: d["ticket"][0].pop("answer"), "need a non-empty 'answer'"),
    (lambda d: d["held_out"][0].update(accept=[]), "'accept' must be"),
    (lambda d: d["held_out"][0].update(accept=[""]), "'accept' must be"),
    (lambda d: d.update(held_out=[]), "non-empty list"),
    (lambda d: d["held_out"][0].update(question="who is x?"), "asked twice"),
])
def test_parse_forget_set_rejects_malformed_sets(mutate, message):
    raw = _valid_set()
    mutate(raw)
    with pytest.raises(ValueError, match=message):
        parse_forget_set(raw)


def test_loaders_read_a_custom_directory(tmp_path: Path):
    (tmp_path / "x.json").write_text(json.dumps(_valid_set()))
    (tmp_path / "unrelated.json").write_text(json.dumps(
        {"probes": [{"question": "2+2?", "accept": ["4"]}]}))
    assert available_forget_sets(directory=tmp_path) == ["x"]
    s = load_forget_set("x", directory=tmp_path)
    assert s.ticket[0].answer == "X is X." and s.held_out[0].accept == ("X",)
    assert load_unrelated_probes(directory=tmp_path)[0].question == "2+2?"
    with pytest.raises(ValueError, match="unknown forget probe set 'nope'"):
        load_forget_set("nope", directory=tmp_path)


def test_only_checks_that_can_take_part_in_a_stop_are_run():
    r = DEFAULT_FORGET_RECIPE.with_(max_steps=45, min_steps=30, eval_every=5, stop_patience=1)
    assert r.first_useful_check() == 30
    assert r.with_(stop_patience=2).first_useful_check() == 25  # 25 and 30 decide a stop at 30
    assert r.with_(min_steps=32).first_useful_check() == 35
    assert r.with_(min_steps=45).first_useful_check() is None  # no check before max_steps
    assert r.with_(max_steps=10, min_steps=10).first_useful_check() is None  # fixed steps
    assert r.with_(eval_every=0).first_useful_check() is None
    assert r.with_(min_steps=0, stop_patience=3).first_useful_check() == 5
