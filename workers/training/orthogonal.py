"""A regulariser keeping a new LoRA's A rows orthogonal to frozen, earlier A rows.

Generic (O-LoRA, O3): the job names an adapter whose A matrices are frozen references
(`TrainJobSpec.orthogonal_to_adapter`), and the loss gains
`weight * sum_modules ||A_frozen A_new^T||_F^2`.

The penalty is computed inside a forward pre-hook of each trainable lora_A module: hooks
added after DeepSpeed's own run after ZeRO-3 has gathered the module's parameters, so the
full A is visible (and its gradient flows back through DeepSpeed's usual path) on every
strategy, partitioned or not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def orthogonality_penalty(a_old: Tensor, a_new: Tensor) -> Tensor:
    """||A_old A_new^T||_F^2: A_old (r_old, d_in) frozen rows, A_new (r_new, d_in)."""
    if a_old.numel() == 0:
        return a_new.new_zeros(())
    prod = a_old.to(device=a_new.device, dtype=a_new.dtype) @ a_new.T  # (r_old, r_new)
    return (prod * prod).sum()


def frozen_a_matrices(adapter_dir: str | Path) -> dict[str, Tensor]:
    """saved key "...q_proj.lora_A.weight" -> A (r, d_in) of a stored PEFT adapter."""
    from workers.training.lora_stack import read_adapter

    _config, weights = read_adapter(Path(adapter_dir))
    return {k: v.float() for k, v in weights.items() if ".lora_A." in k}


def saved_key(module_name: str) -> str:
    """PEFT module name of a trainable lora_A -> the key it has in a saved adapter."""
    return module_name.replace(".lora_A.default", ".lora_A") + ".weight"


class OrthogonalityRegularizer:
    """Collects the penalty of every lora_A module the model runs while `collecting()`."""

    def __init__(self, frozen: Mapping[str, Tensor], weight: float) -> None:
        self._frozen = dict(frozen)
        self.weight = weight
        self._terms: list[Tensor] = []
        self._on = False
        self._handles: list[Any] = []
        self.matched = 0

    def attach(self, model: nn.Module) -> OrthogonalityRegularizer:
        """Hook every trainable lora_A module that has a frozen counterpart."""
        for name, module in model.named_modules():
            key = saved_key(name)
            if name.endswith(".lora_A.default") and key in self._frozen:
                ref = self._frozen[key]
                self._handles.append(module.register_forward_pre_hook(self._hook(ref)))
                self.matched += 1
        return self

    def _hook(self, ref: Tensor) -> Any:
        def hook(module: nn.Module, _inputs: Any) -> None:
            if self._on:
                self._terms.append(orthogonality_penalty(ref, module.weight))
        return hook

    @contextmanager
    def collecting(self) -> Iterator[None]:
        self._terms, self._on = [], True
        try:
            yield
        finally:
            self._on = False

    def penalty(self) -> Tensor | None:
        """weight * the sum collected in the last `collecting()` block (None if nothing)."""
        if not self._terms:
            return None
        return self.weight * torch.stack(self._terms).sum()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
