"""The configuration the Ray side is handed: plain, typed, picklable (it travels to actors).

The service reads its settings once (`service.settings.Settings.worker_config()`) and passes
this down; nothing in workers/ or storage/ reads `OBLIVIO_*` variables itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.objectstore import StoreConfig


@dataclass(frozen=True)
class WorkerConfig:
    """What the dispatcher, jobs, engines and serving need to know.

    Args:
        data_dir: absolute data dir (converted model cache, job scratch space, caches).
        database_url: SQLAlchemy URL of the queue/registry database.
        store: the object store holding the versions.
        base_model: the base model spec (`bundled:...`, a local path or a cached HF id).
        device: "cpu" or "cuda".
        num_workers: Ray Train workers (DeepSpeed ranks) per job.
        zero_stage: DeepSpeed ZeRO stage, 2 or 3.
        trainer: "deepspeed" (Ray Train + DeepSpeed, the product path) or "plain" (one
            in-process loop: benchmark baseline, debugging).
        warm_train_workers: with trainer "deepspeed" on CPU, train on this process's warm
            DeepSpeed ranks (workers/training/warm_pool.py) instead of new Ray Train workers.
        worker_resources: Ray resources every training rank, evaluation task and serving
            replica asks for (a custom resource that only worker nodes have keeps that work
            off the head node); empty: anywhere.
        background_nice: CPU niceness (0-19) of the dispatcher actor (jobs' evaluation) and
            of training ranks, so that the API and generation keep their latency while a
            job runs on the same machine (workers/priority.py); 0 leaves them as they are.
        recipe: operator overrides of the forget recipe (workers/evaluation/recipe.py).
        evaluation: operator overrides of each job's version report (ReportConfig fields,
            plus relearn_steps / relearn_lr; workers/evaluation/version_eval.configs_from).
        lease_seconds: a claim is lost unless renewed within this.
        max_attempts: claims before a ticket fails for good (transient failures only: a
            permanent one, see workers/failures.py, fails the ticket at once).
        retry_backoff_seconds: a transiently failed ticket waits this long before its
            second attempt, twice as long before its third, ... (0: retry at once).
        retry_backoff_max_seconds: the longest such wait.
        batch_window_seconds: the dispatcher waits this long to group tickets in one job.
        auto_promote: promote a version whose evaluation passes.
        ray_address: join this Ray cluster instead of starting a local one.
        payload_key: the key that opens sealed forget sets (storage.sealing); None -> the
            key file in data_dir. Never printed.
        log_format: "text" or "json" (workers.logcontext) for the dispatcher's logs.
        log_level: root log level there.
    """

    data_dir: Path
    database_url: str = ""
    store: StoreConfig = field(default_factory=lambda: StoreConfig(url=""))
    base_model: str = "bundled:smollm2-135m-instruct"
    device: str = "cpu"
    num_workers: int = 2
    zero_stage: int = 2
    trainer: str = "deepspeed"
    warm_train_workers: bool = True
    worker_resources: dict[str, float] = field(default_factory=dict)
    background_nice: int = 10
    recipe: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 10.0
    retry_backoff_max_seconds: float = 600.0
    batch_window_seconds: float = 2.0
    auto_promote: bool = True
    ray_address: str | None = None
    payload_key: str | None = field(default=None, repr=False)
    log_format: str = "text"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        # Paths cross process boundaries (Ray workers, Ray Train storage): relative ones
        # would be read against another working directory.
        if not Path(self.data_dir).is_absolute():
            raise ValueError(f"data_dir must be absolute, got {self.data_dir}")
        if any(not (isinstance(v, (int, float)) and v > 0)
               for v in self.worker_resources.values()):
            raise ValueError(f"worker_resources must be positive amounts, got "
                             f"{self.worker_resources}")
