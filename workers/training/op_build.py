"""DeepSpeed's CPU communication op, built (or loaded) by one process at a time.

torch's JIT build lock is a plain file (`<extension>/lock`, torch.utils.file_baton) that
every other builder waits on until it disappears. A build that is killed part-way (a job
cancelled during its first run, a test timeout) leaves it behind, and from then on every
rank of every job waits on it forever. Here ranks build under a kernel lock instead
(flock, dropped with its process): whoever holds it is the only one building, so a torch
lock file it finds that does not go away by itself is stale and is removed.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A live torch lock outside a build is held for the moment it takes to see that the op is
# built already; one that stays this long while nobody builds is left from a dead build.
STALE_AFTER_S = 30.0


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR (set for every rank by
    workers.runtime.ray_env), else torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextmanager
def sole_builder(root: Path, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
    """Hold the build lock of `root`, with any stale torch lock file under it removed."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".oblivio-build.lock", "a") as handle:  # closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        for lock in root.glob("**/lock"):
            while lock.exists() and time.time() - _mtime(lock) < stale_after_s:
                time.sleep(0.2)
            lock.unlink(missing_ok=True)
        yield


def build_cpu_comm_op() -> None:
    """Build or load DeepSpeed's shared-memory all-reduce op before init_distributed does
    (which then only finds it built)."""
    from deepspeed.comm.torch import build_shm_op

    with sole_builder(extensions_root()):
        build_shm_op()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
