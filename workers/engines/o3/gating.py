"""Per-sample, per-request gated LoRA: block i acts on sample b with weight w_i(b).

    # x: (batch, seq, d_in); A: (R, d_in); B: (d_out, R)  (R = sum of the blocks' ranks,
    #    B already carries each block's alpha / r)
    # gate: (batch, R): request i's weight w_i(x) repeated over block i's ranks
    delta = ((x @ A.T) * gate[:, None, :]) @ B.T        # gate == 0 -> exactly the base

Implemented as forward hooks on the base model's own Linear modules rather than as
replacement modules, so the module tree (and with it PEFT, state dicts, other engines
sharing the same loaded model) is untouched: outside an `active(...)` block the hooks
return immediately. Only the ranks of blocks that some sample of the batch uses are
computed; a batch no block applies to runs the base model alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_HUB_ATTR = "_oblivio_o3_gating"


@dataclass
class StackedLoRA:
    """One version's blocks on one model: module name -> (A (R, d_in), B (d_out, R))."""

    modules: dict[str, tuple[Tensor, Tensor]]
    ranks: list[int]

    def rank_slices(self) -> list[slice]:
        out, start = [], 0
        for r in self.ranks:
            out.append(slice(start, start + r))
            start += r
        return out


def gate_from_weights(weights: Tensor, ranks: Sequence[int]) -> Tensor:
    """(batch, n_blocks) weights -> (batch, sum(ranks)) gate (each weight over its ranks)."""
    if weights.shape[-1] != len(ranks):
        raise ValueError(f"{weights.shape[-1]} weights for {len(ranks)} blocks")
    return torch.repeat_interleave(weights, torch.tensor(list(ranks)), dim=-1)


def gated_delta(x: Tensor, a: Tensor, b: Tensor, gate: Tensor) -> Tensor:
    """((x A^T) * gate) B^T for x (batch, seq, d_in) or (batch, d_in), gate (batch, R)."""
    return _gated_delta_t(x, a.T.to(x.dtype), b.T.to(x.dtype), gate.to(x.dtype))


def _gated_delta_t(x: Tensor, a_t: Tensor, b_t: Tensor, gate: Tensor) -> Tensor:
    """`gated_delta` with A^T, B^T and the gate already in x's dtype (the hook's hot path:
    a decode step runs it once per adapted module)."""
    h = x @ a_t
    h *= gate[:, None, :] if x.dim() == 3 else gate
    return h @ b_t


class GatingHub:
    """The hooks installed on one model and the currently active (version, gate)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._versions: dict[str, StackedLoRA] = {}
        self._hooked: dict[str, Any] = {}
        # While a version is active: module name -> (A^T, B^T) over the used ranks only,
        # and the gate's columns for those ranks.
        self._active: tuple[dict[str, tuple[Tensor, Tensor]], Tensor] | None = None
        self.lock = threading.RLock()

    def add_version(self, key: str, stacked: StackedLoRA) -> None:
        modules = dict(self._model.named_modules())
        missing = [n for n in stacked.modules if n not in modules]
        if missing:
            raise ValueError(f"adapter modules not in the model: {missing[:3]}")
        for name in stacked.modules:
            if name not in self._hooked:
                self._hooked[name] = modules[name].register_forward_hook(self._hook(name))
        self._versions[key] = stacked

    def remove_version(self, key: str) -> None:
        self._versions.pop(key, None)

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            active = self._active
            if active is None:
                return None
            modules, gate = active
            pair = modules.get(name)
            if pair is None:
                return None
            return output + _gated_delta_t(inputs[0], pair[0], pair[1], gate)
        return hook

    @contextmanager
    def active(self, key: str, gate: Tensor) -> Iterator[None]:
        """Apply version `key` with `gate` (batch, R) to every forward inside the block.

        Ranks whose gate is 0 for the whole batch are left out; if all are, nothing is
        applied and the model is exactly the base.
        """
        stacked = self._versions[key]
        used = (gate != 0).any(0).nonzero().flatten()
        with self.lock:
            if used.numel():
                # Sliced and transposed once per call, not once per module per step.
                dtype = next(self._model.parameters()).dtype
                modules = {name: (a[used].T.to(dtype).contiguous(),
                                  b[:, used].T.to(dtype).contiguous())
                           for name, (a, b) in stacked.modules.items()}
                self._active = (modules, gate[:, used].to(dtype))
            try:
                yield
            finally:
                self._active = None


def hub_for(model: nn.Module) -> GatingHub:
    """The model's gating hub (created, with no hooks yet, on first use)."""
    hub = getattr(model, _HUB_ATTR, None)
    if hub is None:
        hub = GatingHub(model)
        # Plain attribute (not a submodule): invisible to state_dict and named_modules.
        object.__setattr__(model, _HUB_ATTR, hub)
    return hub


def stacked_from_peft(weights: Mapping[str, Tensor], config: Mapping[str, Any],
                      ranks: list[int], *, device: Any = "cpu") -> StackedLoRA:
    """A stored stacked PEFT adapter -> per-module (A, B) with PEFT's scale folded into B.

    Keys look like "base_model.model.<module>.lora_A.weight"; <module> is the name in the
    plain (un-wrapped) base model.
    """
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        modules[name] = (a.float().to(device), (b.float() * scale).to(device))
    if sum(ranks) != r:
        raise ValueError(f"stack ranks {ranks} do not add up to the adapter's r={r}")
    return StackedLoRA(modules=modules, ranks=list(ranks))
