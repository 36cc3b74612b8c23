"""Gradient ascent (GA): raise the NLL of the forget answers. The simplest baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.methods.registry import register_method


@dataclass(frozen=True)
class GAConfig:
    """Gradient ascent on the forget set.

    Args:
        retain_weight: weight of the retain term (0: pure ascent, which collapses the model
            quickly; the job's early stopping is then what saves utility).
    """

    retain_weight: float = 0.0


@register_method("ga", GAConfig)
def ga_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None, cfg: GAConfig) -> Tensor:
    # forget_logp: (batch,) summed log-probs of each answer; per token, so long and short
    # answers pull equally. Ascent on the NLL = descent on +log-prob.
    return (forget_logp / forget_tokens).mean()
