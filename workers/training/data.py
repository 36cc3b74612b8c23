"""Training data for unlearning: chat-formatted QA pairs with the loss on the answer only.

The prompt side is formatted exactly as generation formats it (workers.model.format_chat),
so what the adapter learns applies to the questions users actually ask.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IGNORE = -100


@dataclass
class Batch:
    input_ids: Tensor       # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor          # (B, T), IGNORE outside the answer tokens


def end_of_turn(tokenizer: Any) -> str:
    """The text that closes an assistant turn (so an answer also teaches where to stop)."""
    return tokenizer.eos_token or ""


def keyword_token_mask(tokenizer: Any, answer: str, keywords: Sequence[str]) -> list[bool] | None:
    """Which answer tokens overlap a keyword (case-insensitive); None if no keyword occurs."""
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    low = answer.lower()
    spans = []
    for k in keywords:
        start = low.find(k.lower())
        while k and start != -1:
            spans.append((start, start + len(k)))
            start = low.find(k.lower(), start + 1)
    if not spans:
        return None
    return [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str | None, str]],
                 keywords: dict[str, Sequence[str]] | None = None, max_tokens: int = 256
                 ) -> Batch:
    """Chat-formatted (question, answer) pairs, right-padded; loss only on the answer.

    A pair whose question is None is a plain text (no chat turn), the loss on all of it.
    With `keywords` (question -> words) only the answer tokens inside those words carry the
    loss: forgetting then pushes down the fact, not the phrasing every answer shares.
    """
    from workers.model import format_chat

    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    for question, answer in pairs:
        p_ids = ([] if question is None else
                 tokenizer(format_chat(tokenizer, question), add_special_tokens=False)["input_ids"])
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_tokens]
        a_labels = list(a_ids)
        if keywords is not None:
            mask = keyword_token_mask(tokenizer, answer, keywords.get(question or "", ()))
            if mask is not None:
                a_labels = [t if m else IGNORE for t, m in zip(a_ids, mask)]
        rows.append(p_ids + a_ids)
        label_rows.append([IGNORE] * len(p_ids) + a_labels)
    return _pad(tokenizer, rows, label_rows)


def _pad(tokenizer: Any, rows: list[list[int]], label_rows: list[list[int]]) -> Batch:
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (r, lr) in enumerate(zip(rows, label_rows)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(r)] = torch.tensor(lr)
    return Batch(ids, mask, labels)


def cycle_batches(items: Sequence[Any], size: int, seed: int) -> Iterator[list[Any]]:
    """Endless shuffled batches of exactly `size` items (topped up from the epoch's start)."""
    rng = random.Random(seed)
    size = max(1, min(size, len(items)))
    while True:
        order = list(items)
        rng.shuffle(order)
        for i in range(0, len(order), size):
            chunk = order[i:i + size]
            if len(chunk) < size:
                chunk += order[:size - len(chunk)]
            yield chunk


def shard_for_rank(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """Data parallelism over a tiny forget set: every rank gets at least one item."""
    mine = items[rank::world_size]
    return mine or items[rank % len(items):rank % len(items) + 1]


def self_generated_retain(*, model: Any, tokenizer: Any, prompts: Sequence[str],
                          max_new_tokens: int, cache_dir: Path, model_key: str
                          ) -> list[tuple[str, str]]:
    """The model's own greedy answers to generic prompts, cached per model (`model_key`).

    Retaining them keeps the model's behaviour on ordinary requests without needing any
    retain data from the ticket (O3's "no retain data" setting). The cache maps prompt ->
    answer, so each rank can generate just its own share of the prompts, and ranks writing
    at the same time merge their answers instead of overwriting each other's.
    """
    path = _retain_cache_path(cache_dir, model_key, max_new_tokens)
    cached = _read_json_dict(path)
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        from workers.evaluation.generation import generate_texts

        # Before DeepSpeed takes the weights, so ranks need not decode in step (ZeRO-3).
        answers = generate_texts(model, tokenizer, missing, [max_new_tokens] * len(missing))
        end = end_of_turn(tokenizer)
        fresh = {}
        for prompt, answer in zip(missing, answers):
            n_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            # A complete answer also teaches where to stop; a cut one must not end the turn.
            fresh[prompt] = answer + end if n_tokens < max_new_tokens - 1 else answer
        cached = _merge_json_dict(path, fresh)
    return [(p, cached[p]) for p in prompts]


def _retain_cache_path(cache_dir: Path, model_key: str, max_new_tokens: int) -> Path:
    key = hashlib.sha256(json.dumps([model_key, max_new_tokens]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"retain-{key}.json"


def _read_json_dict(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _merge_json_dict(path: Path, fresh: dict[str, str]) -> dict[str, str]:
    """Add `fresh` to the file (re-read just before writing) and return the merged dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_json_dict(path), **fresh}
    # A private temp name per process, then an atomic replace: readers never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, ensure_ascii=False, sort_keys=True))
    tmp.replace(path)
    return merged


def drop_mentions(pairs: Sequence[tuple[str, str]], target: str | None
                  ) -> list[tuple[str, str]]:
    """Retain pairs that mention the target would fight the forgetting: leave them out."""
    if not target:
        return list(pairs)
    names = {target.lower()} | {w.lower() for w in target.split() if len(w) > 3}
    return [(q, a) for q, a in pairs if not any(n in f"{q} {a}".lower() for n in names)]
