"""Re-evaluating a lineage's live version: what an `evaluate` schedule's window runs.

A version is immutable, but what it runs with is not: a new release (its probe sets, torch
and transformers), another device, the operator's evaluation settings. This asks the live
version, against the base model, everything of the shared report that does not need a
forget set (unrelated utility, neighbours, the general benchmark), with the probes that
mention one of its done tickets' targets left out, exactly as at publication. A ticket's
forget set is deleted once it is done (data minimisation), so forgetting is not measured
again: the figures from the version's publication are carried next to the new ones.

It is a job of its own (a `jobs` row whose `method_config.kind` is "reevaluate", with
progress, phases and the result in `progress.evaluation`) on the same evaluator as a
training job's evaluation, and makes no version. The full report is stored in the object
store (`reports/<sha256>.json`); an audit record `version.reevaluated` keeps the verdict
next to the version's history. The verdict is the utility half of the promotion rule:
"pass" at or above `min_utility_ratio`, "reject" below `reject_utility_ratio`, else "hold".
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage import audit, registry
from storage.db import transaction
from storage.models import Job, JobStatus, Lineage, Ticket, TicketKind, TicketStatus, utcnow
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
MEASURED = ("utility_ratio", "utility_rate_before", "utility_rate_after", "utility_probes",
            "neighbour_ratio", "neighbour_probes", "general_ratio", "general_probes")
AT_PUBLICATION = ("forget_ratio", "utility_ratio", "neighbour_ratio", "verdict")


@dataclass(frozen=True)
class Reevaluation:
    """A finished re-evaluation: its job, the version it scored, and the figures."""

    job_id: uuid.UUID
    version: str
    targets: int
    summary: dict[str, Any]

    def as_result(self) -> dict[str, Any]:
        return {"job_id": str(self.job_id), "version": self.version,
                "excluded_targets": self.targets, "evaluation": self.summary}


def reevaluate_live(ctx: JobContext, *, lineage_name: str,
                    schedule_id: uuid.UUID | None = None) -> Reevaluation | str:
    """Evaluate the live version of `lineage_name` again. Returns the result, or why there
    was nothing to evaluate (no live version)."""
    from workers.job_phases import PhaseClock

    now = utcnow()
    with transaction(ctx.sessions) as s:
        live = registry.resolve(s, lineage_name=lineage_name, ref="live")
        if live is None:
            return "no live version to evaluate"
        targets = sorted({t for t in s.scalars(
            select(Ticket.target).where(Ticket.lineage_id == live.lineage_id,
                                        Ticket.kind == TicketKind.forget,
                                        Ticket.status == TicketStatus.done)) if t})
        label = registry.version_label(lineage_name, live.version)
        engine_name = s.get_one(Lineage, live.lineage_id).engine
        job = Job(lineage_id=live.lineage_id, engine=engine_name, ticket_ids=[],
                  status=JobStatus.running, started_at=now, progress={"phase": "preparing"},
                  method_config={"kind": REEVALUATE_KIND, "version": label,
                                 "version_id": str(live.id),
                                 "schedule_id": str(schedule_id) if schedule_id else None})
        s.add(job)
        s.flush()
        job_id, version_id = job.id, live.id
        published = {k: (live.metrics or {}).get(k) for k in AT_PUBLICATION}
        stored = (live.object_key, live.base_model_sha256)
    clock = PhaseClock(submitted_at=now)
    workdir = Path(tempfile.mkdtemp(prefix="oblivio-reeval-", dir=jobs_dir(ctx.config)))
    try:
        with clock.phase("evaluation"):
            metrics = _evaluate_live(ctx, job_id, lineage_name, engine_name, targets, *stored,
                                     workdir=workdir)
    except Exception as exc:
        from workers.failures import full_trace, one_line_cause

        log.exception("re-evaluation of %s failed", label)
        finish_job(ctx, job_id, JobStatus.failed, clock,
                   error=f"{one_line_cause(exc)}\n\n{full_trace(exc)}")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {**{k: metrics.get(k) for k in MEASURED}, **_utility_verdict(ctx, metrics),
               "at_publication": published,
               "report_object_key": (metrics.get("report") or {}).get("object_key")}
    with transaction(ctx.sessions) as s:
        row = s.get_one(Job, job_id)
        row.progress = {**(row.progress or {}), "evaluation": summary}
        finish_job_in(s, job_id, JobStatus.succeeded, clock)
        audit.record(s, actor=ctx.owner, action="version.reevaluated",
                     subject_type="version", subject_id=version_id,
                     detail={"job_id": str(job_id), **summary})
    observe_finished(job_id, clock)
    log.info("re-evaluated %s: %s", label, summary)
    return Reevaluation(job_id=job_id, version=label, targets=len(targets), summary=summary)


def _evaluate_live(ctx: JobContext, job_id: uuid.UUID, lineage_name: str, engine_name: str,
                   targets: list[str], object_key: str | None, version_base_sha: str | None,
                   *, workdir: Path) -> dict[str, Any]:
    from workers import job_compute
    from workers.engines import get_engine
    from workers.engines.base import EngineRequest, JobInput

    base = job_compute.resolve_base(ctx.config)
    if version_base_sha and version_base_sha != base.sha256:
        raise RuntimeError(f"the live version was trained on base model {version_base_sha[:12]}"
                           f", this service runs {base.sha256[:12]}")
    if not object_key:
        raise RuntimeError("the live version has no stored files")
    set_job_progress(ctx, job_id, [], {"phase": "evaluating"})
    version_dir = ctx.store.fetch_directory(object_key, workdir / "version")

    def fetch(key: str) -> Path:
        return ctx.store.fetch_directory(key, workdir / "fetched" / uuid.uuid4().hex)

    # Targets only, no forget sets (deleted when done): they keep the probes that mention
    # a target out, as at publication. Against the base model only: no parent.
    job = JobInput(job_id=str(job_id), lineage=lineage_name,
                   requests=[EngineRequest(kind="forget", engine=engine_name, target=t)
                             for t in targets],
                   ticket_ids=[], base_model_path=Path(base.local_path),
                   base_model_sha256=base.sha256, parent_dir=None, output_dir=version_dir,
                   config=ctx.config, fetch=fetch, sessions=ctx.sessions)
    metrics = evaluate_job_version(ctx, job_id, [], get_engine(engine_name), job, base,
                                   version_dir, fetch)
    store_report(ctx, version_dir, metrics)
    return metrics


def _utility_verdict(ctx: JobContext, metrics: dict[str, Any]) -> dict[str, str]:
    from workers.evaluation.version_eval import configs_from

    config, _relearn = configs_from(ctx.config.evaluation)
    ratio = metrics.get("utility_ratio")
    if not isinstance(ratio, (int, float)):
        return {"verdict": "hold", "verdict_reason": "utility cannot be judged: the base "
                "model answered none of the unrelated probes"}
    if ratio < config.reject_utility_ratio:
        return {"verdict": "reject", "verdict_reason": f"utility {ratio:.2f} of the base "
                f"model's, below the floor {config.reject_utility_ratio:.2f}"}
    if ratio < config.min_utility_ratio:
        return {"verdict": "hold", "verdict_reason": f"utility {ratio:.2f} of the base "
                f"model's, below {config.min_utility_ratio:.2f}: an operator decides"}
    return {"verdict": "pass", "verdict_reason": f"kept utility ({ratio:.2f} >= "
            f"{config.min_utility_ratio:.2f})"}
