"""Gradient ascent (GA): raise the NLL of the forget answers. The simplest baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.methods.registry import register_method
from workers.methods.terms import per_token_logp, plus_retain


@dataclass(frozen=True)
class GAConfig:
    """Gradient ascent on the forget set (Jang et al., 2023).

    Args:
        retain_weight: weight of the job's retain term, if it has one (0: pure ascent, which
            collapses the model quickly; early stopping is then what saves utility).
    """

    retain_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.retain_weight < 0:
            raise ValueError("retain_weight must be >= 0")


@register_method("ga", GAConfig)
def ga_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None,
            retain_loss: Tensor | None, cfg: GAConfig) -> Tensor:
    # Minimising +log-prob is ascent on the NLL.
    return plus_retain(per_token_logp(forget_logp, forget_tokens).mean(), retain_loss,
                       cfg.retain_weight)
