"""Unlearning engines, by registry name (see workers/engines/base.py for the shape).

Light to import (no torch, ray or deepspeed): the API validates tickets through it.
"""

from workers.engines.base import request_from_payload
from workers.engines.registry import (
    DEFAULT_ENGINES,
    engine_kinds,
    get_engine,
    list_engines,
    register_engine,
    resolve_engine,
    runnable_engines,
)

__all__ = ["DEFAULT_ENGINES", "engine_kinds", "get_engine", "list_engines", "register_engine",
           "request_from_payload", "resolve_engine", "runnable_engines"]
