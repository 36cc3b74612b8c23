"""Killing the dispatcher actor mid-job loses nothing: Ray restarts it (max_restarts=-1), the
dead attempt's training stops with it, and the restarted actor claims the ticket again once
the dead owner's lease expires. Two training paths: the warm ranks CPU jobs use by default,
and Ray Train (its controller and placement group). Every wait is bounded.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from storage.models import AdapterVersion, Job, JobStatus, Ticket, TicketStatus, VersionStatus
from tests.fixtures.operator import approve_held
from tests.fixtures.workers import ray_actor_pids
from tests.integration.test_faults_in_process import _account
from tests.integration.test_worker_crash import _live_placement_groups

LEASE_SECONDS = 12.0
TRAINING_TITLES = ("RayTrainWorker", "WarmRank", "TrainController")


def _training_pids() -> set[int]:
    return set(ray_actor_pids(*TRAINING_TITLES))


def _status(actor: Any, timeout: float = 60.0) -> dict[str, Any]:
    """The actor's status, waiting (bounded) while Ray restarts it."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.status.remote(), timeout=10)
        except Exception:  # restarting: the call fails or times out until it is back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for(predicate: Any, timeout: float, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(poll)
    return value


def _stop(actor: Any, earlier: set[int]) -> None:
    """Stop for good (no restart) and wait until the name is free and the training
    processes it started (those not in `earlier`) are gone."""
    import ray

    try:
        ray.get(actor.stop.remote(), timeout=10)
    except Exception:  # already dead or restarting: the kill below is what matters
        pass
    ray.kill(actor, no_restart=True)

    def gone() -> bool:
        try:
            ray.get_actor("oblivio-dispatcher")
            return False
        except ValueError:
            return True

    _wait_for(gone, 30)
    _wait_for(lambda: not _training_pids() - earlier, 30)


@pytest.mark.parametrize("warm", [True, False], ids=["warm-ranks", "ray-train"])
def test_killing_the_dispatcher_actor_mid_job_requeues_and_finishes_the_ticket(
        sqlite_flow, warm: bool) -> None:
    import ray

    from workers.dispatcher import start_dispatcher_actor

    flow = sqlite_flow
    # Long enough (tiny model) to be caught mid-training; a short lease, so that the dead
    # owner's claim expires within seconds; no backoff to sit through.
    settings = flow.settings.model_copy(update={
        "recipe": {**flow.settings.recipe, "max_steps": 150, "eval_every": 0},
        "lease_seconds": LEASE_SECONDS, "retry_backoff_seconds": 0.5,
        "warm_train_workers": warm})
    ticket_id = flow.submit(key=f"actor-kill-{warm}")
    # Warm ranks an earlier test's in-process dispatcher left in this cluster are not ours.
    earlier = _training_pids()
    actor = start_dispatcher_actor(settings.worker_config())
    try:
        first_owner = _status(actor, timeout=120)["owner"]

        def training() -> Ticket | None:
            with flow.sessions() as s:
                ticket = s.get_one(Ticket, ticket_id)
            step = (ticket.progress or {}).get("step", 0)
            return ticket if ticket.status is TicketStatus.running and step >= 1 else None

        caught = _wait_for(training, 180, poll=0.2)
        assert caught is not None, "the ticket never reached training step 1"
        assert caught.lease_owner == first_owner and caught.attempts == 1
        dead_pids = _training_pids() - earlier
        dead_groups = set(_live_placement_groups())
        assert dead_pids, "no training process found for the running job"
        if not warm:  # Ray Train reserves the run's CPUs in a placement group
            assert dead_groups, "the Ray Train run holds no placement group"

        ray.kill(actor, no_restart=False)  # Ray restarts it: max_restarts=-1
        killed_at = time.monotonic()

        # The dead attempt's training dies with its owner (the actor's process): its ranks,
        # its Train controller, and the CPUs it reserved. Otherwise it would train on, and a
        # Ray Train retry could wait forever for CPUs on a small cluster.
        def survivors() -> set[int]:
            return dead_pids & _training_pids()

        _wait_for(lambda: not survivors(), 60)
        left = survivors()
        assert not left, f"training processes of the killed attempt still run: {sorted(left)}"
        # Ray keeps a group whose creator (the dead controller) died while the job lives:
        # the restarted dispatcher removes it before its next Ray Train job.
        assert _wait_for(lambda: not dead_groups & set(_live_placement_groups()), 90), (
            "the killed attempt's placement group was never removed")

        restarted = _status(actor, timeout=120)
        assert restarted["alive"] and restarted["owner"] != first_owner, restarted

        # The restarted actor waits out the dead owner's lease, then claims the ticket again.
        def finished() -> Ticket | None:
            with flow.sessions() as s:
                ticket = s.get_one(Ticket, ticket_id)
            return ticket if ticket.status.is_final or (
                ticket.status is TicketStatus.awaiting_review) else None

        final = _wait_for(finished, 300, poll=1.0)
        recovered_s = time.monotonic() - killed_at
        assert final is not None, "the restarted dispatcher never finished the ticket"
        # The random model answers no probe: its version is held for an operator's review.
        assert final.status is TicketStatus.awaiting_review, (final.status, final.error)
        assert final.attempts == 2
    finally:
        _stop(actor, earlier)

    approve_held(flow.sessions)
    with flow.sessions() as s:
        ticket = s.get_one(Ticket, ticket_id)
        jobs = s.scalars(select(Job).order_by(Job.created_at)).all()
        versions = s.scalars(select(AdapterVersion).order_by(AdapterVersion.version)).all()
    assert ticket.status is TicketStatus.done, (ticket.status, ticket.error)
    # The dead attempt's job and half-built version were marked failed when its lease
    # expired; the retry's version is the only one holding the ticket.
    assert [j.status for j in jobs] == [JobStatus.failed, JobStatus.succeeded]
    assert "abandoned" in (jobs[0].error or "")
    assert [v.status for v in versions] == [VersionStatus.failed, VersionStatus.ready]
    holding = [v for v in versions if str(ticket_id) in v.ticket_ids]
    assert [v.status for v in holding if v.status is VersionStatus.ready] == [
        VersionStatus.ready]
    assert not [v for v in versions
                if v.status in (VersionStatus.training, VersionStatus.validating)]
    lost, duplicated = _account(flow, [ticket_id])
    print(f"\nfaults injected: 1 (dispatcher actor killed), tickets lost: {lost}, "
          f"duplicated: {duplicated}, path: {'warm ranks' if warm else 'Ray Train'}, "
          f"recovered in {recovered_s:.0f} s")
    assert (lost, duplicated) == (0, 0)
