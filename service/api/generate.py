"""/v1/generate: answer with the base model plus the lineage's live (or pinned) version.

`answer()` is the one generation path of the API: /v1/generate and the OpenAI-compatible
/v1/chat/completions (service.api.openai_compat) both call it, so a change to how a version
is resolved or served applies to both.

A stored adapter that fails its sha256 when a replica loads it is taken out of service
(`registry.mark_corrupt`: failed, live falls back to the previous version) and the request
is answered by what serving falls back to.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.deps import SessionDep, SubmitterDep
from service.schemas.generate import GenerateIn, GenerateOut
from storage import registry
from storage.db import transaction
from storage.errors import Conflict
from storage.models import AdapterVersion, VersionStatus
from storage.objectstore.base import CorruptObject

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["generate"])

# A version may answer while it is the current or an earlier good one; training, failed
# and revoked versions never do.
_SERVABLE = (VersionStatus.ready, VersionStatus.superseded)
BASE = "base"  # a version reference meaning the lineage's base model, no adapter
_CORRUPT_RETRIES = 2


@dataclass(frozen=True)
class Answer:
    """What one generation produced and which version produced it (label None = base)."""

    text: str
    lineage: str
    label: str | None
    version_id: str | None


def _servable(session: Session, lineage: str, ref: str | None) -> AdapterVersion | None:
    """The version to serve, then the DB released (commit) before the slow generation."""
    if ref == BASE:
        registry.get_lineage(session, lineage)  # 404 for an unknown lineage
        version = None
    else:
        version = registry.resolve(session, lineage_name=lineage, ref=ref)
    if version is not None and version.status not in _SERVABLE:
        raise Conflict(f"version {lineage}@v{version.version} is {version.status.value} "
                       "and cannot be served")
    if version is not None and (gone := registry.deleted_records_served(session, version)):
        # Between a deletion and its version going live (seconds), or when asked by number.
        raise Conflict(f"version {lineage}@v{version.version} serves layers trained on "
                       f"{len(gone)} deleted record(s) and cannot be served; its deletion "
                       "version goes live once the delete_records job finishes")
    session.commit()
    return version


def _quarantine(request: Request, version_id: uuid.UUID, reason: str) -> None:
    with transaction(request.app.state.sessions) as s:
        registry.mark_corrupt(s, version_id=version_id, actor="serving",
                              reason=f"adapter failed its checksum at load: {reason}")


async def answer(request: Request, session: Session, *, lineage: str, ref: str | None,
                 prompt: str, max_new_tokens: int) -> Answer:
    """Resolve `ref` (default live; `base` = no adapter) in `lineage`, release the DB,
    generate through Serve."""
    # Database work in a thread, never on the event loop: on SQLite it may wait for the
    # write lock, and the request holding that lock needs the loop to finish.
    version = await run_in_threadpool(_servable, session, lineage, ref)
    backend = getattr(request.app.state, "generator", None)
    if backend is None:
        raise HTTPException(status_code=503, detail="generation is not running in this process;"
                            " start the service with `oblivio serve`")
    from workers.serving import generate as serve_generate  # Ray: only when serving

    metrics = getattr(request.app.state, "metrics", None)
    timer = metrics.generate_timer(lineage) if metrics is not None else None
    for _ in range(_CORRUPT_RETRIES + 1):
        key = version.object_key if version is not None else None
        try:
            result = await run_in_threadpool(serve_generate, backend, prompt=prompt,
                                             adapter_key=key, max_new_tokens=max_new_tokens)
            break
        except CorruptObject as exc:  # Ray re-raises it as a subclass of the cause
            if version is None:
                raise
            log.error("adapter %s of %s@v%s is corrupt; marking it failed: %s", key, lineage,
                      version.version, exc)
            await run_in_threadpool(_quarantine, request, version.id, str(exc))
            session.expire_all()
            if ref not in (None, "live"):  # a pinned version is gone: say so, do not swap
                raise Conflict(f"version {lineage}@v{version.version} failed its checksum "
                               "and was taken out of service") from exc
            version = await run_in_threadpool(_servable, session, lineage, ref)
    else:
        raise Conflict("the stored adapters of this lineage keep failing their checksum; "
                       "an operator must look at the object store")
    if timer is not None:
        timer()
    label = f"{lineage}@v{version.version}" if version is not None else None
    version_id = str(version.id) if version is not None else None
    return Answer(text=result["text"], lineage=lineage, label=label, version_id=version_id)


@router.post("/generate", response_model=GenerateOut)
async def generate(body: GenerateIn, request: Request, session: SessionDep,
                   _caller: SubmitterDep) -> GenerateOut:
    result = await answer(request, session, lineage=body.lineage, ref=body.version,
                          prompt=body.prompt, max_new_tokens=body.max_new_tokens)
    return GenerateOut(text=result.text, lineage=result.lineage, version=result.label,
                       version_id=result.version_id)
