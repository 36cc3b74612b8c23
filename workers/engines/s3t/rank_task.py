"""One S3T prefix trained on the DeepSpeed ranks, the way every forget adapter is.

A `PrefixTask` is a `workers.training.runner.RankTask`: `run_on_ranks` sends it to Ray Train
workers (or the dispatcher's warm ranks), each rank loads the base model, trains its share
of every batch through DeepSpeed (ZeRO-2/3 from the worker config) and rank 0 writes the
group's checkpoint directory (training.write_group), which the engine stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.s3t.config import S3TConfig
from workers.engines.s3t.training import TrainRecord


@dataclass
class PrefixTask:
    """Train layer group `layers` on `records`, the earlier groups `frozen`.

    Args:
        base_model_path, base_model_sha256: the resolved base model.
        base_model, data_dir: the configured spec and data dir, for a rank on a node
            without `base_model_path` (workers.model.base_model_on_this_node).
        output_dir: where rank 0's group directory ends up.
        cfg: the lineage's S3T configuration (LoRA shape, lr, epochs, batch size).
        frozen: the earlier groups' LoRA weights (PEFT's saved key format), in order.
        layers: the transformer layers this group trains.
        records: the prefix's cumulative training records.
        seed: LoRA initialisation and batch order (the same on every rank).
        meta: written beside the weights (prefix hash, layers, record-set hash, LoRA shape).
        device, num_workers, zero_stage: the worker configuration's.
    """

    base_model_path: str
    base_model_sha256: str
    output_dir: str
    cfg: S3TConfig
    frozen: list[dict[str, Any]]
    layers: list[int]
    records: list[TrainRecord]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    data_dir: str = ""
    device: str = "cpu"
    num_workers: int = 2
    zero_stage: int = 2

    def rank_strategy(self) -> Any:
        from workers.training.strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(zero_stage=self.zero_stage, lr=self.cfg.lr, device=self.device,
                                 micro_batch=max(1, self.cfg.batch_size // self.num_workers),
                                 # LoRA matrices are tiny: partition every one under ZeRO-3
                                 # alike, so that each rank holds the same shapes.
                                 param_persistence_threshold=0)

    def run_rank(self, strategy: Any, progress: Any) -> tuple[dict[str, Any], Path | None]:
        import tempfile

        from workers.engines.s3t.training import train_prefix, write_group
        from workers.model import BaseModelRef, load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            BaseModelRef(name="base", local_path=Path(self.base_model_path),
                         sha256=self.base_model_sha256), device=self.device)
        started = time.perf_counter()
        weights = train_prefix(
            model, tokenizer, cfg=self.cfg, frozen=self.frozen, layers=self.layers,
            records=self.records, seed=self.seed, strategy=strategy,
            progress=None if progress is None else (lambda step: progress({"step": step})))
        metrics = {"train_seconds": round(time.perf_counter() - started, 3),
                   "ranks": strategy.world_size, "zero_stage": self.zero_stage}
        if strategy.rank != 0:
            return metrics, None
        return metrics, write_group(Path(tempfile.mkdtemp(prefix="s3t-group-")), weights,
                                    self.meta)
