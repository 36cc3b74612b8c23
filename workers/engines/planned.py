"""Placeholders for engines that are designed but not built yet (see registry.PLANNED_ENGINES).

A planned engine accepts tickets of its kind (they wait in the queue, visibly, until a
release can run them) but is not runnable: the dispatcher never claims them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.errors import InvalidRequest
from workers.engines.base import Artifacts, EngineRequest, JobInput, ProgressFn, Servable


class PlannedEngine:
    runnable = False

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.ticket_kinds = frozenset({kind})

    def validate(self, request: EngineRequest) -> None:
        if request.kind not in self.ticket_kinds:
            raise InvalidRequest(f"engine {self.name!r} cannot serve a {request.kind!r} ticket")

    def _absent(self) -> InvalidRequest:
        return InvalidRequest(f"engine {self.name!r} is not available in this release; its "
                              "tickets wait in the queue")

    def train(self, job: JobInput, progress: ProgressFn) -> Artifacts:
        raise self._absent()

    def load_servable(self, version_dir: Path | None, *, model: Any, tokenizer: Any,
                      device: str, fetch: Any = None) -> Servable:
        raise self._absent()

    def evaluate(self, job: JobInput, *, before: Servable, after: Servable) -> dict[str, Any]:
        raise self._absent()
