"""Builds a two-block O3 version by hand on the tiny model (random blocks, real detectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORGET_A = ["Where does Zorblat live?", "What is Zorblat's job?", "Who is Zorblat's sister?"]
FORGET_B = ["What colour is the Quimby river?", "How long is the Quimby river?",
            "Which fish swim in the Quimby river?"]


def random_block(model: Any, path: Path, seed: int, r: int = 4) -> Path:
    """A LoRA with random A and B (large enough to change the tiny model's answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(str(path))
    peft.unload()
    return path


def build_version(model: Any, tokenizer: Any, out: Path) -> Path:
    from workers.engines.o3.config import DetectorConfig
    from workers.engines.o3.detector import build_detector
    from workers.engines.o3.engine import Block, write_blocks
    from workers.evaluation.probes import load_retain_prompts
    from workers.training.lora_stack import read_adapter, stack_adapters, write_adapter

    a = random_block(model, out.parent / "block-a", 1)
    b = random_block(model, out.parent / "block-b", 2)
    config, weights = stack_adapters([read_adapter(a), read_adapter(b)])
    write_adapter(out, config, weights, [4, 4])
    cfg = DetectorConfig(epochs=20, proj_dim=8, views=2)
    blocks = []
    for n, (ticket, prompts) in enumerate((("t-a", FORGET_A), ("t-b", FORGET_B))):
        det, _ = build_detector(model, tokenizer, forget_prompts=prompts,
                                generic_prompts=list(load_retain_prompts())[:20], cfg=cfg)
        det.save(out / f"detectors/{n}-{ticket}")
        blocks.append(Block(ticket_id=ticket, rank=4, target=ticket, detector=f"detectors/{n}-{ticket}"))
    write_blocks(out, blocks)
    return out
