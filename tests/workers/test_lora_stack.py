"""Stacking LoRA adapters: the stacked adapter is exactly the sum of its parts, both as
matrices and as a model loaded with PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.training import load_tiny
from workers.training.lora_stack import (
    read_adapter,
    stack_adapters,
    stack_ranks,
    write_adapter,
)

PREFIX = "base_model.model.model.layers.{layer}.self_attn.{proj}"
SHAPES = {"q_proj": (16, 16), "v_proj": (16, 8), "o_proj": (16, 16)}  # (in, out)


def random_adapter(*, r: int, alpha: float, modules: list[tuple[int, str]], seed: int,
                   rslora: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer, proj in modules:
        n_in, n_out = SHAPES[proj]
        key = PREFIX.format(layer=layer, proj=proj)
        weights[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g)
        weights[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g)
    config = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "peft_type": "LORA",
              "target_modules": sorted({p for _, p in modules})}
    return config, weights


def delta(config: dict, weights: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The weight change one adapter applies to module `key`: scale * B @ A."""
    if f"{key}.lora_A.weight" not in weights:
        return torch.zeros(())
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    return scale * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]


def test_stacked_delta_is_the_sum_of_the_deltas() -> None:
    first = random_adapter(r=4, alpha=8, seed=1,
                           modules=[(0, "q_proj"), (0, "v_proj"), (1, "q_proj")])
    second = random_adapter(r=2, alpha=16, seed=2, rslora=True,
                            modules=[(0, "q_proj"), (1, "o_proj")])
    third = random_adapter(r=3, alpha=3, seed=3, modules=[(1, "q_proj")])
    config, weights = stack_adapters([first, second, third])

    assert config["r"] == config["lora_alpha"] == 9  # scale 1: the blocks carry the scales
    assert config["use_rslora"] is False
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    keys = {PREFIX.format(layer=lay, proj=p)
            for lay, p in [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "o_proj")]}
    assert {k.split(".lora_")[0] for k in weights} == keys
    for key in keys:
        a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
        n_in, n_out = SHAPES[key.rsplit(".", 1)[1]]
        assert a.shape == (9, n_in) and b.shape == (n_out, 9)
        expected = sum(delta(*adapter, key) for adapter in (first, second, third))
        assert torch.allclose(b @ a, expected, atol=1e-5), key


def test_a_module_missing_from_one_adapter_gets_zero_blocks() -> None:
    first = random_adapter(r=4, alpha=8, seed=1, modules=[(0, "q_proj")])
    second = random_adapter(r=2, alpha=2, seed=2, modules=[(0, "v_proj")])
    _, weights = stack_adapters([first, second])
    q, v = PREFIX.format(layer=0, proj="q_proj"), PREFIX.format(layer=0, proj="v_proj")
    # q_proj: first adapter's rows, then zeros for the second's rank (and vice versa for v).
    assert torch.equal(weights[f"{q}.lora_A.weight"][:4], first[1][f"{q}.lora_A.weight"])
    assert not weights[f"{q}.lora_A.weight"][4:].any()
    assert not weights[f"{q}.lora_B.weight"][:, 4:].any()
    assert not weights[f"{v}.lora_A.weight"][:4].any()
    assert not weights[f"{v}.lora_B.weight"][:, :4].any()
    assert torch.equal(weights[f"{v}.lora_A.weight"][4:], second[1][f"{v}.lora_A.weight"])


def test_stacking_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to stack"):
        stack_adapters([])


def test_write_and_read_keep_weights_config_and_rank_history(tmp_path: Path) -> None:
    first = random_adapter(r=4, alpha=8, seed=1, modules=[(0, "q_proj")])
    write_adapter(tmp_path / "one", *first)
    assert stack_ranks(tmp_path / "one") == [4]
    config, weights = read_adapter(tmp_path / "one")
    assert config == first[0]
    assert weights.keys() == first[1].keys()
    assert all(torch.equal(weights[k], first[1][k]) for k in weights)
    second = random_adapter(r=2, alpha=2, seed=2, modules=[(0, "q_proj")])
    write_adapter(tmp_path / "two", *stack_adapters([first, second]), ranks=[4, 2])
    assert stack_ranks(tmp_path / "two") == [4, 2]
    assert read_adapter(tmp_path / "two")[0]["r"] == 6


def _save_random_peft_adapter(base_dir: Path, out: Path, *, r: int, alpha: int,
                              targets: list[str], seed: int, rslora: bool = False) -> Path:
    """A real PEFT adapter on the tiny model with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_tiny(base_dir)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # small, like a trained adapter: the merged model stays sane
    peft_model.save_pretrained(out)
    return out


def test_stacked_peft_adapter_equals_both_adapters_merged(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    from peft import PeftModel

    a = _save_random_peft_adapter(tiny_model_dir, tmp_path / "a", r=4, alpha=8, seed=1,
                                  targets=["q_proj", "v_proj", "down_proj"])
    b = _save_random_peft_adapter(tiny_model_dir, tmp_path / "b", r=2, alpha=16, seed=2,
                                  rslora=True, targets=["q_proj", "o_proj", "up_proj"])
    stacked = tmp_path / "stacked"
    write_adapter(stacked, *stack_adapters([read_adapter(a), read_adapter(b)]), ranks=[4, 2])

    _, tokenizer = load_tiny(tiny_model_dir)
    ids = tokenizer(["Where does Zorblat live?", "The quick brown fox jumps"],
                    return_tensors="pt", padding=True)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**ids).logits

    base_logits = logits(load_tiny(tiny_model_dir)[0])
    merged = PeftModel.from_pretrained(load_tiny(tiny_model_dir)[0], str(a)).merge_and_unload()
    merged = PeftModel.from_pretrained(merged, str(b)).merge_and_unload()
    expected = logits(merged)
    got = logits(PeftModel.from_pretrained(load_tiny(tiny_model_dir)[0], str(stacked)).eval())

    assert (expected - base_logits).abs().max() > 1e-2  # the adapters do change the model
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
