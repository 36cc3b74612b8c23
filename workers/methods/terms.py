"""Loss pieces more than one method is built from."""

from __future__ import annotations

from torch import Tensor


def per_token_logp(forget_logp: Tensor, forget_tokens: Tensor) -> Tensor:
    """(B,) mean log-prob per answer token: long and short answers pull equally."""
    return forget_logp / forget_tokens


def plus_retain(loss: Tensor, retain_loss: Tensor | None, retain_weight: float) -> Tensor:
    """`loss` plus the job's weighted retain term, when the job has one and it weighs > 0."""
    if retain_loss is not None and retain_weight > 0:
        return loss + retain_weight * retain_loss
    return loss
