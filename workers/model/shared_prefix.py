"""A batch's common token prefix, run through the model once.

Every chat-formatted prompt starts with the same system turn (about 24 tokens of a ~41-token
probe question for SmolLM2). When the model's weights are fixed for the whole batch (the
evaluation's decoding, the training references) its keys and values are the same for every
row, so they are computed for one row and shared as views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each at least one of its own (whose logits
    the caller needs)."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def prefix_cache(model: Any, prefix_ids: Any) -> Any:
    """The KV cache of one row of prefix tokens, (1, P), at positions 0..P-1."""
    import torch

    return model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                 use_cache=True, logits_to_keep=1).cache


def repeat_cache(cache: Any, rows: int) -> Any:
    """`cache` (one row) as a cache of `rows` identical rows, without copying."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.expand(rows, -1, -1, -1),
                          layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers])


def branch_cache(cache: Any, length: int | None = None, rows: Any = None) -> Any:
    """A new cache over the same tensors (its first `length` positions, default all; the
    batch `rows`, an index tensor, default all): what a forward appends to it (a
    concatenation, new tensors) leaves `cache` as it was, so several continuations can
    share one prefill."""
    from transformers import DynamicCache

    cut = slice(None, length)
    pick = slice(None) if rows is None else rows
    return DynamicCache([(layer.keys[pick, :, cut], layer.values[pick, :, cut])
                         for layer in cache.layers])
