"""One place that turns every error into a JSON answer with a readable `message`.

Every error body has `message` (a sentence) and `detail` (the same sentence, or for
validation errors pydantic's list of `{loc, msg, type}`). Never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from storage.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    OblivioError,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[OblivioError], int] = {
    NotFound: 404, Conflict: 409, InvalidRequest: 422, Forbidden: 403, Unavailable: 503,
}


def status_for(exc: OblivioError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def _error(status: int, message: str, detail: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "detail": message if detail is None else detail},
                        status_code=status, headers=headers)


def _clean(errors: Any) -> list[dict[str, Any]]:
    # Drop `input` (it may be the whole forget set, which should not echo back) and `ctx`
    # (it may hold exception objects that do not serialise).
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _readable(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        if e["type"] == "json_invalid":
            parts.append(f"the request body is not valid JSON ({e['msg']})")
            continue
        if e["loc"] == ["body"] and e["type"] in ("model_attributes_type", "dict_type",
                                                  "missing"):
            parts.append("the request body must be a JSON object, sent with "
                         "`Content-Type: application/json`")
            continue
        loc = ".".join(str(p) for p in e["loc"] if p not in ("body",))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OblivioError)
    async def _domain(_request: Request, exc: OblivioError) -> JSONResponse:
        return _error(status_for(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean(exc.errors())
        return _error(422, _readable(errors), errors)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error; the details are in the service log")
