"""GradDiff: gradient ascent on the forget set, gradient descent on the retain set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.methods.registry import register_method
from workers.methods.terms import per_token_logp


@dataclass(frozen=True)
class GradDiffConfig:
    """Gradient difference (Liu et al., 2022; the TOFU baseline).

    Args:
        forget_weight: weight of the ascent term on the forget answers.
        retain_weight: weight of the retain term. Retain data is the ticket's retain set,
            or text the base model itself generates for generic prompts when it has none.
    """

    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.forget_weight <= 0 or self.retain_weight <= 0:
            raise ValueError("forget_weight and retain_weight must be > 0 "
                             "(use method 'ga' for ascent alone)")


@register_method("graddiff", GradDiffConfig)
def graddiff_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None,
                  retain_loss: Tensor | None, cfg: GradDiffConfig) -> Tensor:
    if retain_loss is None:
        raise ValueError("GradDiff needs a retain term (the job has none)")
    return (cfg.forget_weight * per_token_logp(forget_logp, forget_tokens).mean()
            + cfg.retain_weight * retain_loss)
