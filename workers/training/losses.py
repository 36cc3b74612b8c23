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


def sequence_logp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) summed log-probability of the labelled tokens, and (B,) how many there are."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1).clamp(min=1)


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)


def answer_kl(ref_logp: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """KL(reference || model) per answer token, averaged.

    ref_logp: (N, V) reference log-probs at the N labelled positions, in row-major order.
    """
    logp = torch.log_softmax(logits[labels != IGNORE], -1)  # (N, V)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
