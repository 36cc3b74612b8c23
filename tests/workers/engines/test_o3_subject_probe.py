"""The subject probe: its scores are the model's own log-probabilities of the name, per
sample; its calibration gates the ticket's questions and not the generic prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engines.o3.subject_probe import (
    SUBJECT_QUESTION,
    SubjectProbe,
    fit_subject_probe,
    subject_scores,
)

PROMPTS = ["Where does Zorblat live?", "Tell me, with every date you know, where Zorblat "
           "lived before the mill burnt down.", "What is the capital of France?"]
NAMES = ["Zorblat Quimby", "Paris", "Ada"]  # several tokens, and perhaps one


def _token_logps(model, tokenizer, prompt: str, name_ids: list[int]) -> torch.Tensor:
    """log p of each of the reply's tokens, one full forward of the unpadded sequence."""
    from workers.model import format_chat

    ids = tokenizer(format_chat(tokenizer, prompt + SUBJECT_QUESTION),
                    add_special_tokens=False)["input_ids"]
    seq = torch.tensor([ids + list(name_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    return torch.stack([logp[len(ids) - 1 + k, t] for k, t in enumerate(name_ids)])


def _reference(model, tokenizer, prompt: str, name: str) -> float:
    """Mean log p of the name's tokens."""
    name_ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    return float(_token_logps(model, tokenizer, prompt, name_ids).mean())


def test_scores_are_the_name_s_log_probability_per_sample(tiny_model_dir: Path) -> None:
    from tests.fixtures.training import load_tiny

    model, tokenizer = load_tiny(tiny_model_dir)
    batched = subject_scores(model, tokenizer, PROMPTS, NAMES)
    assert batched.shape == (len(PROMPTS), len(NAMES))
    expected = torch.tensor([[_reference(model, tokenizer, p, n) for n in NAMES]
                             for p in PROMPTS])
    assert torch.allclose(batched, expected, atol=1e-4)
    # Batches of one give the same scores: a sample's weight never depends on its batch.
    alone = torch.cat([subject_scores(model, tokenizer, [p], NAMES) for p in PROMPTS])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_calibration_gates_the_ticket_and_round_trips(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    from tests.fixtures.training import load_tiny

    model, tokenizer = load_tiny(tiny_model_dir)
    generic = [f"Give me a tip number {i} for keeping plants alive." for i in range(20)]
    probe, summary = fit_subject_probe(model, tokenizer, subject="Zorblat",
                                       forget_prompts=PROMPTS[:2], generic_prompts=generic)
    assert probe.w_low < probe.w_high
    assert summary["generic_gated_share"] <= 0.05 + 1e-6  # the 0.95 quantile
    w = probe.weight_from_score(torch.tensor([probe.w_low - 1, probe.w_low,
                                              (probe.w_low + probe.w_high) / 2, probe.w_high]))
    assert torch.allclose(w, torch.tensor([0.0, 0.0, 0.5, 1.0]), atol=1e-2)
    probe.save(tmp_path)
    assert SubjectProbe.load(tmp_path) == probe
    assert SubjectProbe.load(tmp_path / "elsewhere") is None


def _prompt_cache(model, tokenizer) -> tuple[object, torch.Tensor]:
    """The cache of PROMPTS up to the end of the user's text and its mask, as serving's
    detection forward leaves it."""
    from workers.engines.o3.detector import encode_prompts, padded_positions, template_span

    enc = encode_prompts(tokenizer, PROMPTS, "cpu")
    end = enc["input_ids"].shape[1] - template_span(tokenizer).suffix
    attn = enc["attention_mask"][:, :end]
    with torch.no_grad():
        cache = model(input_ids=enc["input_ids"][:, :end], attention_mask=attn,
                      position_ids=padded_positions(attn), use_cache=True).past_key_values
    return cache, attn

def test_a_name_that_cannot_reach_its_floor_is_never_run(tiny_model_dir: Path) -> None:
    """Serving passes each name's w_low as its floor: a name whose first token already
    bounds its score at or below the floor gets that bound (weight 0 either way) and costs
    no forward of its own; names above their floor are scored exactly."""
    from tests.fixtures.training import load_tiny
    from workers.engines.o3.subject_probe import reply_tokens, scores_after_prompt

    model, tokenizer = load_tiny(tiny_model_dir)
    exact = subject_scores(model, tokenizer, PROMPTS, NAMES)
    cache, attn = _prompt_cache(model, tokenizer)
    tail, names = reply_tokens(tokenizer, NAMES)
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))

    def scores(floor: list[float]) -> torch.Tensor:
        forwards.clear()
        return scores_after_prompt(model, cache, attn, tail, names, floor=torch.tensor(floor))

    closed = scores([float("inf")] * len(NAMES))
    assert len(forwards) == 1                       # the tail only
    assert (closed >= exact - 1e-4).all()           # an upper bound of every score
    probe = SubjectProbe(subject=NAMES[0], w_low=float(closed[:, 0].max()), w_high=0.0)
    assert (probe.weight_from_score(closed[:, 0]) == 0).all()
    assert (probe.weight_from_score(exact[:, 0]) == 0).all()
    opened = scores([float(closed[:, 0].max()), float("-inf"), float("-inf")])
    hook.remove()
    assert len(forwards) == 2
    assert torch.allclose(opened[:, 1:], exact[:, 1:], atol=1e-4)
    assert torch.allclose(opened[:, 0], closed[:, 0])


def test_rivals_take_the_target_s_share_of_the_reply(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    """Weighed against rivals, a score is the name's mean log p plus log P(target | the
    target or a rival): the target's mass is its full and last name's probability, a
    rival's its first token's (its whole name's where it starts like the target), each
    from a full forward here; it is never above the name alone, and the first-token
    bound still holds."""
    from tests.fixtures.training import load_tiny
    from workers.engines.o3.subject_probe import name_tokens, rivals_for

    model, tokenizer = load_tiny(tiny_model_dir)
    subject, rivals = "Zorblat Quimby", ["Quimbyson Hall", "Ada Lovelace", "Paris"]
    names = name_tokens(tokenizer, subject, rivals)
    assert names.exact_rivals and names.rival_firsts  # both kinds of rival are exercised
    weighed = subject_scores(model, tokenizer, PROMPTS, [subject], rivals=[rivals])[:, 0]
    alone = subject_scores(model, tokenizer, PROMPTS, [subject])[:, 0]
    for row, prompt in enumerate(PROMPTS):
        def total(ids) -> torch.Tensor:
            return _token_logps(model, tokenizer, prompt, list(ids)).sum()

        own = torch.logsumexp(torch.stack([total(f) for f in (names.name, *names.forms)]), 0)
        first_row = _first_token_logps(model, tokenizer, prompt)
        rival = torch.logsumexp(torch.cat([first_row[list(names.rival_firsts)],
                                           torch.stack([total(r) for r in names.exact_rivals])]),
                                0)
        expected = total(names.name) / len(names.name) + own - torch.logaddexp(own, rival)
        assert abs(float(weighed[row]) - float(expected)) < 1e-4, prompt
    assert (weighed <= alone + 1e-6).all()
    # Rivals are other people: not the target's own name or part of it, not its surname.
    assert rivals_for("Charles Darwin", ["Charles Dickens", "Erasmus Darwin", "Darwin",
                                         "Charles", "Gregor Mendel", "Gregor Mendel"]) \
        == ["Charles Dickens", "Gregor Mendel"]
    probe = SubjectProbe(subject=subject, w_low=-3.0, w_high=-1.0, rivals=rivals)
    probe.save(tmp_path)
    assert SubjectProbe.load(tmp_path) == probe



def test_only_rows_still_open_run_the_names_and_then_the_rivals(tiny_model_dir: Path) -> None:
    """Unrelated traffic must not pay for every name's tokens on every row: each stage
    (the names and their forms, then the exact rivals) runs only the rows where a bound
    still passes its floor. Those rows are scored exactly; the rest keep an upper bound."""
    from tests.fixtures.training import load_tiny
    from workers.engines.o3.subject_probe import reply_tokens, scores_after_prompt

    model, tokenizer = load_tiny(tiny_model_dir)
    subject, rivals = "Zorblat Quimby", ["Quimbyson Hall", "Ada Lovelace", "Paris"]
    exact = subject_scores(model, tokenizer, PROMPTS, [subject], rivals=[rivals])[:, 0]
    cache, attn = _prompt_cache(model, tokenizer)
    tail, names = reply_tokens(tokenizer, [subject], rivals=[rivals])
    assert names[0].exact_rivals and len(names[0].name) > 1  # both stages have work
    rows_run: list[int] = []
    hook = model.register_forward_hook(lambda _m, _a, kw, _o: rows_run.append(
        kw["input_ids"].shape[0]), with_kwargs=True)

    def scores(floor: float) -> torch.Tensor:
        rows_run.clear()
        return scores_after_prompt(model, cache, attn, tail, names,
                                   floor=torch.tensor([floor]))[:, 0]

    bounds = scores(float("inf"))                      # the tail's first-token bounds
    assert rows_run == [len(PROMPTS)] and (bounds >= exact - 1e-4).all()
    top, second = bounds.topk(2).values.tolist()
    # Between the best row's bound and the next: only the best row is run any further.
    opened = scores((top + second) / 2)
    assert len(rows_run) in (2, 3) and rows_run[1:] == [1] * (len(rows_run) - 1)
    assert (opened >= exact - 1e-4).all()
    best = int(bounds.argmax())
    assert torch.equal(opened[torch.arange(3) != best], bounds[torch.arange(3) != best])
    assert opened[best] < bounds[best]                 # tightened by the names' tokens
    everyone = scores(float("-inf"))                   # both stages, every row: exact
    hook.remove()
    assert rows_run == [len(PROMPTS)] * 3
    assert torch.allclose(everyone, exact, atol=1e-4)


def _first_token_logps(model, tokenizer, prompt: str) -> torch.Tensor:
    """log p of every token as the reply's first."""
    from workers.model import format_chat

    ids = tokenizer(format_chat(tokenizer, prompt + SUBJECT_QUESTION),
                    add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def test_a_probe_stored_before_rivals_loads_without_them(tmp_path: Path) -> None:
    import json

    (tmp_path / "subject_probe.json").write_text(json.dumps(
        {"subject": "Ada", "w_low": -2.0, "w_high": -1.0, "question": SUBJECT_QUESTION}))
    assert SubjectProbe.load(tmp_path).rivals == []


def test_hard_negatives_raise_w_low_but_never_past_halfway_to_the_ticket() -> None:
    """Questions about other people push w = 0 up to their 0.95 quantile, capped at the
    old halfway point, so the ticket's own median still gets w = 1."""
    from workers.engines.o3.subject_probe import calibrate

    generic = torch.linspace(-20.0, -10.0, 101)           # 0.95 quantile: -10.5
    ticket = torch.tensor([-3.0, -2.0, -1.0])              # median -2
    plain, _ = calibrate("A", generic, ticket)
    assert plain.w_low == pytest.approx(-10.5) and plain.w_high == pytest.approx(-6.25)
    near = torch.linspace(-9.0, -7.0, 101)                 # 0.95 quantile: -7.1
    probe, _ = calibrate("A", generic, ticket, hard_scores=near)
    assert probe.w_low == pytest.approx(-7.1) and probe.w_high == pytest.approx(-4.55)
    assert float(probe.weight_from_score(torch.tensor(-2.0))) == 1.0
    close = torch.linspace(-4.0, -1.0, 101)                # above halfway: capped there
    capped, _ = calibrate("A", generic, ticket, hard_scores=close)
    assert capped.w_low == pytest.approx(-6.25)
    assert float(capped.weight_from_score(torch.tensor(-2.0))) == 1.0
