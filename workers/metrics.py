"""Metrics the workers own (the dispatcher's claim latency), in-process and as a Ray metric.

The in-process histogram is created unregistered (no global state mutated at import): an
app that runs a dispatcher in its own process adds it to its registry (service.metrics).
The dispatcher Ray actor records the same series as a Ray metric instead, exported by
Ray's metrics agent as `ray_oblivio_claim_latency_seconds` from whichever node it runs on.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Histogram

CLAIM_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CLAIM_LATENCY = Histogram(
    "oblivio_claim_latency_seconds",
    "Time one dispatcher claim query took (claim of ready tickets from the DB queue).",
    buckets=CLAIM_LATENCY_BUCKETS,
    registry=None,
)


def observe_claim_in_process(seconds: float) -> None:
    CLAIM_LATENCY.observe(seconds)


def ray_claim_latency_observer() -> Callable[[float], None]:
    """The claim-latency histogram as a Ray metric (call inside a Ray actor)."""
    from ray.util.metrics import Histogram as RayHistogram

    histogram = RayHistogram("oblivio_claim_latency_seconds",
                             description="Time one dispatcher claim query took.",
                             boundaries=list(CLAIM_LATENCY_BUCKETS))
    return histogram.observe
