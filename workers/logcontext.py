"""Structured logs: JSON lines that carry the ticket and job ids of the work being done.

`log_context(job_id=..., ticket_ids=[...])` binds ids for the current thread/task (a
contextvar), and `JsonFormatter` writes them into every record logged inside it, so
`grep '"job_id": "<id>"'` (or a log pipeline) finds every line of one job across the API,
the dispatcher and its threads. Standard library only: the API, the dispatcher actor and
the training workers all use it, and it imports nothing heavy.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "oblivio_log_context", default={})

# Keys a caller may also pass per call with `log.info(..., extra={"ticket_id": ...})`.
CONTEXT_KEYS = ("ticket_id", "ticket_ids", "job_id", "lineage", "version", "ray_job_id",
                "schedule_id")


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Bind ids (None values are dropped) to every log record made inside the block."""
    merged = {**_CONTEXT.get(), **{k: _plain(v) for k, v in ids.items() if v is not None}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind_log_context(**ids: Any) -> contextvars.Token[dict[str, Any]]:
    """Like `log_context` for code that cannot wrap a block; pass the result to `unbind`."""
    return _CONTEXT.set({**_CONTEXT.get(),
                         **{k: _plain(v) for k, v in ids.items() if v is not None}})


def unbind_log_context(token: contextvars.Token[dict[str, Any]]) -> None:
    _CONTEXT.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_CONTEXT.get())


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return [str(v) for v in value]
    return value if isinstance(value, (int, float, bool)) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, bound ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_CONTEXT.get())
        for key in CONTEXT_KEYS:
            if key in record.__dict__:
                out[key] = _plain(record.__dict__[key])
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Route the root logger to stderr as JSON lines (`json`) or readable text (`text`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
