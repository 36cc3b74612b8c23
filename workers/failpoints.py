"""Named crash points for the fault tests: `OBLIVIO_FAILPOINTS=name[,name...]` makes the
process SIGKILL itself when it reaches one of them.

The process-kill tests need a crash at an exact moment (say, inside the transaction that
publishes a version) that polling from outside cannot hit. Unset, a failpoint is one
environment lookup. Names in use: `publish.before` (the version is stored and evaluated,
nothing published), `publish.commit` (inside the publishing transaction, before its
commit), `publish.after` (just after it).
"""

from __future__ import annotations

import os
import signal

ENV = "OBLIVIO_FAILPOINTS"


def failpoint(name: str) -> None:
    """SIGKILL this process if `name` is armed (never set it in production)."""
    armed = os.environ.get(ENV)
    if armed and name in {n.strip() for n in armed.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)
