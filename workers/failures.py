"""What a failed job tells the queue and the people involved.

- `is_permanent(exc)`: will the same attempt fail again? A refused request or option, an
  unknown method, a recipe that cannot train (storage.errors.InvalidRequest and the other
  domain errors except Unavailable) cannot go away on retry: the ticket fails at once.
  Everything else (a worker that died, an object store or database that did not answer, a
  lost lease, an unexpected error) is retried with exponential backoff.
- `one_line_cause(exc)`: the sentence a submitter sees on the ticket: the root cause's
  type and first line, with server paths cut to their last part. The full traceback goes
  to the job record (`jobs.error`, `GET /v1/jobs/{id}`) for operators.

Errors from Ray Train workers arrive wrapped (TrainingFailedError, RayTaskError): both
functions look through the chain (`__cause__`, `__context__`, Ray's `.cause`) past Ray's
wrappers.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator

from storage.errors import OblivioError, Unavailable

MAX_CAUSE_CHARS = 300
# Absolute POSIX paths ("/work/x/.oblivio/jobs/oblivio-job-1/..."): the server's layout is
# nobody else's business and makes messages unreadable; the last part says enough.
_ABS_PATH = re.compile(r"(?<![\w:/.])(/[^\s'\"():,;]+)+")


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors behind it, outermost first (each once)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        ray_cause = getattr(current, "cause", None)
        todo += [ray_cause if isinstance(ray_cause, BaseException) else None,
                 current.__cause__, current.__context__]


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help (see module docstring)."""
    from storage.objectstore import CorruptObject

    for err in error_chain(exc):
        # A corrupt stored version is marked failed when it is detected, so the retry
        # builds on the version before it: retrying does help.
        if isinstance(err, CorruptObject):
            return False
        if isinstance(err, OblivioError) and not isinstance(err, Unavailable):
            return True
    return False


def _is_ray_wrapper(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "ray"


def root_cause(exc: BaseException) -> BaseException:
    """The error whose message explains the failure: a domain error in the chain if there
    is one (written for people), else the outermost error that is not one of Ray's wrappers
    (our own `raise ... from` messages add context), else Ray's innermost."""
    chain = list(error_chain(exc))
    for err in chain:
        if isinstance(err, OblivioError):
            return err
    return next((err for err in chain if not _is_ray_wrapper(err)), chain[-1])


def one_line_cause(exc: BaseException) -> str:
    """One readable line for the submitter: no traceback, no server paths."""
    cause = root_cause(exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # Ray prefixes worker errors with "ray::Actor.method() (pid=..., ip=...)".
    text = re.sub(r"^ray::\S+ \(pid=\d+, ip=[^)]*\)\s*", "", text)
    text = _ABS_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    message = text if isinstance(cause, OblivioError) else (
        f"{type(cause).__name__}: {text}" if text else type(cause).__name__)
    if len(message) > MAX_CAUSE_CHARS:
        message = message[:MAX_CAUSE_CHARS - 3].rstrip() + "..."
    return message


def full_trace(exc: BaseException) -> str:
    """The whole traceback (with causes), for the job record."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def retry_delay_seconds(attempts: int, *, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... after the 1st, 2nd, 3rd attempt."""
    if base <= 0:
        return 0.0
    return float(min(cap, base * 2 ** max(0, attempts - 1)))
