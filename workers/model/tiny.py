"""Tiny random-weight Llama models for fast tests and smoke runs (never for serving)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_tiny_llama(dest: Path, *, tokenizer_from: Path, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """Save a random tiny Llama with a real tokenizer (so chat templates work) to `dest`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
