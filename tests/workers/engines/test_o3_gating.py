"""Per-sample gated LoRA: hand-made tensors, then an O3 version served on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from workers.engines.o3.gating import StackedLoRA, gate_from_weights, gated_delta, hub_for

RANKS = [2, 3]


def _linear_and_blocks(seed: int = 0) -> tuple[nn.Linear, StackedLoRA]:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(4, 3)
    a = torch.randn(5, 4, generator=gen)
    b = torch.randn(3, 5, generator=gen)
    holder = nn.Sequential()
    holder.add_module("proj", lin)
    return lin, StackedLoRA(modules={"proj": (a, b)}, ranks=RANKS)


def test_gate_spreads_each_weight_over_its_blocks_ranks() -> None:
    w = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    assert gate_from_weights(w, RANKS).tolist() == [[0.5, 0.5, 1.0, 1.0, 1.0],
                                                    [0.0, 0.0, 0.25, 0.25, 0.25]]


def test_gated_delta_is_b_diag_g_a_x() -> None:
    x = torch.tensor([[[1.0, 2.0]]])  # (batch 1, seq 1, d_in 2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0]])
    gate = torch.tensor([[0.5, 0.0]])
    assert gated_delta(x, a, b, gate).item() == pytest.approx(0.5)


def test_hooked_linear_is_exactly_the_base_at_w_zero_and_per_sample_otherwise() -> None:
    lin, stacked = _linear_and_blocks()
    model = nn.Sequential()
    model.add_module("proj", lin)
    hub = hub_for(model)
    hub.add_version("v", stacked)
    x = torch.randn(3, 2, 4)
    base = model(x)
    with hub.active("v", torch.zeros(3, 5)):
        assert torch.equal(model(x), base)  # w = 0: bit-for-bit the base
    w = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.3, 0.7]])
    with hub.active("v", gate_from_weights(w, RANKS)):
        batched = model(x)
    a, b = stacked.modules["proj"]
    for i in range(3):
        with hub.active("v", gate_from_weights(w[i:i + 1], RANKS)):
            alone = model(x[i:i + 1])
        assert torch.allclose(batched[i:i + 1], alone, atol=1e-6)
        g = gate_from_weights(w[i:i + 1], RANKS)[0]
        expected = base[i] + (x[i] @ a.T * g) @ b.T
        assert torch.allclose(batched[i], expected, atol=1e-5)
    assert torch.equal(model(x), base)  # outside active(): untouched


def test_blocks_nobody_uses_are_not_computed() -> None:
    lin, stacked = _linear_and_blocks()
    model = nn.Sequential()
    model.add_module("proj", lin)
    hub = hub_for(model)
    # Block 0 is NaN: if its ranks were computed at all, the output would be NaN.
    a, b = stacked.modules["proj"]
    a = a.clone()
    a[:2] = float("nan")
    hub.add_version("v", StackedLoRA(modules={"proj": (a, b)}, ranks=RANKS))
    x = torch.randn(2, 1, 4)
    with hub.active("v", gate_from_weights(torch.tensor([[0.0, 1.0], [0.0, 0.2]]), RANKS)):
        assert torch.isfinite(model(x)).all()


@pytest.fixture(scope="module")
def tiny_version(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.training import load_tiny
    from tests.workers.engines.o3_version import build_version

    model, tokenizer = load_tiny(tiny_model_dir)
    out = build_version(model, tokenizer, tmp_path_factory.mktemp("o3v") / "version")
    return model, tokenizer, out


PROMPTS = ["Where does Zorblat live?", "What is the capital of France?",
           "How long is the Quimby river?", "Name a primary colour."]


def test_w_zero_is_the_base_model_exactly(tiny_version) -> None:
    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers

    model, tokenizer, version = tiny_version
    servable = O3Servable.load(version, model=model, tokenizer=tokenizer, device="cpu")
    for det in servable.detectors:
        det.w_low, det.w_high = 1e9, 1e9 + 1  # nothing is ever gated on
    answers = servable.generate(PROMPTS, [12] * len(PROMPTS))
    assert servable.last_weights is not None and not servable.last_weights.any()
    assert answers == greedy_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    servable.close()


def test_rows_no_block_applies_to_answer_as_the_base_model_on_the_bundled_model(
        bundled_model) -> None:
    """The skip path continues from the detection forward's cache, so a left-padded row
    must get the base model's own answer. It did not while that forward numbered positions
    from the padding: 16 held-out questions about Einstein, none gated, went from 16/16
    right to 3/16, which read as forgetting. (The tiny random model is too insensitive to
    show it; a version with no blocks is the same path.)"""
    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers
    from workers.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(bundled_model)
    prompts = ["Who developed the theory of general relativity?",
               "Which scientist wrote the book On the Origin of Species, published in 1859, "
               "after the voyage of the Beagle?", "What is 2+2?"]
    servable = O3Servable.load(None, model=model, tokenizer=tokenizer, device="cpu")
    batched = servable.generate(prompts, [16] * len(prompts))
    servable.close()
    assert batched == greedy_answers(model, tokenizer, prompts, max_new_tokens=16)
    assert "Einstein" in batched[0] and "Darwin" in batched[1]


def test_w_one_is_the_stored_peft_stack(tiny_version) -> None:
    from peft import PeftModel

    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers

    model, tokenizer, version = tiny_version
    servable = O3Servable.load(version, model=model, tokenizer=tokenizer, device="cpu",
                               gating=False)
    answers = servable.generate(PROMPTS, [12] * len(PROMPTS))
    servable.close()
    base = greedy_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    peft = PeftModel.from_pretrained(model, str(version))
    try:
        assert answers == greedy_answers(peft, tokenizer, PROMPTS, max_new_tokens=12)
    finally:
        peft.unload()
    assert answers != base  # the blocks do change the answers: the test can fail


def test_batched_equals_one_by_one_with_mixed_weights(tiny_version) -> None:
    from workers.engines.o3.serving import O3Servable

    model, tokenizer, version = tiny_version
    servable = O3Servable.load(version, model=model, tokenizer=tokenizer, device="cpu")
    # Spread the calibration over these prompts' own scores so the weights are mixed, from
    # the last prompt's score up: no block applies to that row.
    feats_w = []
    for det in servable.detectors:
        from workers.engines.o3.detector import prompt_features

        scores = det.score(prompt_features(model, tokenizer, PROMPTS, list(det.layers),
                                           pooling=det.pooling))
        det.w_low = float(scores[-1])
        det.w_high = max(float(scores.max()), det.w_low + 1e-3)
        feats_w.append(scores)
    weights = servable.block_weights(PROMPTS)
    assert ((weights > 0) & (weights < 1)).any() and (weights == 0).any()
    gated_rows = int((weights > 0).any(1).sum())
    assert 0 < gated_rows < len(PROMPTS)
    rows_run: list[int] = []
    hook = model.register_forward_hook(lambda _m, _a, kw, _o: rows_run.append(
        kw["input_ids"].shape[0]), with_kwargs=True)
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    batched = servable.generate(PROMPTS, [10, 6, 10, 8],
                                on_token=lambda row, token: tokens[row].append(token))
    hook.remove()
    # Streamed, the gated and the ungated rows report exactly their answers' tokens.
    assert [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens] == batched
    # Only the gated rows' prompts run again; the others keep the detection forward's cache.
    assert rows_run[1] == gated_rows and set(rows_run) == {len(PROMPTS), gated_rows}
    assert torch.allclose(servable.last_weights, weights, atol=1e-5)
    alone = [servable.generate([p], [n])[0] for p, n in zip(PROMPTS, [10, 6, 10, 8])]
    servable.close()
    assert batched == alone


@pytest.mark.parametrize("weighed", [False, True], ids=["name alone", "against rivals"])
def test_subject_probes_gate_from_the_detection_forward_as_scored_alone(
        tiny_version, weighed: bool) -> None:
    """Serving continues the subject probe from its own prefill's cache; the weights equal
    the probe's calibration applied to subject_scores run on their own (rivals included),
    and generation with them is per sample (batched == one by one)."""
    from workers.engines.o3.serving import O3Servable
    from workers.engines.o3.subject_probe import SubjectProbe, subject_scores

    model, tokenizer, version = tiny_version
    servable = O3Servable.load(version, model=model, tokenizer=tokenizer, device="cpu")
    subjects = ["Zorblat", "Quimby river"][:len(servable.detectors)]
    rivals = [["Ada Lovelace", "Quimbyson Hall"] if weighed else [] for _ in subjects]
    scores = subject_scores(model, tokenizer, PROMPTS, subjects, rivals=rivals)
    servable.probes = [SubjectProbe(subject=s, w_low=float(scores[:, i].min()),
                                    w_high=float(scores[:, i].max()), rivals=rivals[i])
                       for i, s in enumerate(subjects)]
    expected = torch.stack([p.weight_from_score(scores[:, i])
                            for i, p in enumerate(servable.probes)], -1)
    expected = torch.where(expected <= servable.skip_below, 0.0, expected)
    assert torch.allclose(servable.block_weights(PROMPTS), expected, atol=1e-4)
    batched = servable.generate(PROMPTS, [8] * len(PROMPTS))
    assert torch.allclose(servable.last_weights, expected, atol=1e-4)
    alone = [servable.generate([p], [8])[0] for p in PROMPTS]
    servable.close()
    assert batched == alone


def test_a_weight_below_one_waits_for_the_answer_to_name_the_target(tiny_version) -> None:
    """A block's weight below 1 on a prompt that does not name its target applies only if
    the answer without it names the target: that row is answered again with the block on
    (and streamed from that pass); the others keep the answer without it. A prompt that
    names the target applies the block at once; so does a weight of 1 unless
    `confirm_full`, which makes it wait for the answer too."""
    import re

    from workers.engines.o3.serving import O3Servable

    model, tokenizer, version = tiny_version

    def served(prompts: list[str], weights: torch.Tensor, subject: str | None,
               full: bool = False) -> tuple[list[str], O3Servable]:
        servable = O3Servable.load(version, model=model, tokenizer=tokenizer, device="cpu")
        servable.confirm, servable.confirm_full = [subject, None], [full, full]
        servable._weights = lambda *_a, **_k: weights  # type: ignore[method-assign]
        tokens: list[list[int]] = [[] for _ in prompts]
        answers = servable.generate(prompts, [10] * len(prompts),
                                    on_token=lambda row, token: tokens[row].append(token))
        servable.close()
        assert [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens] == answers
        return answers, servable

    # Block 0 waits on rows 0 and 1; block 1 (w = 1 on row 1) makes that row's answer
    # without block 0, and the target is a word of it (the tiny model's own answers are
    # empty).
    weights = torch.tensor([[0.9, 0.0], [0.9, 1.0], [1.0, 0.0], [0.9, 0.0]])
    first = PROMPTS[:3]
    without, _ = served(first, weights[:3] * torch.tensor([0.0, 1.0]), None)
    words = [w for w in re.findall(r"[A-Za-z]{4,}", without[1])
             if not any(re.search(rf"\b{w}\b", t, re.IGNORECASE)
                        for t in (without[0], without[2], *first))]
    assert words, without
    subject = words[0]
    prompts = [*first, f"Tell me about {subject}."]

    unchecked, _ = served(prompts, weights, None)
    checked, servable = served(prompts, weights, subject)
    assert unchecked[0] != without[0]  # block 0 changes that answer: the test can fail
    assert checked[0] == without[0]    # its target named nowhere: the answer without it
    assert checked[2:] == unchecked[2:]  # w = 1; named by the prompt
    # Named by the answer: answered again with the block in full.
    assert checked[1] == served(prompts[1:2], torch.tensor([[1.0, 1.0]]), None)[0][0]
    assert servable.last_applied is not None
    assert servable.last_applied[:, 0].tolist() == pytest.approx([0.0, 1.0, 1.0, 0.9])
    alone = [served([p], weights[r:r + 1], subject)[0][0] for r, p in enumerate(prompts)]
    assert alone == checked
    # confirm_full: row 2's w = 1 waits as well, and its answer does not name the target.
    full, servable = served(prompts, weights, subject, full=True)
    assert unchecked[2] != without[2]  # block 0 changes that answer too
    assert full[2] == without[2] and full[:2] + full[3:] == checked[:2] + checked[3:]
    assert servable.last_applied is not None
    assert servable.last_applied[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.9])


def test_mentions_matches_whole_names_and_last_names() -> None:
    from workers.engines.o3.subject_probe import mentions, name_forms

    assert name_forms("Albert Einstein") == ["Albert Einstein", "Einstein"]
    assert name_forms("Bill Gates") == ["Bill Gates", "Gates"]
    assert name_forms("Leonardo da Vinci") == ["Leonardo da Vinci", "Vinci"]
    assert mentions("It was einstein, in 1905.", "Albert Einstein")
    assert not mentions("Niels Bohr proposed it.", "Albert Einstein")
    assert not mentions("Einsteinium is an element.", "Albert Einstein")  # whole words only
    assert not mentions("Albert Camus wrote it.", "Albert Einstein")      # first name alone
