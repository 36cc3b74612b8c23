"""Revoking one request of an O3 version: drop its block and its detector, no training.

The stored adapter is the exact stack of the requests' blocks (rows of A, columns of B per
request, ranks in oblivio_stack.json), so removing request i means removing its rows and
columns; every other block, and so every other request's forgetting, is untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from workers.engines.base import Artifacts
from workers.engines.o3.engine import ADAPTER_FILES, DETECTORS, O3_FILE, read_blocks, write_blocks
from workers.training.lora_stack import read_adapter, write_adapter


def _scale(config: dict) -> float:
    r = config["r"]
    alpha = config.get("lora_alpha", r)
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def remove_block(version_dir: Path, *, ticket_id: str, output_dir: Path) -> Artifacts:
    """Write `version_dir` without `ticket_id`'s block into `output_dir`."""
    if not (version_dir / O3_FILE).is_file():
        raise ValueError(f"{version_dir} is not an O3 version (no {O3_FILE})")
    blocks = read_blocks(version_dir)
    index = next((i for i, b in enumerate(blocks) if b.ticket_id == ticket_id), None)
    if index is None:
        raise ValueError(f"ticket {ticket_id} has no block in this version")
    kept = blocks[:index] + blocks[index + 1:]
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        (output_dir / name).unlink(missing_ok=True)
    config: dict | None = None
    if kept:
        config, weights = read_adapter(version_dir)
        start = sum(b.rank for b in blocks[:index])
        keep = torch.cat([torch.arange(0, start),
                          torch.arange(start + blocks[index].rank, config["r"])])
        scale = _scale(config)
        out = {}
        for key, w in weights.items():
            if ".lora_A." in key:
                out[key] = w[keep].contiguous()               # (R', d_in)
            elif ".lora_B." in key:
                # Scale folded into B so that the smaller stack keeps alpha == r (scale 1).
                out[key] = (w[:, keep].float() * scale).contiguous()
            else:
                out[key] = w
        total = int(keep.numel())
        config = {**config, "r": total, "lora_alpha": total, "use_rslora": False,
                  "rank_pattern": {}, "alpha_pattern": {}}
        write_adapter(output_dir, config, out, [b.rank for b in kept])
    shutil.rmtree(output_dir / DETECTORS, ignore_errors=True)
    for block in kept:
        if block.detector:
            shutil.copytree(version_dir / block.detector, output_dir / block.detector)
    write_blocks(output_dir, kept)
    return Artifacts(version_dir=output_dir,
                     metrics={"revoked_ticket": ticket_id, "blocks": len(kept)},
                     method_config={"engine": "o3", "revoked": ticket_id},
                     peft_config=config)
