"""GradDiff: gradient ascent on the forget set, gradient descent on the retain set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.methods.registry import register_method


@dataclass(frozen=True)
class GradDiffConfig:
    """Gradient difference (Liu et al., 2022; the TOFU baseline).

    Args:
        retain_weight: weight of the retain term against the ascent term. Retain data is
            the ticket's retain set, or text the base model itself generates for generic
            prompts when the ticket has none.
    """

    retain_weight: float = 1.0


@register_method("graddiff", GradDiffConfig)
def graddiff_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None,
                  cfg: GradDiffConfig) -> Tensor:
    # The retain descent term is added by the training loop (shared by every method).
    return (forget_logp / forget_tokens).mean()
