"""Killing a training worker mid-job loses nothing: the ticket is retried and finishes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import select

from storage.models import (
    AdapterVersion,
    Job,
    JobStatus,
    Ticket,
    TicketStatus,
    VersionStatus,
    utcnow,
)
from tests.fixtures.workers import ray_actor_pids


def _train_worker_pids() -> list[int]:
    # Ray Train's workers, or the warm ranks that CPU jobs use by default.
    return ray_actor_pids("RayTrainWorker", "WarmRank")


def _wait_until_no_training_processes(timeout: float = 60.0) -> list[int]:
    """The run's TrainController and its ranks (the killed one's peer too) must exit."""
    deadline = time.monotonic() + timeout
    while (left := ray_actor_pids("RayTrainWorker", "WarmRank", "TrainController")) and (
            time.monotonic() < deadline):
        time.sleep(0.5)
    return left


def _live_placement_groups() -> list[str]:
    import ray.util

    return [g for g, info in ray.util.placement_group_table().items()
            if info["state"] not in ("REMOVED",)]


def test_killing_a_train_worker_mid_training_retries_the_ticket_to_done(flow):
    from workers.dispatcher import DispatcherLoop

    settings, sessions = flow.settings, flow.sessions
    # Long enough (tiny model: a few ms a step) to be caught mid-training.
    settings = settings.model_copy(update={"recipe": {**settings.recipe, "max_steps": 150,
                                                      "eval_every": 0}})
    ticket_id = flow.submit(key="crash-1")
    loop = DispatcherLoop(settings.worker_config())

    # A daemon thread: should the job hang, the test fails without keeping pytest alive.
    first = threading.Thread(target=loop.run_once, daemon=True)
    first.start()
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed is None:
        with sessions() as s:
            progress = s.get_one(Ticket, ticket_id).progress or {}
        pids = _train_worker_pids()
        if progress.get("step", 0) >= 2 and pids:
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    first.join(timeout=180)
    assert killed is not None, "training never reached step 2"
    assert not first.is_alive()
    # Nothing of the failed run survives it: not the controller, not the surviving rank.
    assert _wait_until_no_training_processes() == []

    # The failed run holds no CPUs any more: its placement group is gone (else the retry
    # could wait forever on a small cluster).
    assert _live_placement_groups() == []
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.queued, "the failed attempt must requeue the ticket"
        assert ticket.attempts == 1 and ticket.error
        assert s.scalars(select(Job.status)).all() == [JobStatus.failed]
        failed = s.scalars(select(AdapterVersion)).all()
        assert [v.status for v in failed] == [VersionStatus.failed]  # never visible as ready

        # A transient failure: retried, after the backoff (1 s in these settings).
        assert ticket.not_before is not None
        wait = (ticket.not_before.replace(tzinfo=None) - utcnow().replace(tzinfo=None))
    assert wait.total_seconds() <= 1.0  # 1 s after the failure, which is already past
    time.sleep(max(0.0, wait.total_seconds()) + 0.2)

    # The retry, with the flow's normal recipe (it forgets, so its version goes live).
    assert DispatcherLoop(flow.settings.worker_config()).run_once() == 1
    with sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        assert ticket.status == TicketStatus.done, ticket.error
        assert ticket.attempts == 2
    # After a good run only the warm pool's ranks stay (by design, until Ray shuts down,
    # which scripts/no_leftovers.py checks at the end of the suite): one per worker, and
    # no Ray Train process.
    deadline = time.monotonic() + 60
    while ray_actor_pids("RayTrainWorker", "TrainController") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_actor_pids("RayTrainWorker", "TrainController") == []
    assert len(ray_actor_pids("WarmRank")) <= settings.num_workers
