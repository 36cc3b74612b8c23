"""Negative Preference Optimization (Zhang et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from workers.methods.registry import register_method
from workers.methods.terms import plus_retain


@dataclass(frozen=True)
class NPOConfig:
    """NPO: DPO with only a rejected answer, against the frozen reference model.

    The reference is the model the adapter starts from (base, plus the lineage's earlier
    versions merged in): the trained LoRA with its adapter disabled.

    Args:
        beta: inverse temperature; small beta behaves like gradient ascent, large beta
            saturates sooner and so damages the model less.
        retain_weight: weight of the job's retain term (NLL or KL to the reference on
            retain text, as the job's recipe says); 0 disables it.
    """

    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.retain_weight < 0:
            raise ValueError("retain_weight must be >= 0")


def npo_forget_term(policy_logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (log pi - log pi_ref)); starts at (2/beta) log 2."""
    # policy_logp, ref_logp: (B,) summed log-probs of each forget answer.
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logp - ref_logp)).mean()


@register_method("npo", NPOConfig, needs_reference=True)
def npo_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None,
             retain_loss: Tensor | None, cfg: NPOConfig) -> Tensor:
    if ref_forget_logp is None:
        raise ValueError("NPO needs the reference model's log-probs")
    return plus_retain(npo_forget_term(forget_logp, ref_forget_logp, cfg.beta), retain_loss,
                       cfg.retain_weight)
