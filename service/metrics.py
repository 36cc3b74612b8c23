"""Prometheus metrics. Each app gets its own CollectorRegistry; nothing is registered globally.

The workers own their metrics (workers.metrics): every app's registry includes the
in-process claim-latency histogram, so an in-process dispatcher's claims show up on that
app's `/metrics`; the dispatcher Ray actor exports the same series through Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.models import TicketStatus
from workers.metrics import CLAIM_LATENCY

log = logging.getLogger(__name__)

class QueueCollector(Collector):
    """Ticket counts computed from the database at scrape time, so every replica agrees."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterator[Any]:
        # Lets the registry check names without querying the DB at registration time.
        yield GaugeMetricFamily("oblivio_tickets", "Tickets by status.", labels=["status"])
        yield GaugeMetricFamily("oblivio_queue_depth",
                                "Tickets waiting to be claimed (status queued).")

    def collect(self) -> Iterator[Any]:
        from storage import queue

        try:
            with self._sessions() as session:
                counts = queue.count_by_status(session)
                depth = queue.queue_depth(session)
        except Exception:  # a scrape must not fail because the DB blinked; readyz reports it
            log.exception("could not read ticket counts for /metrics")
            return
        tickets = GaugeMetricFamily("oblivio_tickets", "Tickets by status.", labels=["status"])
        for status in TicketStatus:
            tickets.add_metric([status.value], float(counts.get(status.value, 0)))
        yield tickets
        yield GaugeMetricFamily("oblivio_queue_depth",
                                "Tickets waiting to be claimed (status queued).", value=depth)


GENERATE_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AppMetrics:
    """The registry of one app and the metrics the API itself updates."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        from service.metrics_ops import OperationsCollector

        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(sessions))
        self.registry.register(OperationsCollector(sessions))
        self.registry.register(CLAIM_LATENCY)
        self.http_requests = Counter(
            "oblivio_http_requests", "HTTP requests by route template, method and status.",
            ["method", "route", "status"], registry=self.registry)
        self.generate_latency = Histogram(
            "oblivio_generate_latency_seconds",
            "Time the API waited for one generation (Ray Serve), by lineage.",
            ["lineage"], buckets=GENERATE_LATENCY_BUCKETS, registry=self.registry)

    def generate_timer(self, lineage: str) -> Callable[[], None]:
        """Start timing a generation; call the result when it is done."""
        started = time.perf_counter()
        histogram = self.generate_latency.labels(lineage=lineage)
        return lambda: histogram.observe(time.perf_counter() - started)


class RequestCounterMiddleware:
    """Counts requests by route *template* (bounded label values), method and status."""

    def __init__(self, app: ASGIApp, *, metrics: AppMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(method=scope["method"], route=template,
                                              status=str(status["code"])).inc()
