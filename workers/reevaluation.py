"""Re-evaluating a lineage's live version: what an `evaluate` schedule's window runs.

A stacked lineage changes with every request, and the report a version got when it was
published covered that job's tickets only. This runs the engine's evaluation of the *live*
version again, against the base model, on the tickets whose forgetting it holds now (the
lineage's done forget tickets, newest first, at most `max_tickets`): does it still forget
every one of them, and keep its utility? It is a job of its own (a `jobs` row whose
`method_config.kind` is "reevaluate", with progress, phases and the result in
`progress.evaluation`) on the same evaluator as a training job's evaluation, and it makes
no version: versions are immutable, this only reads one. The full report is stored in the
object store (`reports/<sha256>.json`), and an audit record `version.reevaluated` keeps the
verdict next to the version's history.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage import audit, registry
from storage.db import transaction
from storage.models import Job, JobStatus, Ticket, TicketKind, TicketStatus, utcnow
from storage.queue import ClaimedTicket
from workers.job_runner import (
    JobContext,
    evaluate_job_version,
    finish_job,
    finish_job_in,
    jobs_dir,
    observe_finished,
    set_job_progress,
    store_report,
)

log = logging.getLogger(__name__)

REEVALUATE_KIND = "reevaluate"  # jobs.method_config["kind"] of a re-evaluation job
SUMMARY_KEYS = ("verdict", "forget_ratio", "utility_ratio", "forget_rate_before",
                "forget_rate_after", "utility_rate_before", "utility_rate_after")


@dataclass(frozen=True)
class Reevaluation:
    """A finished re-evaluation: its job, the version it scored, and the figures."""

    job_id: uuid.UUID
    version: str
    tickets: int
    summary: dict[str, Any]

    def as_result(self) -> dict[str, Any]:
        return {"job_id": str(self.job_id), "version": self.version,
                "evaluated_tickets": self.tickets, "evaluation": self.summary}


def reevaluate_live(ctx: JobContext, *, lineage_name: str, max_tickets: int,
                    min_tickets: int = 1,
                    schedule_id: uuid.UUID | None = None) -> Reevaluation | str:
    """Evaluate the live version of `lineage_name` on its done forget tickets. Returns the
    result, or why there was nothing to evaluate (no live version, too few tickets)."""
    from workers.job_phases import PhaseClock

    now = utcnow()
    with transaction(ctx.sessions) as s:
        live = registry.resolve(s, lineage_name=lineage_name, ref="live")
        if live is None:
            return "no live version to evaluate"
        rows = list(s.scalars(
            select(Ticket).where(Ticket.lineage_id == live.lineage_id,
                                 Ticket.kind == TicketKind.forget,
                                 Ticket.status == TicketStatus.done)
            .order_by(Ticket.created_at.desc()).limit(max_tickets)))
        if len(rows) < min_tickets:
            return (f"{len(rows)} done forget ticket(s), fewer than min_tickets "
                    f"{min_tickets}")
        label = registry.version_label(lineage_name, live.version)
        # Done tickets hold no lease; the snapshot's lease fields only satisfy the type.
        tickets = [_snapshot(t, owner=ctx.owner, until=now) for t in reversed(rows)]
        engine_name = tickets[-1].engine
        job = Job(lineage_id=live.lineage_id, engine=engine_name,
                  ticket_ids=[str(t.id) for t in tickets], status=JobStatus.running,
                  started_at=now, progress={"phase": "preparing"},
                  method_config={"kind": REEVALUATE_KIND, "version": label,
                                 "version_id": str(live.id),
                                 "schedule_id": str(schedule_id) if schedule_id else None})
        s.add(job)
        s.flush()
        job_id, version_id, object_key = job.id, live.id, live.object_key
        version_base_sha = live.base_model_sha256
    clock = PhaseClock(submitted_at=now)
    workdir = Path(tempfile.mkdtemp(prefix="oblivio-reeval-", dir=jobs_dir(ctx.config)))
    try:
        with clock.phase("evaluation"):
            summary, metrics = _evaluate_live(ctx, job_id, lineage_name, engine_name,
                                              tickets, object_key, version_base_sha, workdir)
    except Exception as exc:
        from workers.failures import full_trace, one_line_cause

        log.exception("re-evaluation of %s failed", label)
        finish_job(ctx, job_id, JobStatus.failed, clock,
                    error=f"{one_line_cause(exc)}\n\n{full_trace(exc)}")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with transaction(ctx.sessions) as s:
        row = s.get_one(Job, job_id)
        row.progress = {**(row.progress or {}), "evaluation": summary}
        finish_job_in(s, job_id, JobStatus.succeeded, clock)
        audit.record(s, actor=ctx.owner, action="version.reevaluated",
                     subject_type="version", subject_id=version_id,
                     detail={"job_id": str(job_id), "tickets": len(tickets), **summary,
                             "report": metrics.get("report")})
    observe_finished(job_id, clock)
    log.info("re-evaluated %s on %d ticket(s): %s", label, len(tickets), summary)
    return Reevaluation(job_id=job_id, version=label, tickets=len(tickets), summary=summary)


def _evaluate_live(ctx: JobContext, job_id: uuid.UUID, lineage_name: str, engine_name: str,
                   tickets: list[ClaimedTicket], object_key: str | None,
                   version_base_sha: str | None,
                   workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers import job_compute
    from workers.engines import get_engine

    base = job_compute.resolve_base(ctx.config)
    if version_base_sha and version_base_sha != base.sha256:
        raise RuntimeError(f"the live version was trained on base model {version_base_sha[:12]}"
                           f", this service runs {base.sha256[:12]}")
    if not object_key:
        raise RuntimeError("the live version has no stored files")
    opened = _open_payloads(ctx, tickets)
    set_job_progress(ctx, job_id, [], {"phase": "evaluating", "tickets": len(opened)})
    version_dir = ctx.store.fetch_directory(object_key, workdir / "version")

    def fetch(key: str) -> Path:
        return ctx.store.fetch_directory(key, workdir / "fetched" / uuid.uuid4().hex)

    # Against the base model only (no parent): every ticket is a request under test here.
    job = job_compute.job_input(ctx.config, job_id=str(job_id), lineage=lineage_name,
                                base=base, tickets=opened, parent_dir=None,
                                output_dir=version_dir, fetch=fetch, sessions=ctx.sessions)
    metrics = evaluate_job_version(ctx, job_id, [], get_engine(engine_name), job, base,
                                   version_dir, fetch)
    store_report(ctx, version_dir, metrics)
    summary = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
    if isinstance(metrics.get("report"), dict):
        summary["report_object_key"] = metrics["report"].get("object_key")
    return summary, metrics


def _open_payloads(ctx: JobContext, tickets: list[ClaimedTicket]) -> list[ClaimedTicket]:
    """The tickets' forget sets, opened in memory (sealed at rest); one that cannot be opened
    is left out of the evaluation, with a warning."""
    import dataclasses

    from storage.sealing import PayloadUnreadable, cipher_from_config

    config = ctx.config
    cipher = cipher_from_config(config.payload_key, config.data_dir / "payload-key")
    opened = []
    for ticket in tickets:
        try:
            payload = cipher.open(ticket.payload, expected_sha256=ticket.payload_sha256)
        except PayloadUnreadable as exc:
            log.warning("ticket %s left out of the re-evaluation: %s", ticket.id, exc)
            continue
        opened.append(dataclasses.replace(ticket, payload=payload))
    if not opened:
        raise RuntimeError("none of the tickets' forget sets could be opened")
    return opened


def _snapshot(t: Ticket, *, owner: str, until: datetime) -> ClaimedTicket:
    return ClaimedTicket(id=t.id, lineage_id=t.lineage_id, kind=t.kind, engine=t.engine,
                         target=t.target, payload=t.payload, payload_sha256=t.payload_sha256,
                         priority=t.priority, attempts=t.attempts, requester=t.requester,
                         created_at=t.created_at, lease_owner=owner,
                         lease_expires_at=until)

