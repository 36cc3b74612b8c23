"""The in-service scheduler: one leader among the API replicas runs the schedules' windows.

Each replica started with workers runs a `SchedulerLoop` thread. Every `poll_seconds` it
tries to take (or renew) the `scheduler` leader lease in the database; the one that holds
it takes the due windows (storage.schedules.take_due_windows) and runs each: an unlearn or
retrain window's tickets as one job per engine, through the same job runner as the
dispatcher; an evaluate window as a re-evaluation of the live version
(workers/reevaluation.py). What each came to is added to the schedule's `last_result`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from storage import schedules
from storage.queue import ClaimedTicket

log = logging.getLogger(__name__)

RunBatch = Callable[[list[ClaimedTicket]], Any]


def scheduler_owner() -> str:
    return f"scheduler:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SchedulerLoop:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 run_batch: RunBatch | None = None, owner: str | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.owner = owner or scheduler_owner()
        self._run_batch = run_batch or self._run_job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.jobs_run = 0

    @property
    def ttl_seconds(self) -> float:
        # Long enough to survive a slow poll, short enough that a dead leader is replaced
        # within a few polls.
        return max(3 * self.settings.scheduler_poll_seconds, 10.0)

    def run_once(self, now: datetime | None = None) -> list[schedules.Window]:
        """If this replica leads: run every due window. Returns the windows taken."""
        if not schedules.acquire_leadership(self.sessions, owner=self.owner,
                                            ttl_seconds=self.ttl_seconds, now=now):
            return []
        windows = schedules.take_due_windows(self.sessions, owner=self.owner,
                                             lease_seconds=self.settings.lease_seconds,
                                             engines=self._engines(), now=now)
        for window in windows:
            if window.skipped:
                log.info("schedule %s (%s): window %s skipped: %s", window.schedule_id,
                         window.lineage, window.due_at.isoformat(), window.skipped)
            elif window.action == "evaluate":
                self._run_evaluation(window)
            else:
                self._run_tickets(window)
        return windows

    def _run_tickets(self, window: schedules.Window) -> None:
        """unlearn / retrain: the window's tickets as one job per engine."""
        by_engine: dict[str, list[ClaimedTicket]] = defaultdict(list)
        for ticket in self._open_payloads(window.tickets):
            by_engine[ticket.engine].append(ticket)
        jobs: list[str] = []
        for tickets in by_engine.values():
            log.info("schedule %s (%s): one %s job for %d ticket(s)", window.schedule_id,
                     window.lineage, window.action, len(tickets),
                     extra={"schedule_id": str(window.schedule_id)})
            try:
                outcome = self._run_batch(tickets)
                self.jobs_run += 1
                if getattr(outcome, "job_id", None) is not None:
                    jobs.append(str(outcome.job_id))
            except Exception:  # the job runner already put the tickets back
                log.exception("scheduled job for %d ticket(s) failed", len(tickets))
        schedules.record_outcome(self.sessions, window, {"jobs": jobs})

    def _run_evaluation(self, window: schedules.Window) -> None:
        """evaluate: the live version's evaluation again, as a job of its own."""
        from workers.reevaluation import reevaluate_live

        try:
            done = reevaluate_live(self._job_context(), lineage_name=window.lineage,
                                   schedule_id=window.schedule_id)
        except Exception as exc:  # the job row has the trace
            log.exception("scheduled evaluation of %s failed", window.lineage)
            schedules.record_outcome(self.sessions, window,
                                     {"error": f"{type(exc).__name__}: {exc}"})
            return
        if isinstance(done, str):
            log.info("schedule %s (%s): nothing evaluated: %s", window.schedule_id,
                     window.lineage, done)
            schedules.record_outcome(self.sessions, window, {"skipped": done})
            return
        self.jobs_run += 1
        schedules.record_outcome(self.sessions, window, done.as_result())

    @staticmethod
    def _engines() -> list[str] | None:
        """Engines this release can train (as the dispatcher claims); None: no workers."""
        try:
            from workers.dispatcher import runnable_engines
        except ImportError:
            return None
        return list(runnable_engines())

    def _open_payloads(self, claimed: list[ClaimedTicket]) -> list[ClaimedTicket]:
        """Decrypt the claimed tickets' sealed forget sets in memory, as the dispatcher does."""
        from storage import queue
        from storage.sealing import cipher_from_config

        config = self.settings.worker_config()
        cipher = cipher_from_config(config.payload_key, config.data_dir / "payload-key")
        return queue.open_or_fail(self.sessions, cipher, claimed, owner=self.owner,
                                  max_attempts=config.max_attempts)

    def _job_context(self) -> Any:
        from workers.job_runner import JobContext

        return JobContext(config=self.settings.worker_config(), sessions=self.sessions,
                          store=self.settings.store_config().open(), owner=self.owner)

    def _run_job(self, tickets: list[ClaimedTicket]) -> Any:
        from workers.job_runner import run_job

        return run_job(self._job_context(), tickets)

    def _forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the DB may be restarting: keep polling
                log.exception("scheduler iteration failed")
            self._stop.wait(self.settings.scheduler_poll_seconds)

    def start(self) -> SchedulerLoop:
        self._thread = threading.Thread(target=self._forever, name="oblivio-scheduler",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            schedules.release_leadership(self.sessions, owner=self.owner)
        except Exception:
            log.debug("could not release the scheduler lease", exc_info=True)
