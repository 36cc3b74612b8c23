"""The operator dashboard: one static page at /dashboard on top of JSON endpoints.

The page (service/dashboard/index.html, no build step, no CDN) asks for an operator token,
keeps it in the browser tab's sessionStorage, and reads and acts only through the API:
`GET /v1/dashboard/overview` (this module), `/v1/tickets` (a ticket's timeline comes with
`GET /v1/tickets/{id}`), the retry route below, and the existing promote / rollback / revoke / cancel routes. So everything the page
shows or does is also what an API client sees, with the same permissions and audit trail.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from service.api.lineages import aliases_by_version
from service.deps import OperatorDep, SessionDep
from service.schemas.tickets import TicketOut
from storage import operations, queue, registry, tickets
from storage.models import TicketStatus

router = APIRouter(tags=["dashboard"])

PAGE = Path(__file__).resolve().parent.parent / "dashboard" / "index.html"


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    # The page holds no data; it asks for a token and reads the API with it.
    return HTMLResponse(_page(), headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                   "style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        "X-Frame-Options": "DENY"})


def ray_dashboard_link(request: Request) -> str | None:
    settings = request.app.state.settings
    if settings.ray_dashboard_url:
        return settings.ray_dashboard_url
    runtime = getattr(request.app.state, "runtime", None)
    return runtime.info.get("ray_dashboard") if runtime is not None else None


@router.get("/v1/dashboard/overview")
def overview(request: Request, session: SessionDep, _caller: OperatorDep) -> dict[str, Any]:
    """Queue, jobs and lineages (with every version) in one read, for the dashboard."""
    counts = queue.count_by_status(session)
    lineages = []
    for lineage in registry.list_lineages(session):
        aliases = aliases_by_version(session, lineage)
        lineages.append({
            "name": lineage.name, "engine": lineage.engine, "base_model": lineage.base_model,
            "aliases": {name: str(vid) for vid, names in aliases.items() for name in names},
            "versions": [{
                "id": str(v.id), "version": v.version,
                "label": registry.version_label(lineage.name, v.version),
                "status": v.status.value,
                "parent_id": str(v.parent_id) if v.parent_id else None,
                "ticket_ids": list(v.ticket_ids or []),
                "job_id": str(v.job_id) if v.job_id else None,
                "metrics": _numeric(v.metrics), "aliases": aliases.get(v.id, []),
                "created_at": v.created_at.isoformat(), "sha256": v.sha256,
            } for v in registry.list_versions(session, lineage_name=lineage.name)],
        })
    jobs = [{
        "id": str(row.job.id), "lineage": row.lineage, "engine": row.job.engine,
        "status": row.job.status.value, "ray_job_id": row.job.ray_job_id,
        "ticket_ids": list(row.job.ticket_ids or []), "progress": row.job.progress,
        "error": row.job.error, "created_at": row.job.created_at.isoformat(),
        "started_at": row.job.started_at.isoformat() if row.job.started_at else None,
        "finished_at": row.job.finished_at.isoformat() if row.job.finished_at else None,
    } for row in operations.recent_jobs(session)]
    return {
        "queue_depth": queue.queue_depth(session),
        "tickets_by_status": {s.value: counts.get(s.value, 0) for s in TicketStatus},
        "queued_by_lineage": operations.tickets_by_lineage(session),
        "ray_dashboard": ray_dashboard_link(request),
        "lineages": lineages,
        "jobs": jobs,
    }


def _numeric(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The scalar metrics of a version (nested training curves stay in the version API)."""
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float, str, bool)) or v is None}


@router.post("/v1/tickets/{ticket_id}/retry", response_model=TicketOut)
def retry(ticket_id: uuid.UUID, session: SessionDep, caller: OperatorDep) -> TicketOut:
    """Retry now, with a fresh attempt budget, a queued ticket whose last attempt failed
    (final tickets have had their forget set deleted and cannot be retried)."""
    ticket = operations.retry_ticket(session, ticket_id=ticket_id, actor=caller.principal)
    return TicketOut.from_view(tickets.describe(session, [ticket])[0])
