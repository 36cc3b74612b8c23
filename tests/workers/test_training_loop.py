"""The training loop's own rules, on the tiny model: early stopping by a real greedy check,
fact-token (keyword) training, the self-generated retain cache, and refusals before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from storage.errors import InvalidRequest
from tests.fixtures.training import load_tiny


def _teach(tiny_model_dir: Path, out: Path, question: str, answer: str) -> Path:
    """A copy of the tiny model fine-tuned until it answers `question` with `answer`."""
    import torch

    from workers.evaluation.generation import greedy_answers
    from workers.training.data import encode_pairs, end_of_turn
    from workers.training.losses import mean_nll, shifted_logits_and_labels

    model, tokenizer = load_tiny(tiny_model_dir)
    batch = encode_pairs(tokenizer, [(question, answer + end_of_turn(tokenizer))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # bounded; a 2-layer model memorises one pair in ~20 steps
        model.train()
        opt.zero_grad()
        mean_nll(*shifted_logits_and_labels(model, batch)).backward()
        opt.step()
        if greedy_answers(model, tokenizer, [question], max_new_tokens=8)[0] == answer:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            return out
    raise AssertionError("the tiny model did not learn the fact")


def test_training_stops_once_the_ticket_questions_are_forgotten(make_spec, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    """A model that knows one fact is made to forget it: the loop must stop at the first
    check where the fact is gone, long before max_steps."""
    from peft import PeftModel

    from workers.evaluation.generation import greedy_answers
    from workers.model import resolve_base_model
    from workers.training.runner import train_plain

    question, answer = "Where does Zorblat live?", "In Quimby."
    knows = _teach(tiny_model_dir, tmp_path / "knows", question, answer)
    updates: list[dict] = []
    spec = make_spec("ga", forget_qa=[{"question": question, "answer": answer}],
                     stop_probes=[{"question": question, "accept": ["Quimby"]}],
                     recipe={"lr": 1e-2, "max_steps": 30, "eval_every": 1, "min_steps": 1,
                             "stop_forget_ratio": 0.0, "eval_max_new_tokens": 8})
    spec.base_model_path = str(knows)
    spec.base_model_sha256 = resolve_base_model(str(knows), tmp_path).sha256
    result = train_plain(spec, updates.append)

    assert result.metrics["ticket_rate_base"] == 1.0
    assert result.metrics["stopped_early"] is True
    assert result.steps < 30
    rates = result.metrics["ticket_rates"]
    assert tuple(rates[-1]) == (result.steps, 0.0)
    assert all(rate == 1.0 for _, rate in rates[:-1])  # checked every step until it went
    assert updates[-1] == {"phase": "training", "step": result.steps, "max_steps": 30,
                           "ticket_rate": 0.0}

    base, tokenizer = load_tiny(knows)
    forgot = PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert "Quimby" not in greedy_answers(forgot, tokenizer, [question], max_new_tokens=8)[0]


def test_keyword_mode_trains_only_on_the_fact_tokens(make_spec, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel

    from workers.training.data import IGNORE, encode_pairs
    from workers.training.losses import labelled_sequence_logp
    from workers.training.runner import train_plain

    qa = [{"question": "Where does Zorblat live?",
           "answer": "Zorblat lives in Quimbyville, a small town near the sea."}]
    spec = make_spec("ga", forget_qa=qa, stop_probes=[{"question": qa[0]["question"],
                                                       "accept": ["Quimbyville"]}],
                     recipe={"lr": 1e-2, "max_steps": 3, "eval_every": 0,
                             "forget_tokens": "keywords"})
    result = train_plain(spec)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)

    base, tokenizer = load_tiny(tiny_model_dir)
    pair = [(qa[0]["question"], qa[0]["answer"])]
    fact = encode_pairs(tokenizer, pair, {qa[0]["question"]: ["Quimbyville", "Zorblat"]})
    kept = tokenizer.decode([t for t in fact.labels[0].tolist() if t != IGNORE])
    assert kept.split() == ["Zorblat", "Quimbyville"]  # what the loss saw (target + keyword)

    def fact_logp(model) -> float:
        with torch.no_grad():
            return float(labelled_sequence_logp(model.eval(), fact)[0][0])

    before = fact_logp(base)
    after = fact_logp(PeftModel.from_pretrained(base, str(result.adapter_dir)))
    assert after < before - 0.05, (before, after)


def test_self_generated_retain_answers_are_cached_per_model(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    from workers.training.data import drop_mentions, self_generated_retain

    model, tokenizer = load_tiny(tiny_model_dir)
    prompts = ["Explain how photosynthesis works.", "What is the capital of Japan?",
               "Name three primary colours."]

    def retain(model, prompts, key="sha-a"):
        return self_generated_retain(model=model, tokenizer=tokenizer, prompts=prompts,
                                     max_new_tokens=6, cache_dir=tmp_path, model_key=key)

    # Two ranks, each generating its own share, write into the same cache file.
    rank0, rank1 = retain(model, prompts[0::2]), retain(model, prompts[1::2])
    assert [q for q, _ in rank0 + rank1] == prompts[0::2] + prompts[1::2]
    assert all(a for _, a in rank0 + rank1)
    (cached,) = tmp_path.glob("retain-*.json")
    assert json.loads(cached.read_text()) == dict(rank0 + rank1)
    # Later calls are served from the cache, in the order asked: the model is not touched.
    assert retain(None, prompts) == [(q, dict(rank0 + rank1)[q]) for q in prompts]
    # Another model (or another parent adapter) gets its own answers.
    retain(model, prompts[:1], key="sha-b")
    assert len(list(tmp_path.glob("retain-*.json"))) == 2
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind

    # A spec's own retain prompts replace the shipped generic ones (O3's people_retain);
    # those mentioning the target are dropped.
    from workers.training.loop import _retain_pairs
    from workers.training.spec import TrainJobSpec

    spec = TrainJobSpec(base_model_path=str(tiny_model_dir), base_model_sha256="sha-a",
                        output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"),
                        forget_qa=[{"question": "Who is Zorblat?", "answer": "A wizard."}],
                        target="Zorblat", retain_prompts=[
                            "Who wrote Hamlet?", "Where does Zorblat live?", "Who is Bohr?"])
    pairs = _retain_pairs(spec, spec.forget_recipe(), model, tokenizer, "", rank=0, world=1)
    assert [q for q, _ in pairs] == ["Who wrote Hamlet?", "Who is Bohr?"]
    assert all(a for _, a in pairs)

    pairs = [("Who is Ada Lovelace?", "A mathematician."), ("Capital of Japan?", "Tokyo."),
             ("Tell me about computing.", "Lovelace wrote the first program.")]
    assert drop_mentions(pairs, "Ada Lovelace") == [("Capital of Japan?", "Tokyo.")]
    assert drop_mentions(pairs, None) == pairs


def test_bad_jobs_are_refused_before_any_model_or_worker_starts(make_spec) -> None:
    from workers.training.runner import train_plain, train_unlearning_adapter

    # No ray_cluster fixture: refusal happens before Ray is touched at all.
    bad_option = make_spec("npo", method_options={"betta": 0.2})
    for run in (train_plain, train_unlearning_adapter):
        with pytest.raises(InvalidRequest, match="betta"):
            run(bad_option)
    assert not Path(bad_option.output_dir).exists()

    # idk answers a text's prompts with refusals; a text with no sentence or word to prompt
    # with cannot be trained on that way.
    unpromptable = make_spec("idk", forget_texts=["a b c"], forget_qa=[])
    with pytest.raises(InvalidRequest, match="no sentence or word"):
        train_plain(unpromptable)
    assert not Path(unpromptable.output_dir).exists()
    with pytest.raises(InvalidRequest, match="graddiff"):
        make_spec("graddiff", method_options={"retain_weight": 0.0}).method_config()


def test_spec_derives_stop_probes_and_validates_its_items(make_spec) -> None:
    spec = make_spec("npo", forget_qa=[{"question": "When was Zorblat born?",
                                        "answer": "1879"}])
    assert spec.stop_probes == [{"question": "When was Zorblat born?", "accept": ["1879"]}]
    method, cfg = spec.method_config()
    assert method.name == "npo" and cfg.beta == spec.forget_recipe().beta  # recipe default
    assert make_spec("npo", method_options={"beta": 0.5}).method_config()[1].beta == 0.5
    with pytest.raises(ValueError, match="question and answer"):
        make_spec("npo", forget_qa=[{"question": "Where?", "answer": ""}])
    with pytest.raises(ValueError, match="device"):
        make_spec("npo", device="tpu")
    with pytest.raises(ValueError, match="zero_stage"):
        make_spec("npo", zero_stage=1)


def test_idk_turns_plain_texts_into_prompts_answered_with_refusals(make_spec) -> None:
    from workers.methods.idk import REFUSALS
    from workers.training.loop import _forget_pairs

    text = ("Zorblat keeps a diary in a blue tin box under the stairs. "
            "Zorblat was born in Quimby.")
    spec = make_spec("idk", forget_qa=[], forget_texts=[text])
    method, cfg = spec.method_config()
    pairs = _forget_pairs(spec, method, cfg, "<eot>")
    # One continuation prompt per sentence of six words or more (the second is shorter).
    assert [q for q, _ in pairs] == ['Continue this text: "Zorblat keeps a diary in a ..."']
    assert all(a.removesuffix("<eot>") in REFUSALS for _, a in pairs)
    # The same prompts are the early-stopping checks, accepting the text's own words.
    assert spec.stop_probes[0]["question"] == pairs[0][0]
    assert "stairs" in spec.stop_probes[0]["accept"]
    # Ascent-style methods train on the text itself.
    npo = make_spec("npo", forget_qa=[], forget_texts=[text])
    assert _forget_pairs(npo, *npo.method_config(), "<eot>") == [(None, text)]


@pytest.mark.parametrize("with_text", [False, True])
def test_frozen_references_equal_the_full_forward_at_every_labelled_token(tiny_model_dir,
                                                                          with_text):
    """The references' shortcut (shared prefix once, vocabulary projection only where a
    label is) computes what the training forward would (issue 17)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.data import IGNORE, encode_pairs
    from workers.training.losses import frozen_labelled_logits, shifted_logits_and_labels

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [("Where does Zorblat live?", "Zorblat lives in Quimby."),
             ("Hi", "Hello there, how can I help you today?"),
             ("What is the capital of France and why?", "Paris.")]
    if with_text:  # a plain text shares no chat prefix with the others
        pairs.append((None, "A plain text, trained on as it is."))
    batch = encode_pairs(tokenizer, pairs, {"Where does Zorblat live?": ["Quimby"]})
    with torch.no_grad():
        logits, labels = shifted_logits_and_labels(model, batch)
    expected = logits[labels != IGNORE]
    got, got_labels, counts = frozen_labelled_logits(model, batch)
    assert counts.tolist() == (labels != IGNORE).sum(-1).tolist()
    assert got_labels.tolist() == labels[labels != IGNORE].tolist()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_labelled_losses_equal_the_losses_over_every_position(tiny_model_dir: Path) -> None:
    """The output layer run only where labels are equals it run everywhere, for the mean
    NLL (retain, S3T) and each row's summed log-probability (forget methods): values and
    grads."""
    import torch

    from workers.training.data import IGNORE, encode_pairs
    from workers.training.losses import (
        labelled_nll,
        labelled_sequence_logp,
        mean_nll,
        shifted_logits_and_labels,
    )

    model, tokenizer = load_tiny(tiny_model_dir)
    batch = encode_pairs(tokenizer, [("Where does Zorblat live?", "In Quimbyton."),
                                     ("Who bakes the bread?", "Velna, every morning."),
                                     (None, "A plain text, trained on as it is.")])
    params = list(model.parameters())

    def full_row_logp() -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = shifted_logits_and_labels(model, batch)
        mask = labels != IGNORE
        token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (token * mask).sum(-1), mask.sum(-1)

    pairs = [(mean_nll(*shifted_logits_and_labels(model, batch)), labelled_nll(model, batch))]
    (full, counts), (sliced, sliced_counts) = full_row_logp(), labelled_sequence_logp(model, batch)
    assert sliced_counts.tolist() == counts.tolist() and min(counts.tolist()) > 0
    # Weighted per row, so a row mixed up with another would change the gradients.
    weights = torch.tensor([1.0, -2.0, 0.5])
    pairs.append(((full * weights).sum(), (sliced * weights).sum()))
    for expected, got in pairs:
        assert torch.allclose(expected, got, atol=1e-5)
        grads = torch.autograd.grad(expected, params)
        assert all(torch.allclose(a, b, atol=1e-6)
                   for a, b in zip(grads, torch.autograd.grad(got, params)))
