"""/v1/generate: answer with the base model plus the lineage's live (or pinned) version."""

from __future__ import annotations

import logging
from typing import Any

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


@router.post("/generate", response_model=GenerateOut)
async def generate(body: GenerateIn, request: Request, session: SessionDep,
                   _caller: SubmitterDep) -> GenerateOut:
    backend = getattr(request.app.state, "generator", None)
    # Database work in a thread, never on the event loop: on SQLite it may wait for the
    # write lock, and the request holding that lock needs the loop to finish.
    version = await run_in_threadpool(_servable, session, body)
    await run_in_threadpool(session.commit)  # release the DB before the (slow) generation
    if backend is None:
        raise HTTPException(status_code=503, detail="generation is not running in this process;"
                            " start the service with `oblivio serve`")
    from workers.serving import generate as serve_generate  # Ray: only when serving

    for _ in range(_CORRUPT_RETRIES + 1):
        key = version.object_key if version is not None else None
        try:
            result = await run_in_threadpool(serve_generate, backend, prompt=body.prompt,
                                             adapter_key=key, max_new_tokens=body.max_new_tokens)
            break
        except CorruptObject as exc:  # Ray re-raises it as a subclass of the cause
            if version is None:
                raise
            # The stored adapter fails its sha256 at load: take it out of service for good,
            # and answer with what serving falls back to (the previous version or the base).
            log.error("adapter %s of %s@v%s is corrupt; marking it failed: %s", key,
                      body.lineage, version.version, exc)
            await run_in_threadpool(_quarantine, request, version.id, str(exc))
            session.expire_all()
            version = await run_in_threadpool(_servable, session, body)
            await run_in_threadpool(session.commit)
    else:
        raise Conflict("the stored adapters of this lineage keep failing their checksum; "
                       "an operator must look at the object store")
    label = f"{body.lineage}@v{version.version}" if version is not None else None
    version_id = str(version.id) if version is not None else None
    return GenerateOut(text=result["text"], lineage=body.lineage, version=label,
                       version_id=version_id)


_CORRUPT_RETRIES = 2


def _servable(session: Session, body: GenerateIn) -> AdapterVersion | None:
    version = registry.resolve(session, lineage_name=body.lineage, ref=body.version)
    if version is not None and version.status not in _SERVABLE:
        raise Conflict(f"version {body.lineage}@v{version.version} is {version.status.value} "
                       "and cannot be served")
    return version


def _quarantine(request: Request, version_id: Any, reason: str) -> None:
    with transaction(request.app.state.sessions) as s:
        registry.mark_corrupt(s, version_id=version_id, actor="serving",
                              reason=f"adapter failed its checksum at load: {reason}")
