"""Cap the requests the app works on at once, waiting in the event loop, not in threads.

Sync routes and dependencies run in anyio's thread pool (40 threads), and one request hops
between threads (dependency, route, dependency exit) while it holds a database connection,
and on SQLite the database write lock. If every thread is taken by requests that wait for
that connection or lock, the request holding it never gets a thread to finish on: the
service stalls until a timeout and answers 500s (benchmarks/load.py found exactly this at
10x load). Admitting at most `max_in_flight` requests (fewer than the threads), with the
rest waiting here as coroutines, keeps a thread free for whoever holds the lock.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

# Liveness must answer even when the service is saturated.
UNGATED_PATHS = frozenset({"/healthz"})


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self._gate: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_in_flight <= 0 \
                or scope.get("path") in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.max_in_flight)
        async with self._gate:
            await self.app(scope, receive, send)
