"""/v1/generate: answer with the base model plus the lineage's live (or pinned) version.

`answer()` (the whole answer) and `answer_stream()` (token by token) are the API's
generation paths: /v1/generate and the OpenAI-compatible /v1/chat/completions
(service.api.openai_compat) call them, and both resolve and load a version through
`_generate_from`, so a change to how a version is resolved or served applies to all.

A stored adapter that fails its sha256 when a replica loads it is taken out of service
(`registry.mark_corrupt`: failed, live falls back to the previous version) and the request
is answered by what serving falls back to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """What one generation produced and which version produced it (label None = base)."""

    text: str
    lineage: str
    label: str | None
    version_id: str | None
    usage: dict[str, int] | None = None  # prompt_tokens, completion_tokens


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


async def _generate_from(request: Request, session: Session, *, lineage: str,
                         ref: str | None,
                         call: Callable[[Any, str | None], Awaitable[T]]
                         ) -> tuple[T, AdapterVersion | None, Callable[[], None]]:
    """Resolve `ref` (default live; `base` = no adapter) in `lineage`, release the DB, then
    `call(generator, adapter_key)`; a version whose adapter fails its checksum on the way is
    quarantined and (for `live`) the version live falls back to is served instead.

    Also returns the generate-latency timer, started once the version was resolved: the
    caller stops it when the answer is complete."""
    # Database work in a thread, never on the event loop: on SQLite it may wait for the
    # write lock, and the request holding that lock needs the loop to finish.
    version = await run_in_threadpool(_servable, session, lineage, ref)
    backend = getattr(request.app.state, "generator", None)
    if backend is None:
        raise HTTPException(status_code=503, detail="generation is not running in this process;"
                            " start the service with `oblivio serve`")
    metrics = getattr(request.app.state, "metrics", None)
    done = metrics.generate_timer(lineage) if metrics is not None else (lambda: None)
    for _ in range(_CORRUPT_RETRIES + 1):
        key = version.object_key if version is not None else None
        try:
            return await call(backend, key), version, done
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
    raise Conflict("the stored adapters of this lineage keep failing their checksum; "
                   "an operator must look at the object store")


def _labels(lineage: str, version: AdapterVersion | None) -> tuple[str | None, str | None]:
    if version is None:
        return None, None
    return f"{lineage}@v{version.version}", str(version.id)


async def answer(request: Request, session: Session, *, lineage: str, ref: str | None,
                 prompt: str, max_new_tokens: int) -> Answer:
    """The whole answer of `ref` (default live) in `lineage`, generated through Serve."""
    from workers.serving import generate as serve_generate  # Ray: only when serving

    async def call(backend: Any, key: str | None) -> dict[str, Any]:
        return await run_in_threadpool(serve_generate, backend, prompt=prompt,
                                       adapter_key=key, max_new_tokens=max_new_tokens)

    result, version, done = await _generate_from(request, session, lineage=lineage, ref=ref,
                                                 call=call)
    done()
    label, version_id = _labels(lineage, version)
    return Answer(text=result["text"], lineage=lineage, label=label, version_id=version_id,
                  usage=result.get("usage"))


@dataclass(frozen=True)
class StreamedAnswer:
    """An answer being generated: who answers (known before the first token) and its text
    pieces as they are decoded, whose concatenation is what `answer` would return; `usage`
    counts the prompt's tokens and the answer's tokens decoded up to the last piece read."""

    lineage: str
    label: str | None
    version_id: str | None
    pieces: AsyncGenerator[str, None]
    usage: dict[str, int] = field(default_factory=dict)


async def answer_stream(request: Request, session: Session, *, lineage: str,
                        ref: str | None, prompt: str, max_new_tokens: int) -> StreamedAnswer:
    """As `answer`, token by token. Returns once the version is loaded on a replica (so a
    corrupt adapter is handled, as in `answer`, before anything is sent)."""
    from workers.serving import generate_stream

    usage: dict[str, int] = {}

    async def call(backend: Any, key: str | None) -> Any:
        stream = generate_stream(backend, prompt=prompt, adapter_key=key,
                                 max_new_tokens=max_new_tokens)
        first = await stream.__anext__()  # {"engine"}: loaded, or the load's error
        usage["prompt_tokens"] = first.get("prompt_tokens", 0)
        return stream

    stream, version, done = await _generate_from(request, session, lineage=lineage, ref=ref,
                                                 call=call)

    async def pieces() -> AsyncGenerator[str, None]:
        try:
            async for chunk in stream:
                if "completion_tokens" in chunk:
                    usage["completion_tokens"] = chunk["completion_tokens"]
                if "delta" in chunk:
                    yield chunk["delta"]
            done()
        finally:
            stream.cancel()  # the caller stopped reading: free the replica's slot

    label, version_id = _labels(lineage, version)
    return StreamedAnswer(lineage=lineage, label=label, version_id=version_id,
                          pieces=pieces(), usage=usage)


@router.post("/generate", response_model=GenerateOut)
async def generate(body: GenerateIn, request: Request, session: SessionDep,
                   _caller: SubmitterDep) -> GenerateOut:
    result = await answer(request, session, lineage=body.lineage, ref=body.version,
                          prompt=body.prompt, max_new_tokens=body.max_new_tokens)
    return GenerateOut(text=result.text, lineage=result.lineage, version=result.label,
                       version_id=result.version_id)
