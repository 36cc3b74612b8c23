"""The database side of one unlearning job, start to finish: tickets in, a stored, versioned (maybe promoted) adapter out.

The dispatcher (a thin Ray actor) claims tickets and hands them here. Every step writes what
is true to the database before the next begins, so a crash anywhere leaves either the
previous state or an expired lease that puts the tickets back in the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from storage import queue, registry
from storage.db import transaction
from storage.errors import InvalidRequest
from storage.models import Job, JobStatus, Lineage, Ticket, TicketStatus, utcnow
from storage.objectstore import CorruptObject, ObjectStore
from storage.queue import ClaimedTicket
from workers.config import WorkerConfig
from workers.logcontext import bind_log_context, unbind_log_context
from workers.telemetry import merge_progress, observe_phases
from workers.engines.base import MANIFEST_FILE
from workers.job_phases import PhaseClock
from workers.failpoints import failpoint
from workers.failures import full_trace, is_permanent, one_line_cause, retry_delay_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a job needs from its surroundings (all of it picklable except `sessions`)."""

    config: WorkerConfig
    sessions: sessionmaker[Session]
    store: ObjectStore
    owner: str


@dataclass
class JobOutcome:
    job_id: uuid.UUID
    version_id: uuid.UUID | None
    version: int | None
    promoted: bool
    metrics: dict[str, Any] = field(default_factory=dict)


class LeaseLost(RuntimeError):
    """Another claimer owns the tickets now; stop without writing anything."""


class LeaseKeeper:
    """Renews the tickets' lease in the background while a long step runs."""

    def __init__(self, ctx: JobContext, ticket_ids: list[uuid.UUID]) -> None:
        self._ctx, self._ids = ctx, ticket_ids
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        period = max(1.0, self._ctx.config.lease_seconds / 3)
        while not self._stop.wait(period):
            try:
                kept = queue.renew_lease(self._ctx.sessions, ticket_ids=self._ids,
                                         owner=self._ctx.owner,
                                         lease_seconds=self._ctx.config.lease_seconds)
            except Exception:  # a DB blip: try again next period, the lease has slack
                log.exception("lease renewal failed")
                continue
            if len(kept) < len(self._ids):
                self.lost = True
                return


def run_job(ctx: JobContext, tickets: list[ClaimedTicket]) -> JobOutcome:
    """Train, store, register, evaluate and (maybe) promote one adapter for `tickets`."""
    if not tickets:
        raise ValueError("a job needs at least one ticket")
    lineage_id = tickets[0].lineage_id
    ids = [t.id for t in tickets]
    clock = PhaseClock(submitted_at=min(t.created_at for t in tickets))
    job_id = _create_job(ctx, tickets)
    log_token = bind_log_context(job_id=job_id)  # every log line of this job carries its id
    workdir = Path(tempfile.mkdtemp(prefix="oblivio-job-", dir=jobs_dir(ctx.config)))
    try:
        with LeaseKeeper(ctx, ids) as keeper:
            outcome = _run_steps(ctx, job_id, lineage_id, tickets, workdir, keeper, clock)
        return outcome
    except LeaseLost:
        finish_job(ctx, job_id, JobStatus.failed, clock, error="lease lost to another claimer")
        raise
    except Exception as exc:
        # The submitter's ticket gets one readable line; the job record keeps the whole
        # trace for operators. Only a failure that may go away is retried, later each time.
        log.exception("job %s failed", job_id)
        cause = one_line_cause(exc)
        permanent = is_permanent(exc)
        finish_job(ctx, job_id, JobStatus.failed, clock, error=f"{cause}\n\n{full_trace(exc)}")
        config = ctx.config
        for ticket in tickets:
            delay = retry_delay_seconds(ticket.attempts, base=config.retry_backoff_seconds,
                                        cap=config.retry_backoff_max_seconds)
            queue.fail(ctx.sessions, ticket_id=ticket.id, owner=ctx.owner, error=cause,
                       retry=not permanent, max_attempts=config.max_attempts,
                       retry_delay_seconds=delay)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        unbind_log_context(log_token)


def _run_steps(ctx: JobContext, job_id: uuid.UUID, lineage_id: uuid.UUID,
               tickets: list[ClaimedTicket], workdir: Path, keeper: LeaseKeeper,
               clock: PhaseClock) -> JobOutcome:
    from workers import job_compute
    from workers.engines import get_engine

    config = ctx.config
    ids = [t.id for t in tickets]
    # One engine per job: the dispatcher groups claimed tickets by (lineage, engine).
    engine = get_engine(tickets[0].engine)

    def progress(update: dict[str, Any]) -> None:
        if keeper.lost:
            raise LeaseLost(str(job_id))
        set_job_progress(ctx, job_id, ids, update)

    progress({"phase": "preparing"})
    base = job_compute.resolve_base(config)
    with transaction(ctx.sessions) as s:
        lineage = s.get_one(Lineage, lineage_id)
        _check_base_model(s, lineage, base.sha256)
        parent = registry.resolve(s, lineage_name=lineage.name, ref="live")
        parent_id = parent.id if parent else None
        parent_key = parent.object_key if parent else None
        version = registry.create_version(
            s, lineage=lineage, parent_id=parent_id, ticket_ids=[str(i) for i in ids],
            job_id=job_id, peft_config=None, base_model_sha256=base.sha256, actor=ctx.owner)
        version_id, version_no, lineage_name = version.id, version.version, lineage.name

    parent_dir = None
    if parent_key:
        parent_dir = workdir / "parent"
        try:
            ctx.store.fetch_directory(parent_key, parent_dir)
        except CorruptObject as exc:
            # The live version's files fail their sha256: it must never be built on or
            # served again. Live falls back to the version before it; this attempt fails
            # and the retry stacks on that one instead.
            with transaction(ctx.sessions) as s:
                registry.mark_failed(s, version_id=version_id, actor=ctx.owner,
                                     reason=f"parent adapter is corrupt: {exc}")
                registry.mark_corrupt(s, version_id=parent_id, actor=ctx.owner,
                                      reason=f"adapter failed its checksum at load: {exc}")
            raise

    def fetch(key: str) -> Path:
        return ctx.store.fetch_directory(key, workdir / "fetched" / uuid.uuid4().hex)

    def store_dir(directory: Path) -> str:
        return ctx.store.put_directory_content_addressed(directory).key

    job = job_compute.job_input(config, job_id=str(job_id), lineage=lineage_name, base=base,
                                tickets=tickets, parent_dir=parent_dir,
                                output_dir=workdir / "version", fetch=fetch,
                                store_dir=store_dir, sessions=ctx.sessions)
    with _version_failed_on_error(ctx, version_id):
        with clock.train_call():
            artifacts = engine.train(job, progress)
        clock.split_training(artifacts.metrics)
        _save_phases(ctx, job_id, clock)
        with clock.phase("evaluation"):
            progress({"phase": "evaluating"})
            queue.set_progress(ctx.sessions, ticket_ids=ids, owner=ctx.owner,
                               status=TicketStatus.evaluating, progress={"phase": "evaluating"})
            metrics = evaluate_job_version(ctx, job_id, ids, engine, job, base,
                                           artifacts.version_dir, fetch)
        verdict = metrics.get("verdict")
        if verdict not in ("pass", "hold", "reject"):
            raise RuntimeError(f"engine {engine.name!r} gave no verdict (got {verdict!r})")
        metrics["training"] = artifacts.metrics
        if artifacts.withdrawn:  # read by ticket_states: these tickets are not live here
            metrics["withdrawn_tickets"] = list(artifacts.withdrawn)
        with clock.phase("upload"):
            _write_manifest(artifacts.version_dir, engine=engine.name, base=base,
                            tickets=tickets, metrics=metrics, method=artifacts.method_config,
                            parent_id=parent_id)
            progress({"phase": "uploading"})
            stored = ctx.store.put_directory_content_addressed(artifacts.version_dir)
            store_report(ctx, artifacts.version_dir, metrics)

    promote_started = time.time()
    reason = _verdict_reason(metrics, verdict)
    receipt = {
        "version": f"{lineage_name}@v{version_no}",
        "version_id": str(version_id),
        "parent_id": str(parent_id) if parent_id else None,
        "adapter_sha256": stored.sha256,
        "object_key": stored.key,
        "engine": engine.name,
        "base_model": base.name,
        "base_model_sha256": base.sha256,
        "method": artifacts.method_config,
        "metrics": metrics,
        "job_id": str(job_id),
        # What the engine adds (S3T: deleted record ids and the exactness evidence).
        **artifacts.receipt,
    }
    failpoint("publish.before")
    # One commit publishes the job: the version's status, the alias move, every ticket's
    # settlement, the job's end and its follow-up tickets. A crash before it leaves the
    # version unfinished (abandoned when the leases expire; the tickets run again); after
    # it, nothing is left to do. No ticket can end up both in a ready version and queued.
    promoted = verdict == "pass" and config.auto_promote
    # (An error here, e.g. a refused promotion, fails the version: it is never served.)
    with _version_failed_on_error(ctx, version_id), transaction(ctx.sessions) as s:
        if verdict == "reject":
            registry.mark_failed(s, version_id=version_id, actor=ctx.owner,
                                 reason=reason, metrics=metrics)
            error = f"version {lineage_name}@v{version_no} {reason}"
            settled = [queue.reject_in(s, ticket_id=t.id, owner=ctx.owner, error=error)
                       for t in tickets]
            ending: dict[str, Any] = {"status": JobStatus.failed, "error": error}
        else:
            registry.mark_ready(s, version_id=version_id, object_key=stored.key,
                                sha256=stored.sha256, size=stored.size, metrics=metrics,
                                peft_config=artifacts.peft_config, actor=ctx.owner)
            registry.promote(s, lineage_name=lineage_name, version=version_no,
                             actor=ctx.owner, alias="live" if promoted else "candidate")
            # Whether this job promoted it; the ticket's status (and the receipt's `live`)
            # says whether live contains it now: complete_in reads live.
            receipt["auto_promoted"] = promoted
            settled = [queue.complete_in(s, ticket_id=t.id, owner=ctx.owner,
                                         version_id=version_id,
                                         receipt={**receipt, "payload_sha256": t.payload_sha256})
                       for t in tickets]
            _queue_follow_ups(s, lineage_id, artifacts.follow_up, requester=ctx.owner)
            ending = {"status": JobStatus.succeeded, "live": promoted}
        if not all(settled):  # another claimer holds a ticket: publish nothing
            raise LeaseLost(str(job_id))
        clock.add("promote", promote_started, time.time())
        finish_job_in(s, job_id, clock=clock, **ending)
        failpoint("publish.commit")
    failpoint("publish.after")
    observe_finished(job_id, clock)
    if verdict == "reject":
        return JobOutcome(job_id, None, None, False, metrics)
    return JobOutcome(job_id, version_id, version_no, promoted, metrics)


def evaluate_job_version(ctx: JobContext, job_id: uuid.UUID, ids: list[uuid.UUID],
                         engine: Any, job: Any, base: Any, version_dir: Path,
                         fetch: Callable[[str], Path]) -> dict[str, Any]:
    """The version's evaluation: a Ray task on the evaluator (workers/evaluator.py), or in
    this process with trainer "plain" (everything in one process)."""
    from workers import job_compute

    if ctx.config.trainer == "plain":
        return job_compute.evaluate_version(engine, job, base=base, version_dir=version_dir,
                                            fetch=fetch)
    from workers.evaluator import evaluate_on_ray

    done = evaluate_on_ray(engine.name, job, version_dir=version_dir)
    set_job_progress(ctx, job_id, ids, {"evaluation_node": done.node_id})
    return done.metrics


@contextlib.contextmanager
def _version_failed_on_error(ctx: JobContext, version_id: uuid.UUID) -> Iterator[None]:
    """Any error but a lost lease marks the job's version failed (never served), then goes
    on up to run_job, which fails or retries the tickets."""
    try:
        yield
    except LeaseLost:
        raise
    except Exception as exc:
        with transaction(ctx.sessions) as s:
            registry.mark_failed(s, version_id=version_id, actor=ctx.owner,
                                 reason=one_line_cause(exc))
        raise


def _queue_follow_ups(session: Session, lineage_id: uuid.UUID,
                      follow_up: list[dict[str, Any]], *, requester: str) -> None:
    """Tickets the engine asked for once its version is published (S3T: the background
    retrain of the layers a deletion cut), into the same durable queue."""
    from storage import tickets as ticket_store

    for item in follow_up:
        ticket_store.submit_follow_up(session, lineage_id=lineage_id, kind=item["kind"],
                                      engine=item["engine"], payload=item["payload"],
                                      requester=requester)


def store_report(ctx: JobContext, version_dir: Path, metrics: dict[str, Any]) -> None:
    """The evaluation report as its own object too (it is also inside the version's tar),
    content addressed, so receipts and auditors can fetch it by key and check its hash."""
    ref = metrics.get("report")
    if not isinstance(ref, dict) or not ref.get("path"):
        return
    stored = ctx.store.put_file(f"reports/{ref['sha256']}.json", version_dir / ref["path"])
    ref["object_key"] = stored.key


def _verdict_reason(metrics: dict[str, Any], verdict: str) -> str:
    """Why the version was judged so, as the end of a sentence starting with its label."""
    if metrics.get("verdict_reason"):
        return str(metrics["verdict_reason"])
    utility = metrics.get("utility_ratio")
    if verdict == "reject" and isinstance(utility, (int, float)):
        return f"kept too little utility ({utility:.2f} of the base model's answers)"
    return f"was judged {verdict!r} by its evaluation"


def _check_base_model(session: Session, lineage: Lineage, sha256: str) -> None:
    # The first job pins the lineage to the base model's content; any later mismatch means
    # the adapters would be applied to weights they were not trained on.
    if lineage.base_model_sha256 is None:
        lineage.base_model_sha256 = sha256
    elif lineage.base_model_sha256 != sha256:
        raise InvalidRequest(
            f"lineage {lineage.name!r} was trained on base model {lineage.base_model_sha256[:12]}"
            f", but the configured base model is {sha256[:12]}; refusing to mix them")


def _write_manifest(version_dir: Path, *, engine: str, base: Any, tickets: list[ClaimedTicket],
                    metrics: dict[str, Any], method: dict[str, Any],
                    parent_id: uuid.UUID | None) -> None:
    # "engine" tells serving whose load_servable answers for this version.
    manifest = {
        "engine": engine,
        "base_model": base.name,
        "base_model_sha256": base.sha256,
        "parent_id": str(parent_id) if parent_id else None,
        "tickets": [{"id": str(t.id), "payload_sha256": t.payload_sha256} for t in tickets],
        "method": method,
        "metrics": metrics,
    }
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2,
                                                                  sort_keys=True))


def jobs_dir(config: WorkerConfig) -> Path:
    path = config.data_dir / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _create_job(ctx: JobContext, tickets: list[ClaimedTicket]) -> uuid.UUID:
    with transaction(ctx.sessions) as s:
        adopted = _pending_job(s, tickets)
        if adopted is not None:
            # Created with the ticket at submission (a fine-tune answers with its job id);
            # its first attempt runs under that id. Retries get a job of their own.
            adopted.status, adopted.started_at = JobStatus.running, utcnow()
            return adopted.id
        job = Job(lineage_id=tickets[0].lineage_id, engine=tickets[0].engine,
                  ticket_ids=[str(t.id) for t in tickets], status=JobStatus.running,
                  started_at=utcnow(), progress={"phase": "queued"})
        s.add(job)
        s.flush()
        s.execute(update(Ticket).where(Ticket.id.in_([t.id for t in tickets]))
                  .values(job_id=job.id))
        return job.id


def _pending_job(session: Session, tickets: list[ClaimedTicket]) -> Job | None:
    ids = {t.id for t in tickets}
    job_ids = set(session.scalars(select(Ticket.job_id).where(Ticket.id.in_(ids))))
    if len(job_ids) != 1 or None in job_ids:
        return None
    job = session.get(Job, job_ids.pop())
    if (job is None or job.status is not JobStatus.pending
            or {uuid.UUID(str(i)) for i in job.ticket_ids or []} != ids):
        return None
    return job


def set_job_progress(ctx: JobContext, job_id: uuid.UUID, ticket_ids: list[uuid.UUID],
                  update: dict[str, Any]) -> None:
    with transaction(ctx.sessions) as s:
        job = s.get_one(Job, job_id)
        job.progress = merge_progress(job.progress, update)
        if update.get("phase") == "evaluating":
            job.status = JobStatus.evaluating
    queue.set_progress(ctx.sessions, ticket_ids=ticket_ids, owner=ctx.owner, progress=update)


def finish_job(ctx: JobContext, job_id: uuid.UUID, status: JobStatus, clock: PhaseClock, *,
                live: bool = False, error: str | None = None) -> None:
    """The job's end: its status, and the phase clock's record (the one source of its phase
    timings: the job row for /metrics and GET /v1/jobs/{id}, and Ray's histogram)."""
    with transaction(ctx.sessions) as s:
        finish_job_in(s, job_id, status, clock, live=live, error=error)
    observe_finished(job_id, clock)


def finish_job_in(session: Session, job_id: uuid.UUID, status: JobStatus, clock: PhaseClock,
                   *, live: bool = False, error: str | None = None) -> None:
    job = session.get_one(Job, job_id)
    job.status, job.error, job.finished_at = status, error, utcnow()
    job.progress = merge_progress(job.progress, {**clock.record(live=live),
                                                 "phase": status.value})


def observe_finished(job_id: uuid.UUID, clock: PhaseClock) -> None:
    observe_phases(clock)
    log.info("job %s phases (s): %s", job_id, clock.seconds())


def _save_phases(ctx: JobContext, job_id: uuid.UUID, clock: PhaseClock) -> None:
    """The phases so far, on the job only (GET /v1/jobs/{id} shows them while it runs)."""
    with transaction(ctx.sessions) as s:
        job = s.get_one(Job, job_id)
        job.progress = {**(job.progress or {}), **clock.record(live=False)}


ProgressFn = Callable[[dict[str, Any]], None]
