"""Warm training ranks: the DeepSpeed ranks of CPU jobs, kept alive between jobs.

Ray Train starts fresh processes for every `fit()`: a controller and one worker per rank,
each importing ray.train, torch, transformers, peft and DeepSpeed (measured on the shared
2-core machine: peft alone 14 s, DeepSpeed 6 s, ray.train 8 s per process) and building a
torch.distributed group, before the first training step. For a job of a few dozen steps
that start-up is a large part of the job. A `WarmPool` pays it once per dispatcher process:
its ranks are Ray actors that import everything at creation and keep their gloo group, and
each job runs `runner.rank_train` on them, the very code Ray Train's workers run, so the
adapter is the same.

Only for device "cpu": the ranks hold no Ray resources while idle (num_cpus=0; each uses one
thread while a job runs, as a Ray Train rank with 1 CPU does), so a warm pool never blocks
Ray Serve or anything else from scheduling. GPU jobs keep Ray Train, which reserves GPUs
only while it runs. A rank that dies (or any error in a job) discards the whole pool: its
surviving ranks may be stuck in a collective with the dead one; the next job builds a new
pool.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_POOLS: dict[tuple[int, str], WarmPool] = {}  # per driver process, by world size and resources
_POOLS_LOCK = threading.Lock()


def _rank_cls() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class WarmRank:
        """One DeepSpeed rank: libraries imported once, its process group kept."""

        def __init__(self) -> None:
            import os

            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # The reason this actor exists: these imports are most of a rank's start-up.
            import deepspeed  # noqa: F401
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401

            self.rank: int | None = None

        def address(self) -> tuple[str, int]:
            import socket

            import ray.util

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            return ray.util.get_node_ip_address(), port

        def join(self, rank: int, world: int, master: str, port: int) -> None:
            import os
            from datetime import timedelta

            import torch.distributed as dist

            # What Ray Train's TorchConfig sets; DeepSpeed's CPU comm reads them too.
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                               "LOCAL_SIZE": str(world), "MASTER_ADDR": master,
                               "MASTER_PORT": str(port)})
            dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                                    world_size=world, timeout=timedelta(minutes=30))
            self.rank = rank

        def train(self, task: Any, sink: Any, progress: bool,
                  inputs: dict[str, dict[str, bytes]]
                  ) -> tuple[dict[str, Any], dict[str, bytes] | None]:
            from workers.training.runner import rank_train

            return rank_train(task, sink, progress, 1, inputs)

    return WarmRank


class WarmPool:
    """`world` warm ranks in one gloo group (see the module docstring), each asking Ray for
    `resources` (WorkerConfig.worker_resources: which nodes may train)."""

    def __init__(self, world: int, resources: dict[str, float] | None = None) -> None:
        import ray

        cls = _rank_cls()
        self.world = world
        self.key = _key(world, resources)
        # The Ray session (driver job) the ranks belong to: after a ray.shutdown() and a new
        # ray.init() in this process their handles are dead, and a new pool is needed.
        self.session = ray.get_runtime_context().get_job_id()
        self.ranks = [cls.options(resources=dict(resources or {})).remote()
                      for _ in range(world)]
        try:
            master, port = ray.get(self.ranks[0].address.remote())
            ray.get([r.join.remote(i, world, master, port) for i, r in enumerate(self.ranks)])
        except Exception:
            self.discard()
            raise

    def train(self, task: Any, sink: Any, progress: bool, inputs: Any
              ) -> tuple[dict[str, Any], dict[str, bytes] | None]:
        """Run one runner.RankTask on every rank (`inputs`: a Ray reference to its input
        directories); returns rank 0's metrics and result files. Any failure discards the
        pool and re-raises."""
        import ray

        refs = [r.train.remote(task, sink, progress, inputs) for r in self.ranks]
        pending = list(refs)
        try:
            while pending:
                # Fail fast: a dead rank leaves the others waiting in a collective.
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready[0])
            return ray.get(refs[0])
        except Exception:
            self.discard()
            raise

    def discard(self) -> None:
        import ray

        with _POOLS_LOCK:
            if _POOLS.get(self.key) is self:
                del _POOLS[self.key]
        for rank in self.ranks:
            try:
                ray.kill(rank)
            except Exception:  # already dead
                log.debug("warm rank already gone", exc_info=True)


def _key(world: int, resources: dict[str, float] | None) -> tuple[int, str]:
    return world, repr(sorted((resources or {}).items()))


def warm_pool(world: int, resources: dict[str, float] | None = None) -> WarmPool:
    """This process's pool of `world` warm ranks asking for `resources`, started on first
    use."""
    import ray

    key = _key(world, resources)
    session = ray.get_runtime_context().get_job_id()
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.session != session:
            del _POOLS[key]  # from an earlier Ray session: its actors are gone
            pool = None
    if pool is not None:
        return pool
    pool = WarmPool(world, resources)
    with _POOLS_LOCK:
        _POOLS.setdefault(key, pool)
        return _POOLS[key]


def shutdown_pools() -> None:
    """Kill every warm rank of this process (the dispatcher stopping; tests)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.discard()
