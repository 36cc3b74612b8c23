"""A killed JIT build must not hang every later job: ranks build DeepSpeed's CPU op under a
kernel lock, and a torch lock file left by a dead build is removed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from workers.training.op_build import sole_builder


def test_a_lock_left_by_a_dead_build_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    with sole_builder(tmp_path, stale_after_s=30.0):
        assert not stale.exists()


def test_a_live_lock_is_waited_for_not_removed(tmp_path: Path) -> None:
    """A lock that goes away by itself (a rank seeing the op is built) is left to its owner."""
    live = tmp_path / "op" / "lock"
    live.parent.mkdir()
    live.touch()
    released: list[float] = []

    def owner() -> None:
        time.sleep(0.5)
        released.append(time.monotonic())
        live.unlink()

    thread = threading.Thread(target=owner)
    thread.start()
    with sole_builder(tmp_path, stale_after_s=10.0):
        entered = time.monotonic()
    thread.join(timeout=5)
    assert released and entered >= released[0]


def test_one_builder_at_a_time(tmp_path: Path) -> None:
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with sole_builder(tmp_path):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(timeout=5)
    with sole_builder(tmp_path):
        order.append("second in")
    thread.join(timeout=5)
    assert order == ["first done", "second in"]
