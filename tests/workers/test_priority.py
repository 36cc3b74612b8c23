"""Background work yields the CPU to the API: every thread of the process, old and new."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Run in a child process: niceness cannot be lowered again, and the test session must not
# run the rest of the suite at a lower priority.
CHILD = """
import os, threading
from workers.priority import yield_cpu
started, stop = threading.Event(), threading.Event()
seen = {}
def earlier():
    seen["earlier"] = threading.get_native_id(); started.set(); stop.wait()
t = threading.Thread(target=earlier); t.start(); started.wait()
print(yield_cpu(7), yield_cpu(3))            # never lowered again
later = []
t2 = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
t2.start(); t2.join()
print(os.getpriority(os.PRIO_PROCESS, seen["earlier"]), later[0])
stop.set(); t.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_yield_cpu_renices_threads_started_before_and_after_and_never_lowers() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == ["7", "7", "7", "7"]


def test_the_setting_reaches_training_ranks_through_ray_s_environment(tmp_path: Path) -> None:
    from service.settings import Settings
    from workers.priority import NICE_ENV
    from workers.runtime import ray_env

    config = Settings(data_dir=tmp_path / "d", background_nice=12).worker_config()
    assert config.background_nice == 12
    assert ray_env(config)[NICE_ENV] == "12"
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path / "d", background_nice=25)
