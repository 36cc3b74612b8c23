"""Stack LoRA adapters into one standard PEFT adapter, exactly.

Version N of a lineage must act as base + v1 + ... + vN. LoRA deltas add up, and a sum of
LoRAs is itself a LoRA of the summed rank: with B_i (out, r_i), A_i (r_i, in), scale s_i,

    sum_i s_i B_i A_i  =  [s_1 B_1, ..., s_n B_n] @ [A_1; ...; A_n]   (scale 1: alpha = r)

so each version is stored as one ordinary adapter (loadable by any PEFT user) while the
rows of A stay separate per request, which is what orthogonality constraints look at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Which rows of the stacked A matrices came from which request (ranks in stacking order).
STACK_FILE = "oblivio_stack.json"


def stack_ranks(path: Path) -> list[int]:
    """Ranks of the requests stacked in the adapter at `path` (one entry if never stacked)."""
    stack = path / STACK_FILE
    if stack.is_file():
        return list(json.loads(stack.read_text())["ranks"])
    return [json.loads((path / ADAPTER_CONFIG).read_text())["r"]]


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    return (json.loads((path / ADAPTER_CONFIG).read_text()),
            load_file(str(path / ADAPTER_WEIGHTS)))


def write_adapter(path: Path, config: dict[str, Any], weights: dict[str, Tensor],
                  ranks: list[int] | None = None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / ADAPTER_WEIGHTS))
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / STACK_FILE).write_text(json.dumps({"ranks": ranks or [config["r"]]}))


def _scale(config: dict[str, Any]) -> float:
    r = config["r"]
    alpha = config.get("lora_alpha", r)
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def stack_adapters(adapters: list[tuple[dict[str, Any], dict[str, Tensor]]]
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One adapter equal to the sum of `adapters` (same base model, LoRA on linear layers)."""
    if not adapters:
        raise ValueError("nothing to stack")
    # (in_features, out_features) of every LoRA'd module, from whichever adapter has it.
    shapes: dict[str, tuple[int, int]] = {}
    for _, weights in adapters:
        for key, a in weights.items():
            if ".lora_A." in key:
                prefix = key.split(".lora_A.")[0]
                shapes[prefix] = (a.shape[1], weights[key.replace(".lora_A.", ".lora_B.")].shape[0])
    # PEFT has one rank per adapter, so a module that some adapter did not touch gets zero
    # blocks of that adapter's rank.
    ranks = [cfg["r"] for cfg, _ in adapters]
    total_r = sum(ranks)
    out: dict[str, Tensor] = {}
    for prefix, (n_in, n_out) in sorted(shapes.items()):
        a_blocks, b_blocks = [], []
        for (cfg, weights), r in zip(adapters, ranks):
            a = weights.get(f"{prefix}.lora_A.weight")
            if a is None:
                a_blocks.append(torch.zeros(r, n_in))
                b_blocks.append(torch.zeros(n_out, r))
            else:
                a_blocks.append(a.float())
                b_blocks.append(weights[f"{prefix}.lora_B.weight"].float() * _scale(cfg))
        out[f"{prefix}.lora_A.weight"] = torch.cat(a_blocks, 0)  # (total_r, in)
        out[f"{prefix}.lora_B.weight"] = torch.cat(b_blocks, 1)  # (out, total_r)
    base_config = dict(adapters[-1][0])
    targets = sorted({t for cfg, _ in adapters for t in _targets(cfg)})
    base_config.update(r=total_r, lora_alpha=total_r, use_rslora=False, target_modules=targets,
                       rank_pattern={}, alpha_pattern={})
    return base_config, out


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)
