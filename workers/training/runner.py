"""Run a TrainJobSpec: on Ray Train + DeepSpeed (the product path) or in one plain process.

Both write the same thing to `spec.output_dir`: one standard PEFT adapter (safetensors +
adapter_config.json) that equals the lineage's parent adapter plus the newly trained LoRA.

Lineages: version N trains on base + version N-1 (the parent adapter merged into the base
weights in memory, so NPO's reference is the lineage's current model), and is saved as the
exact stack parent + new LoRA, one adapter of rank r_parent + r_new (lora_stack.py). Serving
version N therefore needs that one directory and the base model, nothing else.

Progress: rank 0 puts updates into a small Ray actor; a driver thread drains it every
second (and once after the run) into `progress_cb`. The same actor carries rank 0's result
back, as bytes (workers/shipping.py): ranks may run on another node, which shares no
directory with the driver, so their inputs travel with the task too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workers.training.loop import LoopResult, ProgressFn, run_training
from workers.training.spec import TrainJobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """A finished adapter and how it was made.

    Args:
        adapter_dir: standard PEFT adapter (adapter_model.safetensors + adapter_config.json,
            plus oblivio_stack.json listing the ranks of the stacked requests).
        metrics: steps, losses, early-stopping rates, timings, ZeRO partition sizes.
        peft_config: the adapter_config.json contents.
    """

    adapter_dir: Path
    metrics: dict[str, Any]
    peft_config: dict[str, Any]

    @property
    def steps(self) -> int:
        return int(self.metrics["steps"])

    @property
    def losses(self) -> list[float]:
        return list(self.metrics["losses"])


def train_plain(spec: TrainJobSpec, progress_cb: ProgressFn | None = None) -> TrainResult:
    """Single process, torch AdamW, no Ray: the baseline the benchmark compares against."""
    from workers.training.strategy import PlainStrategy

    spec.method_config()  # refuse a bad method or options before loading anything
    recipe = spec.forget_recipe()
    result = run_training(spec, PlainStrategy(lr=recipe.lr, weight_decay=recipe.weight_decay),
                          progress_cb)
    return _write_result(spec, result)


class RankTask(Protocol):
    """Work that runs the same on every DeepSpeed rank: a forget adapter (TrainJobSpec), an
    S3T prefix (workers/engines/s3t/rank_task.py). Plain data: it is pickled to each rank.

    `rank_strategy` builds the rank's DeepSpeedStrategy (inside its process group);
    `run_rank` trains and returns the rank's metrics and, on rank 0, a temporary directory
    holding the result, which `run_on_ranks` moves to `output_dir`.
    """

    device: str
    num_workers: int
    output_dir: str

    def rank_strategy(self) -> Any: ...
    def run_rank(self, strategy: Any, progress: ProgressFn | None
                 ) -> tuple[dict[str, Any], Path | None]: ...


def train_unlearning_adapter(spec: TrainJobSpec, progress_cb: ProgressFn | None = None, *,
                             warm: bool = False,
                             resources: dict[str, float] | None = None) -> TrainResult:
    """Train on `spec.num_workers` DeepSpeed ZeRO ranks (see `run_on_ranks`)."""
    spec.method_config()  # refuse a bad method or options before any worker starts
    metrics = run_on_ranks(spec, progress_cb, warm=warm, resources=resources)
    out = Path(spec.output_dir)
    return TrainResult(adapter_dir=out, metrics=metrics, peft_config=_read_config(out))


def train_adapter(spec: TrainJobSpec, progress_cb: ProgressFn | None, *, trainer: str,
                  warm: bool, resources: dict[str, float] | None = None) -> TrainResult:
    """The worker configuration's trainer: "plain" in this process, else the DeepSpeed
    ranks (`warm`: the dispatcher's warm ranks on CPU, else Ray Train)."""
    if trainer == "plain":
        return train_plain(spec, progress_cb)
    return train_unlearning_adapter(spec, progress_cb, warm=warm, resources=resources)


def run_on_ranks(task: RankTask, progress_cb: ProgressFn | None = None, *,
                 warm: bool = False, resources: dict[str, float] | None = None
                 ) -> dict[str, Any]:
    """Run `task` on `task.num_workers` DeepSpeed ranks: Ray Train workers, or with `warm`
    (CPU only) this process's warm ranks (workers/training/warm_pool.py), which skip the
    per-job start-up and run the same rank code. Each rank also asks Ray for `resources`
    (WorkerConfig.worker_resources: which nodes may train). Rank 0's result directory ends
    up at `task.output_dir`; returns rank 0's metrics."""
    import ray

    from workers.shipping import task_inputs

    inputs = ray.put(task_inputs(task))  # once, however many ranks read it
    if warm and task.device == "cpu":
        return _run_on_warm_pool(task, progress_cb, inputs, resources or {})
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Always created: besides progress it carries rank 0's result and the run's placement
    # group to clean up.
    sink = _progress_sink_cls().options(num_cpus=0).remote()
    Path(task.output_dir).parent.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(prefix="ray-train-", dir=Path(task.output_dir).parent))
    use_gpu = task.device == "cuda"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"task": task, "sink": sink, "progress": progress_cb is not None,
                           "inputs": inputs},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=task.num_workers, use_gpu=use_gpu,
            resources_per_worker={"GPU" if use_gpu else "CPU": 1, **(resources or {})}),
        # No retries inside Ray: a failed job goes back to the durable queue, which counts
        # attempts and keeps the error. (Ray Train's own run state only: no checkpoints.)
        run_config=RunConfig(storage_path=str(storage), name="unlearn",
                             failure_config=FailureConfig(max_failures=0)),
    )
    stop = threading.Event()
    poller = None
    if progress_cb is not None:
        poller = threading.Thread(target=_poll_progress, args=(sink, progress_cb, stop),
                                  daemon=True)
        poller.start()
    try:
        fitted = trainer.fit()
        metrics, files = ray.get(sink.result.remote())
        if files is None:
            raise RuntimeError(f"training produced no result: {fitted.error}")
        _write_output(Path(task.output_dir), files)
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=15)  # its last drain
        _release_placement_group(sink)
        try:
            ray.kill(sink)
        except Exception:  # already gone with a failed run: nothing to clean up
            log.debug("progress sink already gone", exc_info=True)
        shutil.rmtree(storage, ignore_errors=True)
    return {k: v for k, v in (metrics or {}).items() if not k.startswith("_")}


def _write_output(out: Path, files: dict[str, bytes]) -> None:
    from workers.shipping import write_files

    if out.exists():
        shutil.rmtree(out)
    write_files(files, out)


def _run_on_warm_pool(task: RankTask, progress_cb: ProgressFn | None, inputs: Any,
                      resources: dict[str, float]) -> dict[str, Any]:
    import ray

    from workers.training.warm_pool import warm_pool

    sink = _progress_sink_cls().options(num_cpus=0).remote()
    stop = threading.Event()
    poller = None
    if progress_cb is not None:
        poller = threading.Thread(target=_poll_progress, args=(sink, progress_cb, stop),
                                  daemon=True)
        poller.start()
    try:
        metrics, files = warm_pool(task.num_workers, resources).train(
            task, sink, progress_cb is not None, inputs)
        _write_output(Path(task.output_dir), files)
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=15)  # its last drain
        try:
            ray.kill(sink)
        except Exception:
            log.debug("progress sink already gone", exc_info=True)
    return {**{k: v for k, v in metrics.items() if not k.startswith("_")}, "warm_ranks": True}


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (rank); rank 0 puts its result into the sink."""
    import ray

    task: RankTask = config["task"]
    if task.device == "cuda":
        import ray.train.torch
        import torch

        # "cuda" then means this worker's own GPU (Ray Train assigns one per worker).
        torch.cuda.set_device(ray.train.torch.get_device())
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    metrics, files = rank_train(task, config["sink"], config["progress"], cpus,
                                ray.get(config["inputs"]))
    if files is not None:
        ray.get(config["sink"].put_result.remote(metrics, files))


def rank_train(task: RankTask, sink: Any, progress_enabled: bool, cpus: float | None,
               inputs: dict[str, dict[str, bytes]]
               ) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """One DeepSpeed rank's share of a task, inside an initialised torch.distributed group
    (Ray Train's, or a warm pool's): returns its metrics and, on rank 0, the result
    directory's files. `inputs` are the task's input directories (workers/shipping.py),
    written to this node where their paths do not exist."""
    import ray
    import ray.util
    import torch

    from workers.priority import yield_cpu_from_env
    from workers.shipping import read_files, task_on_this_node

    yield_cpu_from_env()  # a rank is background work: the API keeps its latency
    task, temporary = task_on_this_node(task, inputs)
    # As many threads as CPUs Ray gave this rank: more would oversubscribe the cores that
    # the other ranks use (seen: 2 ranks x 2 threads on 2 cores ran several times slower).
    torch.set_num_threads(max(1, int(cpus or os.environ.get("OMP_NUM_THREADS", "1"))))
    strategy = task.rank_strategy()
    progress = None
    last_put: list[Any] = []
    if strategy.rank == 0:
        group = ray.util.get_current_placement_group()
        if group is not None:
            ray.get(sink.set_placement_group.remote(group.id.hex()))
    if strategy.rank == 0 and progress_enabled:
        # Where the job trains, for operators (GET /v1/jobs/{id}, the dashboard).
        node = ray.get_runtime_context().get_node_id()

        def progress(update: dict[str, Any]) -> None:
            last_put[:] = [sink.put.remote({**update, "training_node": node})]
    try:
        metrics, result = task.run_rank(strategy, progress)
        # The driver drains the sink one last time once the ranks return; this rank's puts
        # are not ordered with that drain, so the final steps go in first (best effort, as
        # all progress: a put that never lands does not fail the job).
        ray.wait(last_put, timeout=30)
        files = None if result is None else read_files(result)
        if result is not None:
            shutil.rmtree(result, ignore_errors=True)
        return metrics, files
    finally:
        strategy.close()
        for directory in temporary:
            shutil.rmtree(directory, ignore_errors=True)


def forget_rank_strategy(spec: TrainJobSpec) -> Any:
    from workers.training.strategy import DeepSpeedStrategy

    recipe = spec.forget_recipe()
    return DeepSpeedStrategy(zero_stage=spec.zero_stage, lr=recipe.lr,
                             weight_decay=recipe.weight_decay, device=spec.device,
                             micro_batch=max(1, recipe.forget_batch_size // spec.num_workers),
                             param_persistence_threshold=spec.zero3_persistence_threshold)


def forget_on_rank(spec: TrainJobSpec, strategy: Any, progress: ProgressFn | None
                   ) -> tuple[dict[str, Any], Path | None]:
    """A forget adapter's rank share: the training loop, then on rank 0 the stacked adapter."""
    result = run_training(spec, strategy, progress)
    metrics = _metrics(result)
    if strategy.rank != 0:
        return metrics, None
    tmp = Path(tempfile.mkdtemp(prefix="adapter-"))
    _write_adapter(spec, result, tmp)
    return metrics, tmp


def _metrics(result: LoopResult) -> dict[str, Any]:
    import resource

    local, full = result.partition
    return {
        # Peak resident memory of this training process (ru_maxrss is KiB on Linux).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": [round(x, 4) for x in result.losses],
        "ticket_rate_base": result.base_ticket_rate,
        "ticket_rates": result.ticket_rates,
        "train_seconds": round(result.seconds, 2),
        "loop_started_at": result.started_at,
        "loop_finished_at": result.finished_at,
        "params_local": local,
        "params_full": full,
        **result.extra,
    }


def _write_result(spec: TrainJobSpec, result: LoopResult) -> TrainResult:
    out = Path(spec.output_dir)
    _write_adapter(spec, result, out)
    return TrainResult(adapter_dir=out, metrics=_metrics(result), peft_config=_read_config(out))


def _write_adapter(spec: TrainJobSpec, result: LoopResult, out: Path) -> None:
    """Save the new LoRA in PEFT format, stacked on top of the parent adapter if any."""
    from workers.training.lora_stack import (
        read_adapter,
        stack_adapters,
        stack_ranks,
        write_adapter,
    )

    config = _peft_config_json(result.lora_config, spec.base_model_path)
    # PEFT's saved keys drop the adapter name ("...lora_A.default.weight" -> "lora_A.weight").
    weights = {k.replace(".default.", "."): v for k, v in result.state_dict.items()}
    ranks = [config["r"]]
    if spec.parent_adapter_dir:
        parent = Path(spec.parent_adapter_dir)
        config, weights = stack_adapters([read_adapter(parent), (config, weights)])
        ranks = stack_ranks(parent) + ranks
    write_adapter(out, config, weights, ranks)


def _peft_config_json(lora_config: dict[str, Any], base_path: str) -> dict[str, Any]:
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.items()}
    config["base_model_name_or_path"] = base_path
    config["peft_type"] = "LORA"
    config["task_type"] = "CAUSAL_LM"
    config["inference_mode"] = True
    return config


def _read_config(path: Path) -> dict[str, Any]:
    import json

    return json.loads((path / "adapter_config.json").read_text())


def _poll_progress(sink: Any, progress_cb: ProgressFn, stop: threading.Event) -> None:
    import ray

    finished = False
    while not finished:
        # One last drain after the job ends, so the final steps are not lost.
        finished = stop.wait(1.0)
        try:
            for update in ray.get(sink.drain.remote(), timeout=10):
                progress_cb(update)
        except Exception:  # progress is best effort; the job itself decides success
            log.debug("progress poll failed", exc_info=True)


def _release_placement_group(sink: Any) -> None:
    """Remove the run's placement group if Ray Train left it behind.

    When a worker process dies (OOM, SIGKILL), Train can leave the run's placement group
    and the surviving rank alive; on a small cluster the retry would then wait for CPUs
    forever. Removing the group frees its bundles and ends any actor still inside it.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        group_hex = ray.get(sink.placement_group.remote(), timeout=10)
        if not group_hex:
            return
        group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex)))
        if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            log.info("removed placement group %s left by the training run", group_hex)
    except Exception:  # cleanup is best effort; the job's own outcome stands
        log.warning("could not release the training placement group", exc_info=True)


def _progress_sink_cls() -> Any:
    import ray

    @ray.remote
    class ProgressSink:
        """Rank 0 puts updates, its result and its placement group; the driver reads them."""

        def __init__(self) -> None:
            self._updates: list[dict[str, Any]] = []
            self._placement_group: str | None = None
            self._result: tuple[dict[str, Any] | None, dict[str, bytes] | None] = (None, None)

        def put(self, update: dict[str, Any]) -> None:
            self._updates.append(update)

        def drain(self) -> list[dict[str, Any]]:
            out, self._updates = self._updates, []
            return out

        def put_result(self, metrics: dict[str, Any], files: dict[str, bytes]) -> None:
            self._result = (metrics, files)

        def result(self) -> tuple[dict[str, Any] | None, dict[str, bytes] | None]:
            return self._result

        def set_placement_group(self, group_hex: str) -> None:
            self._placement_group = group_hex

        def placement_group(self) -> str | None:
            return self._placement_group

    return ProgressSink


def remove_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead; returns how many.

    A Ray Train run's group is created by its TrainController. When the dispatcher that
    drove the run dies (actor killed, node lost) the controller and ranks die with it, but
    Ray removes a non-detached group only once its creator actor AND its creator job are
    dead, and the job (the service's driver) lives on; Train's own cleaner needs the State
    API, i.e. the dashboard. The group then holds its CPUs forever and on a small cluster
    every later run waits for them. No live run uses a group whose creator is dead.
    """
    import ray
    from ray._raylet import ActorID, PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    removed_state = gcs_pb2.PlacementGroupTableData.REMOVED
    accessor = ray._private.state.state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # A driver-created group has no creator actor (nil id) and counts as "actor dead".
        if (group.state == removed_state or group.is_detached or not group.creator_actor_dead
                or not group.creator_actor_id or ActorID(group.creator_actor_id).is_nil()):
            continue
        remove_placement_group(PlacementGroup(PlacementGroupID(group.placement_group_id)))
        log.warning("removed placement group %s: its creator actor %s is dead",
                    group.placement_group_id.hex(), group.creator_actor_id.hex())
        removed += 1
    return removed
