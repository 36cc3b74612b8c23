"""Unlearning methods: the registry, the losses on hand-made tensors, the data encoding they
train on, and a real (plain, single-process) training run of every registered method."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from storage.errors import InvalidRequest
from tests.fixtures.training import FORGET_QA, forget_nll, load_tiny
from workers.methods import MethodRegistry, get_method, list_methods, register_method
from workers.training.data import IGNORE, encode_pairs, keyword_token_mask
from workers.training.losses import answer_kl

LOGP = torch.tensor([-12.0, -3.5, -20.0])
REF = torch.tensor([-10.0, -4.0, -20.0])
NTOK = torch.tensor([4, 2, 5])


# --- losses on hand-made numbers -----------------------------------------------------------

def loss_of(name: str, options: dict | None = None, *, logp: torch.Tensor = LOGP,
            ref: torch.Tensor | None = REF, retain: torch.Tensor | None = None) -> torch.Tensor:
    method = get_method(name)
    return method.loss(forget_logp=logp, forget_tokens=NTOK,
                       ref_forget_logp=ref if method.needs_reference else None,
                       retain_loss=retain, cfg=method.make_config(options))


def test_npo_loss_matches_its_formula() -> None:
    loss = loss_of("npo", {"beta": 0.5, "retain_weight": 0.0})
    expected = -(2 / 0.5) * F.logsigmoid(-0.5 * (LOGP - REF)).mean()
    assert torch.allclose(loss, expected)
    # Written out by hand for the first element: -(2/b) * log(1 / (1 + exp(b * (logp - ref)))).
    by_hand = sum((2 / 0.5) * math.log(1 + math.exp(0.5 * (lp - r)))
                  for lp, r in zip(LOGP.tolist(), REF.tolist())) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_at_the_reference_is_2_ln2_over_beta(beta: float) -> None:
    loss = loss_of("npo", {"beta": beta}, logp=REF.clone())
    assert loss.item() == pytest.approx(2 * math.log(2) / beta, rel=1e-6)


def test_npo_gradient_pushes_the_forget_logp_down() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss_of("npo", {"beta": 0.1}, logp=logp).backward()
    # d/dx of -(2/b) log sigmoid(-b x) = 2 sigmoid(b x): positive, so descent lowers logp.
    expected = 2 * torch.sigmoid(0.1 * (LOGP - REF)) / 3
    assert torch.all(logp.grad > 0)
    assert torch.allclose(logp.grad, expected)


def test_npo_needs_reference_and_a_positive_beta() -> None:
    method = get_method("npo")
    assert method.needs_reference
    with pytest.raises(ValueError, match="reference"):
        method.loss(forget_logp=LOGP, forget_tokens=NTOK, ref_forget_logp=None,
                    retain_loss=None, cfg=method.make_config())
    for beta in (0.0, -1.0):
        with pytest.raises(InvalidRequest, match="beta"):
            method.make_config({"beta": beta})


def test_npo_adds_the_weighted_retain_term() -> None:
    plain = loss_of("npo", {"beta": 0.1})
    with_retain = loss_of("npo", {"beta": 0.1, "retain_weight": 0.5}, retain=torch.tensor(3.0))
    assert with_retain.item() == pytest.approx(plain.item() + 1.5)
    off = loss_of("npo", {"beta": 0.1, "retain_weight": 0.0}, retain=torch.tensor(3.0))
    assert off.item() == pytest.approx(plain.item())


PER_TOKEN_MEAN = (-12 / 4 - 3.5 / 2 - 20 / 5) / 3


def test_ga_loss_is_the_mean_per_token_logp() -> None:
    assert not get_method("ga").needs_reference
    logp = LOGP.clone().requires_grad_(True)
    loss = loss_of("ga", logp=logp)
    assert loss.item() == pytest.approx(PER_TOKEN_MEAN)
    loss.backward()
    assert torch.allclose(logp.grad, 1 / (3 * NTOK.float()))  # descent lowers every logp
    # Pure ascent by default: a retain term is ignored unless given a weight.
    assert loss_of("ga", retain=torch.tensor(2.0)).item() == pytest.approx(PER_TOKEN_MEAN)
    assert (loss_of("ga", {"retain_weight": 0.25}, retain=torch.tensor(2.0)).item()
            == pytest.approx(PER_TOKEN_MEAN + 0.5))


def test_graddiff_is_the_same_ascent_plus_retain_descent() -> None:
    assert not get_method("graddiff").needs_reference
    logp = LOGP.clone().requires_grad_(True)
    loss = loss_of("graddiff", logp=logp, retain=torch.tensor(2.0))
    assert loss.item() == pytest.approx(PER_TOKEN_MEAN + 2.0)
    loss.backward()
    assert torch.allclose(logp.grad, 1 / (3 * NTOK.float()))
    weighted = loss_of("graddiff", {"forget_weight": 2.0, "retain_weight": 0.5},
                       retain=torch.tensor(2.0))
    assert weighted.item() == pytest.approx(2 * PER_TOKEN_MEAN + 1.0)
    with pytest.raises(ValueError, match="retain"):
        loss_of("graddiff", retain=None)


def test_idk_descends_on_a_fixed_refusal_per_question() -> None:
    method = get_method("idk")
    cfg = method.make_config({"refusals": ["I don't know.", "No idea."], "retain_weight": 0.0})
    assert cfg.refusals == ("I don't know.", "No idea.")  # JSON lists become tuples
    logp = LOGP.clone().requires_grad_(True)
    loss = method.loss(forget_logp=logp, forget_tokens=NTOK, ref_forget_logp=None,
                       retain_loss=torch.tensor(5.0), cfg=cfg)
    assert loss.item() == pytest.approx(-PER_TOKEN_MEAN)
    loss.backward()
    assert torch.all(logp.grad < 0)  # descent raises the refusal's log-prob
    q = "Where does Zorblat 1 live?"
    refusal = method.answer_for(cfg, q, "Quimby")
    assert refusal in cfg.refusals and refusal == method.answer_for(cfg, q, "other")
    with pytest.raises(InvalidRequest, match="refusals"):
        method.make_config({"refusals": []})


# --- registry ------------------------------------------------------------------------------

def test_builtin_methods_are_listed() -> None:
    assert {"ga", "graddiff", "npo"} <= set(list_methods())
    assert list_methods() == sorted(list_methods())


def test_registry_refuses_a_duplicate_name() -> None:
    list_methods()  # the built-ins are registered now

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        x: int = 0

    with pytest.raises(ValueError, match="already registered"):
        register_method("ga", Cfg)(lambda **_: None)
    assert get_method("ga").config_cls.__name__ == "GAConfig"


def test_registry_refuses_a_config_that_is_not_a_dataclass() -> None:
    class NotADataclass:
        pass

    with pytest.raises(TypeError, match="dataclass"):
        register_method("test_not_dataclass", NotADataclass)
    with pytest.raises(TypeError, match="dataclass"):
        register_method("test_instance", get_method("ga").make_config())  # an instance
    assert "test_not_dataclass" not in list_methods()


def test_registry_refuses_mutable_configs_and_options_without_defaults() -> None:
    registry = MethodRegistry()

    @dataclasses.dataclass
    class Mutable:
        x: int = 0

    @dataclasses.dataclass(frozen=True)
    class NoDefault:
        x: int

    @dataclasses.dataclass(frozen=True)
    class Fine:
        x: int = 1

    with pytest.raises(TypeError, match="frozen"):
        registry.register("mutable", Mutable)
    with pytest.raises(TypeError, match="without defaults"):
        registry.register("nodefault", NoDefault)
    registry.register("fine", Fine)(lambda **_: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("fine", Fine)
    assert registry.names() == ["fine"]
    assert registry.get("fine").make_config({"x": 3}) == Fine(3)
    assert "fine" not in list_methods()  # a private registry leaves the process-wide one alone


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(InvalidRequest) as err:
        get_method("nope")
    for name in ("ga", "graddiff", "npo", "'nope'"):
        assert name in str(err.value)


def test_unknown_option_is_an_error_not_ignored() -> None:
    with pytest.raises(InvalidRequest, match="bogus.*known: beta, retain_weight"):
        get_method("npo").make_config({"bogus": 1})
    assert get_method("npo").make_config({"beta": 0.3}).beta == 0.3
    assert get_method("graddiff").make_config(None).retain_weight == 1.0


# --- shared loss helpers -------------------------------------------------------------------

def test_answer_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    labels = torch.tensor([[IGNORE, 2, 5, IGNORE], [IGNORE, IGNORE, 8, IGNORE]])
    answer = labels != IGNORE  # both sides are packed: the 3 answer positions, row-major
    ref = torch.log_softmax(logits[answer], -1)
    assert answer_kl(ref, logits[answer]).item() == pytest.approx(0.0, abs=1e-6)
    moved = logits.clone()
    moved[0, 1, 2] += 3.0
    kl = answer_kl(ref, moved[answer])
    assert kl.item() > 1e-3
    # Same value as torch's KL(ref || model), averaged over the 3 answer positions.
    expected = F.kl_div(torch.log_softmax(moved[answer], -1), ref, log_target=True,
                        reduction="sum") / 3
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)


# --- data encoding -------------------------------------------------------------------------

def test_encode_pairs_labels_exactly_the_answer_tokens(tiny_tokenizer) -> None:
    from workers.model import format_chat

    tok = tiny_tokenizer
    pairs = [("Where does Zorblat live?", "Zorblat lives in Quimby."),
             ("Hi?", "Hello there, friend, how are you today?"),
             (None, "A plain text to forget.")]
    batch = encode_pairs(tok, pairs)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for row, (question, answer) in enumerate(pairs):
        prompt = ([] if question is None else
                  tok(format_chat(tok, question), add_special_tokens=False)["input_ids"])
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(answer_ids)
        assert batch.input_ids[row, :n].tolist() == prompt + answer_ids
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.labels.shape[1] - n)
        labels = batch.labels[row].tolist()
        assert labels[:len(prompt)] == [IGNORE] * len(prompt)  # no loss on the prompt
        assert labels[len(prompt):n] == answer_ids
        assert all(x == IGNORE for x in labels[n:])  # nor on the padding
    assert "Where does Zorblat live?" in tok.decode(batch.input_ids[0])


def test_keyword_mask_labels_only_the_keyword_tokens(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    question, answer = "Where does Zorblat live?", "Zorblat lives in Quimbyville near the sea."
    batch = encode_pairs(tok, [(question, answer)], keywords={question: ["quimbyville"]})
    kept = [t for t in batch.labels[0].tolist() if t != IGNORE]
    assert tok.decode(kept).strip() == "Quimbyville"
    mask = keyword_token_mask(tok, answer, ["Zorblat", "sea"])
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]).split() == ["Zorblat", "sea"]
    # No keyword in the answer: the loss stays on the whole answer rather than on nothing.
    assert keyword_token_mask(tok, answer, ["Paris"]) is None
    whole = encode_pairs(tok, [(question, answer)], keywords={question: ["Paris"]})
    assert tok.decode([t for t in whole.labels[0].tolist() if t != IGNORE]) == answer


# --- a real training run of every method ---------------------------------------------------

@pytest.mark.parametrize("method", list_methods())
def test_plain_training_forgets_with_every_method(method: str, make_spec, tiny_model_dir: Path
                                                  ) -> None:
    from peft import PeftModel

    from workers.training.lora_stack import read_adapter
    from workers.training.runner import train_plain

    updates: list[dict] = []
    spec = make_spec(method, recipe={"lr": 1e-2})
    result = train_plain(spec, updates.append)

    assert result.metrics["steps"] == 4
    assert len(result.metrics["losses"]) == 4
    assert all(math.isfinite(x) for x in result.metrics["losses"])
    assert [u["step"] for u in updates if "loss" in u] == [1, 2, 3, 4]
    assert result.adapter_dir == Path(spec.output_dir)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.peft_config["r"] == 8 and result.peft_config["peft_type"] == "LORA"

    config, weights = read_adapter(result.adapter_dir)
    b_weights = {k: v for k, v in weights.items() if ".lora_B." in k}
    # PEFT initialises B to zero: every B moved, so every LoRA'd module learned something.
    assert len(b_weights) == 2 * 7  # 2 layers x 7 projections
    assert all(v.abs().sum() > 0 for v in b_weights.values())

    base, tokenizer = load_tiny(tiny_model_dir)
    chosen = get_method(method)
    if chosen.answer_for is None:
        # Forgetting methods: the forget answers became less likely.
        qa, sign = FORGET_QA, 1.0
    else:
        # Substitution methods (idk): their replacement answers became more likely.
        cfg = spec.method_config()[1]
        qa = [{"question": i["question"], "answer": chosen.answer_for(cfg, i["question"],
                                                                       i["answer"])}
              for i in FORGET_QA]
        sign = -1.0
    before = forget_nll(base, tokenizer, qa)
    adapted = PeftModel.from_pretrained(base, str(result.adapter_dir))
    after = forget_nll(adapted, tokenizer, qa)
    assert sign * (after - before) > 0.05, (before, after)


def test_plain_training_without_anything_to_forget_is_refused(make_spec) -> None:
    with pytest.raises(ValueError, match="nothing to forget"):
        make_spec("ga", forget_qa=[])
