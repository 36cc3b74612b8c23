"""The seam between the unlearning algorithm and distribution: DeepSpeed lives only here.

The training loop calls `setup`, `backward_and_step`, `trainable_state_dict` and the small
collective helpers; it never imports deepspeed, so the same loop runs under ZeRO-2, ZeRO-3
or a plain single-process optimiser.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class TrainingStrategy(Protocol):
    rank: int
    world_size: int

    def setup(self, model: nn.Module, params: Iterable[nn.Parameter]) -> nn.Module: ...
    def backward_and_step(self, loss: Tensor) -> None: ...
    def trainable_state_dict(self, model: nn.Module) -> dict[str, Tensor]: ...
    def all_reduce_sum(self, values: list[float]) -> list[float]: ...
    def generation_kwargs(self) -> dict[str, Any]: ...
    def partitioned_numel(self, model: nn.Module) -> tuple[int, int]: ...


@dataclass
class PlainStrategy:
    """Single-process AdamW: the baseline DeepSpeed is measured against."""

    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 0
    world_size: int = 1

    def setup(self, model: nn.Module, params: Iterable[nn.Parameter]) -> nn.Module:
        self._params = [p for p in params]
        self._opt = torch.optim.AdamW(self._params, lr=self.lr, weight_decay=self.weight_decay)
        return model

    def backward_and_step(self, loss: Tensor) -> None:
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self._opt.step()

    def trainable_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                if p.requires_grad}

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def generation_kwargs(self) -> dict[str, Any]:
        return {}

    def partitioned_numel(self, model: nn.Module) -> tuple[int, int]:
        n = sum(p.numel() for p in model.parameters())
        return n, n


@dataclass
class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2/3 over the torch.distributed group that Ray Train set up.

    Args:
        zero_stage: 2 shards optimizer state and gradients; 3 also shards the parameters.
        lr, weight_decay, grad_clip: the AdamW optimiser (torch's, which runs on CPU too).
        micro_batch: per-rank batch size DeepSpeed is told about (bookkeeping only: the loop
            builds its own batches).
        device: "cpu" (gloo) or "cuda" (nccl).
        param_persistence_threshold: under ZeRO-3, parameters with fewer elements than
            this stay whole on every rank (DeepSpeed's default, 1e5): norms and LoRA
            matrices are tiny, and gathering each of them every forward costs more than
            keeping them. 0 partitions everything (tiny test models need that).
    """

    zero_stage: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 1
    device: str = "cpu"
    param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._engine: Any = None

    def config(self) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            zero.update(stage3_param_persistence_threshold=self.param_persistence_threshold,
                        stage3_gather_16bit_weights_on_model_save=True)
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.lr, "weight_decay": self.weight_decay,
                # DeepSpeed's fused CPU Adam needs a compiler toolchain per machine; torch's
                # AdamW is exact and fast enough for LoRA-sized parameter sets.
                "torch_adam": True}},
            "zero_optimization": zero,
            "bf16": {"enabled": self.device == "cuda" and torch.cuda.is_bf16_supported()},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, params: Iterable[nn.Parameter]) -> nn.Module:
        if self.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if self.device == "cpu":
            from workers.training.op_build import build_cpu_comm_op

            build_cpu_comm_op()
        deepspeed.init_distributed(dist_backend="gloo" if self.device == "cpu" else "nccl")
        if self.device == "cpu":
            _unlink_shm_allreduce_buffer()
        self._engine, *_ = deepspeed.initialize(model=model, model_parameters=list(params),
                                                config=self.config())
        return self._engine.module

    def close(self) -> None:
        """Release the DeepSpeed engine (its hooks and optimizer state): a warm rank runs
        job after job in one process."""
        engine, self._engine = self._engine, None
        if engine is not None and hasattr(engine, "destroy"):
            try:
                engine.destroy()
            except Exception:  # best effort: the next job builds a fresh engine anyway
                pass

    def backward_and_step(self, loss: Tensor) -> None:
        self._engine.backward(loss)
        self._engine.step()

    def trainable_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with self._gathered([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if self.device == "cuda":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def generation_kwargs(self) -> dict[str, Any]:
        # Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run
        # the same number of forwards even when one rank's sequences finish early.
        return {"synced_gpus": True} if self.zero_stage == 3 and self.world_size > 1 else {}

    def partitioned_numel(self, model: nn.Module) -> tuple[int, int]:
        """(elements held by this rank, elements of the full model)."""
        local = full = 0
        for p in model.parameters():
            full += getattr(p, "ds_numel", p.numel())
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return local, full

    @contextlib.contextmanager
    def _gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer (/dev/shm, ~67 MB a
    rank). DeepSpeed never unlinks it, so ranks started job after job fill /dev/shm, which
    is memory: Ray's memory monitor then kills workers. init_distributed returns once this
    rank has mapped every rank's buffer; after a barrier every rank has, so the names can
    go. The mappings stay valid until the processes exit."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)
