"""Per-token rate limit: a token bucket per API token, 429 with Retry-After when empty.

In memory, per API process: each replica limits on its own, which is what protects it.
A limit that must hold across replicas belongs in the proxy in front of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """`rate` requests per second on average, bursts of up to `burst`, per key.

    `rate <= 0` disables the limit. `clock` is injectable so that tests need not sleep.
    """

    # Buckets of keys idle this long are full again anyway; dropping them bounds memory.
    _IDLE_SECONDS = 600.0

    def __init__(self, *, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str) -> float | None:
        """Take one request for `key`: None if allowed, else seconds until one is."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            self._sweep(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), stamp=now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self._IDLE_SECONDS:
            return
        self._last_sweep = now
        stale = [k for k, b in self._buckets.items() if now - b.stamp > self._IDLE_SECONDS]
        for key in stale:
            del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so that a client that obeys it succeeds."""
    return str(max(1, math.ceil(seconds)))
