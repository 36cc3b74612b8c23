"""The dispatcher: claims queued tickets from the database and runs them as jobs.

`DispatcherLoop` is plain Python (tested directly); `DispatcherActor` is the thin Ray actor
that runs it in the cluster. The database, not Ray, is the queue: an actor that dies holds
only leases, which expire and put its tickets back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from workers.config import WorkerConfig

log = logging.getLogger(__name__)


def runnable_engines() -> tuple[str, ...]:
    """Engines this release can train (from the engine registry); tickets for others stay
    queued for a worker that can."""
    from workers.engines.registry import runnable_engines as registered

    return tuple(registered())


def dispatcher_owner() -> str:
    """A lease owner name that is unique per process and readable in the DB."""
    return f"dispatcher:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class DispatcherLoop:
    """Claim -> group by lineage and engine -> run one job per group, forever."""

    def __init__(self, config: WorkerConfig, *, max_batch: int = 8, poll_seconds: float = 1.0,
                 owner: str | None = None,
                 observe_claim: Callable[[float], None] | None = None) -> None:
        """`observe_claim` gets each claim query's seconds; by default the in-process
        Prometheus histogram (the Ray actor passes a Ray metric, exported by Ray)."""
        from storage.db import make_engine, make_session_factory
        from workers.metrics import observe_claim_in_process

        self.config = config
        self.max_batch = max_batch
        self.poll_seconds = poll_seconds
        self.owner = owner or dispatcher_owner()
        self._engine = make_engine(config.database_url)
        self.sessions = make_session_factory(self._engine)
        self.store = config.store.open()
        from storage.sealing import cipher_from_config

        # Forget sets are sealed at rest; only a claimed ticket's is opened, in memory.
        self.cipher = cipher_from_config(config.payload_key, config.data_dir / "payload-key")
        self._stop = threading.Event()
        self._observe_claim = observe_claim or observe_claim_in_process
        self.jobs_run = 0
        self.engines = runnable_engines()

    def run_once(self) -> int:
        """Claim what is ready and run it; returns the number of jobs run."""
        from storage import queue
        from workers.job_runner import JobContext, LeaseLost, run_job
        from workers.logcontext import log_context

        started = time.perf_counter()
        first = queue.claim(self.sessions, owner=self.owner, limit=1,
                            lease_seconds=self.config.lease_seconds,
                            max_attempts=self.config.max_attempts, engines=self.engines)
        self._observe_claim(time.perf_counter() - started)
        if not first:
            return 0
        claimed = list(first)
        # Wait a moment for companions: one job for several tickets of a lineage costs
        # about as much as one job for one ticket. Same kind only: an S3T deletion (seconds)
        # must never wait inside a fine-tune/retrain job (minutes) of the same engine.
        if self.max_batch > 1 and self.config.batch_window_seconds > 0:
            self._stop.wait(self.config.batch_window_seconds)
            claimed += queue.claim(self.sessions, owner=self.owner, limit=self.max_batch - 1,
                                   lease_seconds=self.config.lease_seconds,
                                   max_attempts=self.config.max_attempts,
                                   lineage_id=first[0].lineage_id, engines=(first[0].engine,),
                                   kinds=(first[0].kind,))
        claimed = self._open_payloads(claimed)
        self._free_orphaned_training_resources()
        groups: dict[tuple[Any, str], list[Any]] = defaultdict(list)
        for ticket in claimed:
            groups[(ticket.lineage_id, ticket.engine)].append(ticket)
        ctx = JobContext(config=self.config, sessions=self.sessions, store=self.store,
                         owner=self.owner)
        ran = 0
        for tickets in groups.values():
            try:
                with log_context(ticket_ids=[t.id for t in tickets],
                                 lineage=tickets[0].lineage_id):
                    run_job(ctx, tickets)
            except LeaseLost:
                log.warning("lost the lease on %s; another dispatcher has them", tickets)
            except Exception:
                log.exception("job for %d ticket(s) failed; they were returned to the queue",
                              len(tickets))
            ran += 1
        self.jobs_run += ran
        return ran

    def _free_orphaned_training_resources(self) -> None:
        """Before a Ray Train job: free the CPUs a dead claimer's run still reserves (see
        remove_orphaned_placement_groups), else this job could wait for them forever.
        Best effort: a failure only leaves the job to wait as it would have."""
        config = self.config
        if config.trainer != "deepspeed" or (config.warm_train_workers
                                             and config.device == "cpu"):
            return  # no Ray Train run: warm ranks die with their owner, plain is in-process
        try:
            from workers.training.runner import remove_orphaned_placement_groups

            remove_orphaned_placement_groups()
        except Exception:
            log.warning("could not check for orphaned placement groups", exc_info=True)

    def _open_payloads(self, claimed: list[Any]) -> list[Any]:
        from storage import queue

        return queue.open_or_fail(self.sessions, self.cipher, claimed, owner=self.owner,
                                  max_attempts=self.config.max_attempts)

    def warm_up(self) -> None:
        """Load the evaluation model of the default forget engine (on the evaluator, see
        workers/evaluator.py), and start the warm training ranks (CPU DeepSpeed jobs with warm_train_workers), so that even the first
        job skips their start-up. Failures only cost the speed-up: the first job then does
        it itself."""
        from workers import job_compute
        from workers.engines import DEFAULT_ENGINES

        config = self.config
        try:
            if config.trainer == "plain":  # evaluation runs in this process then
                job_compute.warm_evaluation(config, DEFAULT_ENGINES["forget"])
            else:
                from workers.evaluator import warm_evaluator

                warm_evaluator(config, DEFAULT_ENGINES["forget"])
        except Exception:
            log.warning("could not load the evaluation model ahead", exc_info=True)
        if not (config.trainer == "deepspeed" and config.warm_train_workers
                and config.device == "cpu"):
            return
        try:
            from workers.training.warm_pool import warm_pool

            warm_pool(config.num_workers, config.worker_resources)
        except Exception:
            log.warning("could not start the warm training ranks", exc_info=True)

    def run_forever(self) -> None:
        self.warm_up()
        while not self._stop.is_set():
            try:
                if self.run_once() == 0:
                    self._stop.wait(self.poll_seconds)
            except Exception:  # the DB may be restarting: keep polling, never die
                log.exception("dispatcher iteration failed")
                self._stop.wait(self.poll_seconds * 5)

    def stop(self) -> None:
        self._stop.set()


def start_dispatcher_actor(config: WorkerConfig) -> Any:
    """Start the dispatcher as a detached-from-work Ray actor on the connected cluster."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
    class DispatcherActor:
        # A thin shell: the loop runs in a thread so the actor still answers `status`.
        def __init__(self, config: WorkerConfig) -> None:
            from workers.logcontext import configure_logging
            from workers.metrics import ray_claim_latency_observer
            from workers.priority import yield_cpu

            configure_logging(config.log_format, config.log_level)
            # Before the loop's thread starts (it inherits the niceness): evaluations and
            # plain-loop training here must not slow the API down on a shared machine.
            yield_cpu(config.background_nice)
            self._loop = DispatcherLoop(config, observe_claim=ray_claim_latency_observer())
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()

        def status(self) -> dict[str, Any]:
            return {"owner": self._loop.owner, "jobs_run": self._loop.jobs_run,
                    "alive": self._thread.is_alive()}

        def stop(self) -> None:
            self._loop.stop()

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # With the API, on the node that started it: the control plane stays where operators
    # configured it, and the work it starts asks for config.worker_resources.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DispatcherActor.options(name="oblivio-dispatcher", get_if_exists=True,
                                   scheduling_strategy=here).remote(config)
