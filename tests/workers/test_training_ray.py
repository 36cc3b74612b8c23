"""The product training path: Ray Train workers as DeepSpeed ZeRO ranks (2 CPU workers, gloo)
on the tiny model, writing one standard PEFT adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.fixtures.training import forget_nll, load_tiny
from workers.training.lora_stack import read_adapter, stack_ranks

LORA_SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
               "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}  # (in, out)


def _check_full_lora_shapes(weights: dict[str, torch.Tensor], r: int) -> None:
    assert len(weights) == 2 * 2 * 7  # A and B, 2 layers, 7 projections
    for key, w in weights.items():
        n_in, n_out = LORA_SHAPES[key.split(".lora_")[0].rsplit(".", 1)[1]]
        assert tuple(w.shape) == ((r, n_in) if ".lora_A." in key else (n_out, r)), key


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ray_deepspeed_training_writes_a_loadable_adapter(zero_stage: int, ray_cluster, make_spec,
                                                          tiny_model_dir: Path) -> None:
    from peft import PeftModel

    from workers.training.runner import train_unlearning_adapter

    updates: list[dict] = []
    # Threshold 0: all but the embedding of the tiny model is below DeepSpeed's default (1e5).
    spec = make_spec("npo", recipe={"lr": 1e-2}, zero_stage=zero_stage, num_workers=2,
                     zero3_persistence_threshold=0)
    result = train_unlearning_adapter(spec, updates.append)

    metrics = result.metrics
    assert metrics["steps"] == 4 and not metrics["stopped_early"]
    assert len(metrics["losses"]) == 4 and all(math.isfinite(x) for x in metrics["losses"])
    assert [s for s, _ in metrics["ticket_rates"]] == [2]  # eval_every=2, not at the last step
    local, full = metrics["params_local"], metrics["params_full"]
    if zero_stage == 3:
        assert 0 < local < full  # ZeRO-3 really partitioned the parameters across the ranks
        assert local <= full / 2 + 1024
    else:
        assert local == full
    # Progress reached the driver, including the last step (drained after the run ends).
    assert [u["step"] for u in updates if "loss" in u] == [1, 2, 3, 4]
    assert all(u["max_steps"] == 4 for u in updates)

    out = result.adapter_dir
    assert out == Path(spec.output_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config, weights = read_adapter(out)
    assert config["r"] == 8 and stack_ranks(out) == [8]
    # Gathered from the ZeRO-3 shards: every LoRA matrix has its full shape, and B trained.
    _check_full_lora_shapes(weights, 8)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)

    base, tokenizer = load_tiny(tiny_model_dir)
    before = forget_nll(base, tokenizer)
    after = forget_nll(PeftModel.from_pretrained(base, str(out)), tokenizer)
    assert after > before + 0.05, (before, after)  # the forget answers got less likely


def test_ray_training_on_a_parent_adapter_stacks_both(ray_cluster, make_spec,
                                                      tiny_model_dir: Path) -> None:
    from peft import PeftModel

    from workers.training.runner import train_plain, train_unlearning_adapter

    parent = train_plain(make_spec("ga", out="parent", recipe={"lora_r": 4, "lora_alpha": 8,
                                                               "eval_every": 0}))
    spec = make_spec("npo", out="child", recipe={"eval_every": 0},
                     parent_adapter_dir=str(parent.adapter_dir), zero_stage=2, num_workers=2)
    result = train_unlearning_adapter(spec)

    assert result.metrics["steps"] == 4
    assert result.peft_config["r"] == result.peft_config["lora_alpha"] == 12
    assert stack_ranks(result.adapter_dir) == [4, 8]
    _, weights = read_adapter(result.adapter_dir)
    _check_full_lora_shapes(weights, 12)
    # The parent's rows come first, unchanged (its B carries its scale alpha/r = 2).
    _, parent_weights = read_adapter(parent.adapter_dir)
    for key, w in parent_weights.items():
        if ".lora_A." in key:
            assert torch.equal(weights[key][:4], w)
        else:
            assert torch.allclose(weights[key][:, :4], 2 * w)
    # Loads as one ordinary PEFT adapter.
    base, tokenizer = load_tiny(tiny_model_dir)
    assert math.isfinite(forget_nll(PeftModel.from_pretrained(base, str(result.adapter_dir)),
                                    tokenizer))


def test_bad_method_options_are_refused_before_any_worker_starts(make_spec) -> None:
    from storage.errors import InvalidRequest
    from workers.training.runner import train_plain, train_unlearning_adapter

    # No ray_cluster here: the refusal must come before Ray is touched at all.
    spec = make_spec("npo", method_options={"bogus": 1})
    for train in (train_unlearning_adapter, train_plain):
        with pytest.raises(InvalidRequest, match="bogus"):
            train(spec)
    texts = make_spec("idk", forget_texts=["a b c"], forget_qa=[])
    with pytest.raises(InvalidRequest, match="no sentence or word"):
        train_unlearning_adapter(texts)
    assert not Path(spec.output_dir).exists()


def test_warm_ranks_train_the_same_adapter_as_ray_train_and_stay_up(ray_cluster,
                                                                   make_spec) -> None:
    """The warm pool runs the same rank code: same losses and weights as a Ray Train run
    (same seed), and its ranks serve the next job without starting again."""
    from workers.training import warm_pool
    from workers.training.runner import train_unlearning_adapter

    def spec(name: str):
        return make_spec("npo", out=name, recipe={"lr": 1e-2}, zero_stage=2, num_workers=2)

    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    try:
        reference = train_unlearning_adapter(spec("ray-train"))
        warm = train_unlearning_adapter(spec("warm-1"), warm=True)
        ranks = list(warm_pool.warm_pool(2).ranks)
        again = train_unlearning_adapter(spec("warm-2"), warm=True)
        assert warm_pool.warm_pool(2).ranks == ranks  # the same actors, no new start-up
        # DeepSpeed's shared-memory all-reduce buffers (memory, ~67 MB a rank) have no name
        # left in /dev/shm: one left behind by each pool of ranks would fill the machine's
        # memory over a service's life.
        assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    finally:
        warm_pool.shutdown_pools()
    assert warm.metrics["warm_ranks"] is True
    assert warm.metrics["losses"] == reference.metrics["losses"] == again.metrics["losses"]
    _, ref_weights = read_adapter(reference.adapter_dir)
    _, warm_weights = read_adapter(warm.adapter_dir)
    assert ref_weights.keys() == warm_weights.keys()
    assert all(torch.equal(ref_weights[k], warm_weights[k]) for k in ref_weights)
