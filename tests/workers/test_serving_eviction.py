"""A version evicted from a replica while requests still hold it closes after the last one."""

from __future__ import annotations

import asyncio


class _Servable:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_an_evicted_version_closes_only_when_its_last_request_is_done() -> None:
    from workers.serving import _LoadedVersion

    servable, gone = _Servable(), []
    loaded = _LoadedVersion("adapters/abc", "idk", servable, on_close=gone.append)
    assert loaded.acquire() and loaded.acquire()  # two requests in the batch queue
    asyncio.run(loaded.__del__())  # the multiplexer evicts it meanwhile
    assert gone == ["adapters/abc"]  # no longer counted as loaded ...
    assert servable.closed == 0  # ... but its adapter stays until they have generated
    loaded.release()
    assert servable.closed == 0
    loaded.release()
    assert servable.closed == 1
    assert not loaded.acquire()  # a late request loads it again instead of using it


def test_a_version_nobody_holds_closes_at_eviction() -> None:
    from workers.serving import _LoadedVersion

    servable = _Servable()
    loaded = _LoadedVersion("adapters/abc", "idk", servable)
    assert loaded.acquire()
    loaded.release()  # not evicted: stays open for the next request
    assert servable.closed == 0
    asyncio.run(loaded.__del__())
    assert servable.closed == 1
