"""OpenAI-compatible endpoints: POST /v1/chat/completions and GET /v1/models.

Existing chat clients and tools talk to the unlearned model unchanged: point the `openai`
client's `base_url` at `<api>/v1` and use an oblivio token as the API key. A *model* is a
lineage (`default` = its live version, followed as `live` moves), or a pinned version of it
(`default@v3`, `default@candidate`, `default@base`). Answers come from the same path as
/v1/generate (`service.api.generate.answer`: registry resolution, then the Ray Serve
deployment), and every error is in OpenAI's shape `{"error": {message, type, param, code}}`.

The conversation is rendered into one user turn (earlier turns become labelled context
lines before the last user message), because serving applies the model's chat template to
one user turn, exactly as training did. Decoding is greedy; sampling options are ignored.
Streaming sends server-sent events as the tokens are decoded (the request still shares the
Serve deployment's batches); the deltas join to exactly the non-streamed answer.
`finish_reason` is "length" when the answer was cut at `max_tokens`; a non-streamed reply
carries `usage` (prompt tokens counted with the chat template), a streamed one ends with a
usage chunk when asked (`stream_options: {"include_usage": true}`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import select

from service.api.errors import status_for
from service.api.generate import BASE, StreamedAnswer, answer, answer_stream
from service.deps import SessionDep, SubmitterDep
from service.schemas.openai_compat import ChatCompletionIn, ChatMessageIn, ModelListOut, ModelOut
from storage import registry
from storage.errors import NotFound, OblivioError
from storage.models import AdapterVersion, Alias, Lineage

DEFAULT_MAX_TOKENS = 128

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body as OpenAI's API sends it, which its clients turn into typed exceptions."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


class OpenAIErrorRoute(APIRoute):
    """Routes whose failures (auth, validation, domain errors) answer in OpenAI's shape.

    FastAPI resolves dependencies and validates the body inside the route handler, so
    wrapping the handler sees every one of those errors before the app-wide handlers do.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = exc.errors()
                first = errors[0] if errors else {}
                loc = [str(p) for p in first.get("loc", ()) if p != "body"]
                message = "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                    f"{e.get('msg', '')}" for e in errors[:5])
                return openai_error(400, f"invalid request: {message}",
                                    param=".".join(loc) or None, code="invalid_request")
            except HTTPException as exc:
                code = "invalid_api_key" if exc.status_code == 401 else None
                # Headers too: a 401 says how to authenticate, a 429 when to come back.
                return openai_error(exc.status_code, str(exc.detail), code=code,
                                    headers=exc.headers)
            except NotFound as exc:
                return openai_error(404, str(exc), param="model", code="model_not_found")
            except OblivioError as exc:
                return openai_error(status_for(exc), str(exc))

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)


def parse_model(model: str) -> tuple[str, str | None]:
    """`lineage[@ref]` -> (lineage, ref); ref None means the live version."""
    lineage, _, ref = model.strip().partition("@")
    return lineage, (ref.strip() or None)


def render_prompt(messages: list[ChatMessageIn]) -> str:
    """One user turn: the last user message, preceded by the earlier turns as context.

    A conversation of a single user message becomes exactly that message, so a chat client
    and /v1/generate get the same answer to the same question.
    """
    last_user = max(i for i, m in enumerate(messages) if m.role == "user" and m.text().strip())
    context = [m for i, m in enumerate(messages) if i != last_user and m.text().strip()]
    question = messages[last_user].text()
    if not context:
        return question
    labels = {"system": "Instructions", "developer": "Instructions", "user": "User",
              "assistant": "Assistant", "tool": "Tool"}
    lines = [f"{labels[m.role]}: {m.text().strip()}" for m in context]
    return "\n".join(lines) + "\n\n" + question


def apply_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionIn, request: Request, session: SessionDep,
                           _caller: SubmitterDep) -> Response:
    """A chat completion from the live (or pinned) version of a lineage."""
    lineage, ref = parse_model(body.model)
    if ref == "candidate":
        _require_alias(session, lineage, "candidate")
    generation = {"lineage": lineage, "ref": ref, "prompt": render_prompt(body.messages),
                  "max_new_tokens": body.max_completion_tokens or body.max_tokens
                  or DEFAULT_MAX_TOKENS}
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        streamed = await answer_stream(request, session, **generation)
        model = streamed.label or f"{lineage}@{BASE}"
        return StreamingResponse(
            _sse(completion_id, created, model, streamed, body.stops(),
                 generation["max_new_tokens"],
                 include_usage=bool(body.stream_options and body.stream_options.include_usage)),
            media_type="text/event-stream",
            headers={**_version_headers(model, streamed.version_id), "Cache-Control": "no-cache"})
    result = await answer(request, session, **generation)
    text, stopped = apply_stops(result.text, body.stops())
    model = result.label or f"{lineage}@{BASE}"
    headers = _version_headers(model, result.version_id)
    reply: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": result.version_id or "base",
        "choices": [{"index": 0, "logprobs": None,
                     "finish_reason": finish_reason(stopped, result.usage,
                                                    generation["max_new_tokens"]),
                     "message": {"role": "assistant", "content": text}}],
    }
    if result.usage:
        reply["usage"] = _usage(result.usage)
    return JSONResponse(reply, headers=headers)


def _usage(counts: dict[str, int]) -> dict[str, int]:
    prompt, completion = counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(stopped: bool, usage: dict[str, int] | None, max_new_tokens: int) -> str:
    """OpenAI's: "length" when the answer was cut at its token budget, else "stop" (end
    of turn or a stop sequence)."""
    if not stopped and usage and usage.get("completion_tokens", 0) >= max_new_tokens:
        return "length"
    return "stop"


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any] | None,
           finish: str | None = None, usage: dict[str, int] | None = None) -> str:
    """One SSE event; `delta` None is the usage chunk (no choices), sent last on request."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    payload: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                               "created": created, "model": model, "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


def _version_headers(model: str, version_id: str | None) -> dict[str, str]:
    headers = {"X-Oblivio-Version": model}
    if version_id:
        headers["X-Oblivio-Version-Id"] = version_id
    return headers


class StopScan:
    """Cuts a streamed answer at its first stop sequence, as `apply_stops` cuts a whole one:
    text that could be the start of a stop sequence is held back until it is not."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text, self.stopped = apply_stops(self._held + piece, self._stops)
        if self.stopped:
            self._held = ""
            return text
        # The longest tail that a stop sequence starts with (shorter than any whole one).
        longest = max((len(s) for s in self._stops), default=0)
        hold = next((n for n in range(min(len(text), longest - 1), 0, -1)
                     if any(s.startswith(text[-n:]) for s in self._stops)), 0)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


async def _sse(completion_id: str, created: int, model: str, streamed: StreamedAnswer,
               stops: list[str], max_new_tokens: int,
               include_usage: bool = False) -> AsyncIterator[str]:
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
    scan = StopScan(stops)
    try:
        async for piece in streamed.pieces:
            if text := scan.feed(piece):
                yield _chunk(completion_id, created, model, {"content": text})
            if scan.stopped:
                break
    finally:
        await streamed.pieces.aclose()  # stops decoding when a stop sequence ended it
    if text := scan.flush():
        yield _chunk(completion_id, created, model, {"content": text})
    finish = finish_reason(scan.stopped, streamed.usage, max_new_tokens)
    yield _chunk(completion_id, created, model, {}, finish=finish)
    if include_usage:  # tokens decoded, up to the stop sequence where one cut the answer
        yield _chunk(completion_id, created, model, None, usage=_usage(streamed.usage))
    yield "data: [DONE]\n\n"


def _require_alias(session: Any, lineage_name: str, alias: str) -> None:
    if alias not in registry.get_aliases(session, lineage_name=lineage_name):
        raise NotFound(f"lineage {lineage_name!r} has no {alias} version")


def list_model_entries(session: Any) -> list[ModelOut]:
    """Every name a client may use: each lineage, its servable versions and its aliases."""
    out: list[ModelOut] = []
    for lineage in registry.list_lineages(session):
        out.extend(_lineage_models(session, lineage))
    return out


def _lineage_models(session: Any, lineage: Lineage) -> list[ModelOut]:
    versions = registry.list_versions(session, lineage_name=lineage.name)
    by_id = {v.id: v for v in versions}
    aliases: dict[Any, list[str]] = {}
    for version_id, name in session.execute(select(Alias.version_id, Alias.name)
                                            .where(Alias.lineage_id == lineage.id)).tuples():
        aliases.setdefault(version_id, []).append(name)
    created = int(lineage.created_at.timestamp())
    live = next((v for v in versions if "live" in aliases.get(v.id, [])), None)

    def entry(model_id: str, version: AdapterVersion | None) -> ModelOut:
        parent = by_id.get(version.parent_id) if version is not None else None
        return ModelOut(id=model_id, lineage=lineage.name,
                        created=int(version.created_at.timestamp()) if version else created,
                        version=version.version if version else None,
                        status=version.status.value if version else None,
                        aliases=sorted(aliases.get(version.id, [])) if version else [],
                        parent=f"{lineage.name}@v{parent.version}" if parent else None)

    models = [entry(lineage.name, live), entry(f"{lineage.name}@{BASE}", None)]
    for alias in ("live", "candidate"):
        target = next((v for v in versions if alias in aliases.get(v.id, [])), None)
        if target is not None:
            models.append(entry(f"{lineage.name}@{alias}", target))
    models += [entry(f"{lineage.name}@v{v.version}", v) for v in versions
               if v.status.value in ("ready", "superseded")]
    return models


@router.get("/models", response_model=ModelListOut)
def list_models(session: SessionDep, _caller: SubmitterDep) -> ModelListOut:
    """Lineages and their servable versions, as OpenAI-style models."""
    return ModelListOut(data=list_model_entries(session))


@router.get("/models/{model}", response_model=ModelOut)
def get_model(model: str, session: SessionDep, _caller: SubmitterDep) -> ModelOut:
    for entry in list_model_entries(session):
        if entry.id == model:
            return entry
    raise NotFound(f"the model {model!r} does not exist; GET /v1/models lists them")

