"""The relearning attack: a few fine-tuning steps on part of the forget set.

Knowledge that unlearning only hid comes back after a handful of steps on a few of the
forgotten facts (Hu et al., 2024; Lynch et al., 2024). The attack runs on a copy of the
model with the version's adapter merged in, full-parameter AdamW on the chosen QA pairs;
forgetting is then measured again on the held-out forms of the *other* pairs, so what
comes back was not simply re-taught. torch is imported inside the functions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RelearnConfig:
    """Args:
        steps: optimiser steps on the relearn split (the papers use tens at most).
        lr: AdamW learning rate (full parameters).
        fraction: share of the forget QA pairs used for relearning (at least one, and at
            least one left out to measure on).
    """

    steps: int = 10
    lr: float = 1e-5
    fraction: float = 0.5


def split_for_relearning(qa: Sequence[dict[str, str]], fraction: float
                         ) -> tuple[list[int], list[int]]:
    """(indices to relearn on, indices to measure on); empty when qa has < 2 pairs."""
    if len(qa) < 2:
        return [], []
    count = min(len(qa) - 1, max(1, int(len(qa) * fraction)))
    # Every other pair, so that both halves cover the ticket rather than its first half.
    order = list(range(0, len(qa), 2)) + list(range(1, len(qa), 2))
    learn = sorted(order[:count])
    return learn, [i for i in range(len(qa)) if i not in learn]


def relearned_model(model: Any, tokenizer: Any, qa: Sequence[dict[str, str]],
                    config: RelearnConfig) -> Any:
    """A fine-tuned copy of `model` (a PEFT model is merged first); `model` is untouched."""
    import torch

    from workers.training.data import encode_pairs
    from workers.training.losses import labelled_nll

    attacked = copy.deepcopy(model)
    if hasattr(attacked, "merge_and_unload"):
        attacked = attacked.merge_and_unload()
    attacked.train()
    for p in attacked.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(attacked.parameters(), lr=config.lr)
    batch = encode_pairs(tokenizer, [(i["question"], i["answer"]) for i in qa])
    device = next(attacked.parameters()).device
    batch.input_ids, batch.attention_mask, batch.labels = (
        batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device))
    for _ in range(config.steps):
        loss = labelled_nll(attacked, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    attacked.eval()
    return attacked
