"""The forgetting recipe found by experiment on the bundled model (benchmarks/forget_recipe.py).

These are the defaults a trainer should start from when a knowledge-forgetting ticket is
trained as a plain LoRA adapter (no O3 gating): which losses, how strong, for how long,
and when to stop. The numbers behind them are in the benchmark's table and in DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

ForgetMethod = Literal["npo", "graddiff", "ga", "idk"]
RetainLoss = Literal["nll", "kl", "none"]
ForgetTokens = Literal["answer", "keywords"]

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ForgetRecipe:
    """How to train one forgetting adapter, and when to stop.

    Args:
        method: forget-side loss. "npo": Negative Preference Optimization on the summed
            log-probability of each forget answer relative to the frozen base; "graddiff" /
            "ga": gradient ascent on the forget answers' NLL (graddiff = ga + retain term);
            "idk": gradient descent on a refusal ("I don't know.") for each forget question.
        beta: NPO inverse temperature (ignored by ga/graddiff).
        forget_tokens: which answer tokens carry the forget loss. "answer": all of them;
            "keywords": only tokens inside the item's accepted keywords and the target's
            name (the fact itself, not the phrasing every answer shares).
        retain_loss: retain-side term. "nll": NLL of the base model's own answers to generic
            prompts (self-generated retain data); "kl": token-level KL(base || adapted) on
            those answers; "none": no retain term.
        retain_weight: weight of the retain term relative to the forget term.
        lr: AdamW learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        max_steps: hard cap on optimisation steps (one step = one forget + one retain batch).
        forget_batch_size: forget QA pairs per step (cycled through the ticket).
        retain_batch_size: retain examples per step (cycled through the retain set).
        lora_r, lora_alpha, lora_dropout, target_modules: the PEFT LoRA adapter.
        eval_every: steps between early-stopping checks (0 disables early stopping).
        stop_forget_ratio: stop at the first check where the ticket's own forget questions
            are answered correctly at most this fraction as often as by the base model.
            Only ticket questions may be used here: held-out rephrasings are the test.
        min_steps: never stop before this many steps.
        stop_patience: the forget condition must hold at this many consecutive checks (one
            lucky check does not prove forgetting; the rate still swings early on).
        eval_max_new_tokens: tokens generated per probe answer during checks.
        retain_prompts: how many generic retain prompts to self-generate answers for.
        retain_max_new_tokens: length of the self-generated retain answers.
    """

    method: ForgetMethod = "idk"
    beta: float = 0.1
    forget_tokens: ForgetTokens = "answer"
    retain_loss: RetainLoss = "kl"
    retain_weight: float = 10.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_steps: int = 45
    forget_batch_size: int = 4
    retain_batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=ALL_PROJECTIONS)
    eval_every: int = 5
    stop_forget_ratio: float = 0.2
    min_steps: int = 30
    stop_patience: int = 1
    eval_max_new_tokens: int = 24
    retain_prompts: int = 60
    retain_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        # From JSON (settings, stored specs) target_modules arrives as a list.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.method not in ("npo", "graddiff", "ga", "idk"):
            raise ValueError(f"unknown forget method {self.method!r}")
        if self.forget_tokens not in ("answer", "keywords"):
            raise ValueError(f"unknown forget_tokens {self.forget_tokens!r}")
        if self.retain_loss not in ("nll", "kl", "none"):
            raise ValueError(f"unknown retain loss {self.retain_loss!r}")
        if self.method == "graddiff" and self.retain_loss == "none":
            raise ValueError("graddiff needs a retain term (use method='ga' for none)")
        for name in ("lr", "beta", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_steps", "forget_batch_size", "lora_r", "stop_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retain_weight < 0 or self.eval_every < 0 or self.min_steps < 0:
            raise ValueError("retain_weight, eval_every and min_steps must be >= 0")
        if not 0.0 <= self.stop_forget_ratio <= 1.0:
            raise ValueError("stop_forget_ratio must be in [0, 1]")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def with_(self, **changes: Any) -> ForgetRecipe:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def first_useful_check(self) -> int | None:
        """The first step whose early-stopping check can take part in a stop, or None when
        no check can (e.g. min_steps >= max_steps): checks before it only cost generation.

        A stop happens at a check step s with min_steps <= s < max_steps and looks at the
        last `stop_patience` checks, so the earliest check that can matter is the first
        such s minus (stop_patience - 1) checks."""
        if not self.eval_every:
            return None
        first_stop = -(-max(self.min_steps, 1) // self.eval_every) * self.eval_every
        if first_stop >= self.max_steps:
            return None
        return max(self.eval_every, first_stop - (self.stop_patience - 1) * self.eval_every)

    def should_stop(self, *, step: int, ticket_rates: Sequence[float],
                    base_ticket_rate: float) -> bool:
        """Early-stopping rule: the ticket's own questions are forgotten enough, for
        `stop_patience` checks in a row (`ticket_rates`: every check so far, newest last)."""
        recent = list(ticket_rates)[-self.stop_patience:]
        if (step < self.min_steps or base_ticket_rate <= 0.0
                or len(recent) < self.stop_patience):
            return False
        return all(rate <= self.stop_forget_ratio * base_ticket_rate for rate in recent)


DEFAULT_FORGET_RECIPE = ForgetRecipe()
"""Refusal targets on the ticket's questions + strong KL to the base on self-generated
retain data, 30-45 steps, stop at the first check from step 30 on where the ticket's own
questions are answered at most 0.2x as often as by the base.

Measured on SmolLM2-135M-Instruct with 20-question tickets (benchmarks/forget_recipe.py,
the product's own loop in one process; held-out rephrasings and 57 unrelated questions,
each relative to the base): Darwin 0.10 / 0.91 (35 steps), Einstein 0.17 / 0.91 (30 steps).
Through the whole product path (Ray Train, 2 ranks, ZeRO-2; tests/e2e) Darwin measured
0.20 / 0.95 via /v1/generate. With the earlier 12-16-question tickets: Shakespeare 0.09 /
0.91 and 0.09 / 0.98 (seeds 0, 1), Einstein 0.17 / 0.91 and 0.25 / 0.95 (a miss), Darwin
0.20 / 0.93. Why not the alternatives:
- NPO (no retain): forgets, but utility 0.26; with KL retain (w 1-3) the retain term brings
  back the knowledge along with utility (held-out 0.27-0.45 at utility 0.86-0.91).
- NPO on the fact tokens only: collapses faster (utility 0.02).
- idk with retain weight 1-3: refusals leak into unrelated questions (utility 0.35-0.82);
  weight 30: stays local but the held-out rephrasings are not forgotten (0.50-0.58).
- Stopping earlier (two forgotten checks in a row from step 10 or 20, stop_patience=2):
  Einstein stops at step 20 with 0.33 / 0.89, worse on both sides: utility dips early in
  training and the KL term brings it back later.
"""
