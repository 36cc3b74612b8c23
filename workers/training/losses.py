"""Log-probability and retain losses shared by every unlearning method (pure functions)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.training.data import IGNORE, Batch


def shifted_logits_and_labels(model: Any, batch: Batch) -> tuple[Tensor, Tensor]:
    """Logits predicting each next token and the matching labels: (B, T-1, V), (B, T-1)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits[:, :-1].float(), batch.labels[:, 1:]


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)


def labelled_positions(batch: Batch) -> Tensor:
    """(B, T) True where a position's logits predict a labelled token (the next one)."""
    need = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    need[:, :-1] = batch.labels[:, 1:] != IGNORE
    return need


def labelled_logits(model: Any, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """What `shifted_logits_and_labels` gives at `labels != IGNORE`: logits predicting each
    labelled token, (N, V) in row-major order, those tokens, (N,), and how many each row
    has, (B,), with the output layer run only there. With a large vocabulary and chat
    prompts carrying no loss, the output layer over every position is much of a small
    model's step (forward, backward and the log-softmax over it)."""
    device = next(model.parameters()).device
    need = labelled_positions(batch).to(device)
    logits = model(input_ids=batch.input_ids.to(device),
                   attention_mask=batch.attention_mask.to(device), logits_to_keep=need).logits
    return logits.float(), batch.labels.to(device)[:, 1:][need[:, :-1]], need.sum(-1)


def labelled_nll(model: Any, batch: Batch) -> Tensor:
    """`mean_nll(*shifted_logits_and_labels(model, batch))` via `labelled_logits`."""
    logits, labels, _ = labelled_logits(model, batch)
    return F.cross_entropy(logits, labels)


def labelled_sequence_logp(model: Any, batch: Batch) -> tuple[Tensor, Tensor]:
    """(B,) summed log-probability of each row's labelled tokens and (B,) how many there
    are (at least 1: no division by zero downstream), via `labelled_logits`."""
    logits, labels, counts = labelled_logits(model, batch)
    return row_logp_sums(logits, labels, counts), counts.clamp(min=1)


def row_logp_sums(logits: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """(B,) each row's summed log-probability of its labelled tokens, from the packed
    (N, V) logits, (N,) labels and (B,) counts that `labelled_logits` and
    `frozen_labelled_logits` give."""
    token = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return token.new_zeros(len(counts)).index_add(0, rows, token)


def answer_kl(ref_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(reference || model) per answer token, averaged, both at the same N labelled
    positions in row-major order: ref_logp (N, V) log-probs, logits (N, V) (as
    `labelled_logits` and `frozen_labelled_logits` give them)."""
    logp = torch.log_softmax(logits, -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def frozen_labelled_logits(model: Any, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Logits predicting each labelled token, (N, V) in row-major order, those tokens, (N,),
    and how many each row has, (B,): what `shifted_logits_and_labels` gives at
    `labels != IGNORE`, for a model whose weights do not change (the references, computed
    once before training).

    Cheaper on CPU: the rows' common prefix (the chat template's system turn) runs once,
    and the vocabulary projection (a fifth of a small model's compute) only where a label
    is. Right padding, so every row's prefix is at the same positions.
    """
    from workers.model.shared_prefix import common_prefix_length, prefix_cache, repeat_cache

    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    need = labelled_positions(batch).to(device)
    # The shared prefix ends before any row's first labelled position (its logits are
    # needed) and within every row's real tokens.
    ends = [int(row.nonzero()[0]) + 1 if row.any() else int(n)
            for row, n in zip(need, mask.sum(-1))]
    shared = (common_prefix_length([r[:end] for r, end in zip(ids.tolist(), ends)])
              if len(ids) > 1 else 0)
    with torch.no_grad():
        cache = repeat_cache(prefix_cache(model, ids[:1, :shared]), len(ids)) if shared else None
        positions = torch.arange(shared, ids.shape[1], device=ids.device).expand(len(ids), -1)
        out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=cache is not None,
                    logits_to_keep=need[:, shared:])
    return out.logits.float(), batch.labels.to(device)[:, 1:][need[:, :-1]], need.sum(-1)
