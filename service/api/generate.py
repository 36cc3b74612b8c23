"""/v1/generate: answer with the base model plus the lineage's live (or pinned) version."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from service.deps import SessionDep, SubmitterDep
from service.schemas.generate import GenerateIn, GenerateOut
from storage import registry
from storage.errors import Conflict
from storage.models import VersionStatus

router = APIRouter(prefix="/v1", tags=["generate"])

# A version may answer while it is the current or an earlier good one; training, failed
# and revoked versions never do.
_SERVABLE = (VersionStatus.ready, VersionStatus.superseded)


@router.post("/generate", response_model=GenerateOut)
async def generate(body: GenerateIn, request: Request, session: SessionDep,
                   _caller: SubmitterDep) -> GenerateOut:
    version = registry.resolve(session, lineage_name=body.lineage, ref=body.version)
    if version is not None and version.status not in _SERVABLE:
        raise Conflict(f"version {body.lineage}@v{version.version} is {version.status.value} "
                       "and cannot be served")
    key = version.object_key if version is not None else None
    label = f"{body.lineage}@v{version.version}" if version is not None else None
    version_id = str(version.id) if version is not None else None
    session.commit()  # release the DB before the (slow) generation

    backend = getattr(request.app.state, "generator", None)
    if backend is None:
        raise HTTPException(status_code=503, detail="generation is not running in this process;"
                            " start the service with `oblivio serve`")
    from workers.serving import generate as serve_generate  # Ray: only when serving

    result = await run_in_threadpool(serve_generate, backend, prompt=body.prompt,
                                     adapter_key=key, max_new_tokens=body.max_new_tokens)
    return GenerateOut(text=result["text"], lineage=body.lineage, version=label,
                       version_id=version_id)
