"""Negative Preference Optimization (Zhang et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from workers.methods.registry import register_method


@dataclass(frozen=True)
class NPOConfig:
    """NPO: DPO with only a rejected answer, against the frozen reference model.

    Args:
        beta: inverse temperature; small beta behaves like gradient ascent, large beta
            saturates sooner and so damages the model less.
        retain_weight: weight of the retain term (see the training loop's retain loss).
    """

    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta must be > 0")


@register_method("npo", NPOConfig, needs_reference=True)
def npo_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None, cfg: NPOConfig) -> Tensor:
    # forget_logp, ref_forget_logp: (batch,) summed log-probs of each forget answer.
    if ref_forget_logp is None:
        raise ValueError("NPO needs the reference model's log-probs")
    ratio = forget_logp - ref_forget_logp
    return -(2.0 / cfg.beta) * F.logsigmoid(-cfg.beta * ratio).mean()
