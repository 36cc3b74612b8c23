"""Training one prefix: layer group k learns the records of slices 1..k, groups 1..k-1 frozen.

The model is the base plus LoRA on the layers of groups 1..k (top layers first); the
frozen groups carry the weights of the earlier prefixes' checkpoints, the new group starts
from PEFT's initialisation (B = 0, so it starts as a no-op). Only group k is given to the
optimiser, through the same TrainingStrategy seam as every other training in oblivio: on
the DeepSpeed ranks (rank_task.py) or in one plain process.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engines.s3t.config import S3TConfig

GROUP_WEIGHTS = "group.safetensors"
GROUP_META = "group.json"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TrainRecord:
    """A record's content as training sees it: a chat turn, or a plain text (prompt None)."""

    record_id: str
    prompt: str | None
    response: str


def steps_for(cfg: S3TConfig, n_records: int) -> int:
    return cfg.epochs * max(1, -(-n_records // cfg.batch_size)) if n_records else 0


def lora_config(cfg: S3TConfig, layers: Sequence[int]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.target_modules),
                      layers_to_transform=sorted(layers), layers_pattern="layers",
                      task_type="CAUSAL_LM")


def layer_of(key: str) -> int:
    match = _LAYER.search(key)
    if match is None:
        raise ValueError(f"LoRA weight {key!r} names no layer")
    return int(match.group(1))


def train_prefix(model: Any, tokenizer: Any, *, cfg: S3TConfig,
                 frozen: Sequence[dict[str, Any]], layers: Sequence[int],
                 records: Sequence[TrainRecord], seed: int, strategy: Any,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one group on `model` (which gains LoRA layers); returns the group's LoRA
    weights in PEFT's saved key format."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    from workers.training.data import encode_pairs, end_of_turn
    from workers.training.losses import labelled_nll

    frozen_weights: dict[str, Any] = {}
    for group in frozen:
        frozen_weights.update(group)
    frozen_layers = {layer_of(k) for k in frozen_weights}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(cfg, sorted(frozen_layers | set(layers))))
    if frozen_weights:
        result = set_peft_model_state_dict(peft_model, frozen_weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"frozen group weights did not load: {missing[:3]}")
    mine = set(layers)
    for name, param in peft_model.named_parameters():
        param.requires_grad = "lora_" in name and layer_of(name) in mine
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trained = strategy.setup(peft_model, params)
    eot = end_of_turn(tokenizer)
    pairs = [(r.prompt, r.response + (eot if r.prompt is not None else "")) for r in records]
    rng = random.Random(seed)
    trained.train()
    step = 0
    for _epoch in range(cfg.epochs if pairs else 0):
        order = list(pairs)
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            # Data parallel: each rank its share of the batch (all ranks take every step;
            # a rank left without a share repeats the batch's first record).
            chunk = order[i:i + cfg.batch_size]
            batch = encode_pairs(tokenizer, chunk[strategy.rank::strategy.world_size]
                                 or chunk[:1])
            loss = labelled_nll(trained, batch)
            strategy.backward_and_step(loss)
            step += 1
            if progress is not None:
                progress(step)
    trained.eval()
    state = strategy.trainable_state_dict(trained)
    weights = {k.replace(".default.", "."): v.detach().cpu().float().contiguous()
               for k, v in state.items()}
    if not weights:  # nothing to learn (an empty prefix): the group is PEFT's no-op init
        weights = {k.replace(".default.", "."): v.detach().cpu().float().contiguous()
                   for k, v in peft_model.state_dict().items()
                   if "lora_" in k and layer_of(k) in mine}
    return weights


def write_group(path: Path, weights: dict[str, Any], meta: dict[str, Any]) -> Path:
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / GROUP_WEIGHTS))
    (path / GROUP_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def read_group(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / GROUP_WEIGHTS))
