"""IDK: teach a refusal for each forget question (descent, not ascent).

Unlike ascent it cannot blow the model up, but without a retain term or gating it spreads
the refusal to unrelated questions too (DESIGN.md, "Measured on the bundled model").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from workers.methods.registry import register_method
from workers.methods.terms import per_token_logp, plus_retain

REFUSALS = (
    "I'm sorry, but I don't know the answer to that.",
    "I don't know.",
    "I'm not sure. I don't have that information.",
    "Sorry, I can't answer that question.",
)


@dataclass(frozen=True)
class IDKConfig:
    """Refusal targets for the forget questions (the TOFU "IDK" baseline).

    Args:
        refusals: the refusal answers; each question always gets the same one (chosen by
            its hash), so every epoch pulls towards one target.
        retain_weight: weight of the job's retain term; 0 disables it.
    """

    refusals: tuple[str, ...] = REFUSALS
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        # JSON options arrive as lists; keep the config hashable and immutable.
        object.__setattr__(self, "refusals", tuple(self.refusals))
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            raise ValueError("refusals must be a non-empty list of non-empty strings")
        if self.retain_weight < 0:
            raise ValueError("retain_weight must be >= 0")


def refusal_for(cfg: IDKConfig, question: str, answer: str) -> str:
    digest = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    return cfg.refusals[digest % len(cfg.refusals)]


@register_method("idk", IDKConfig, answer_for=refusal_for)
def idk_loss(*, forget_logp: Tensor, forget_tokens: Tensor, ref_forget_logp: Tensor | None,
             retain_loss: Tensor | None, cfg: Any) -> Tensor:
    # forget_logp here is the log-prob of the refusal: descend its per-token NLL.
    return plus_retain(-per_token_logp(forget_logp, forget_tokens).mean(), retain_loss,
                       cfg.retain_weight)
