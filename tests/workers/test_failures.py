"""Which job failures are retried (with backoff) and what the submitter reads about them."""

from __future__ import annotations

import pytest

from storage.errors import Conflict, InvalidRequest, NotFound, Unavailable
from workers.failures import is_permanent, one_line_cause, retry_delay_seconds


class TrainingFailedError(RuntimeError):
    """Stands in for Ray Train's wrapper (a ray.* exception around the worker's error)."""


TrainingFailedError.__module__ = "ray.train.v2.api.exceptions"


def _wrapped(inner: BaseException) -> BaseException:
    """`inner` as a Ray Train failure delivers it: wrapped, with a multi-line message."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise TrainingFailedError(
                "Training failed.\nTraceback (most recent call last):\n"
                '  File "/work/x/workers/training/loop.py", line 3') from exc
    except RuntimeError as outer:
        return outer


class RayStyleError(Exception):
    """Ray's RayTaskError keeps the worker's exception in `.cause`, not `__cause__`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::RayTrainWorker._run() (pid=12, ip=127.0.0.1)\nlong trace")
        self.cause = cause


RayStyleError.__module__ = "ray.exceptions"


@pytest.mark.parametrize("error", [InvalidRequest("unknown option(s) for method 'npo': betta"),
                                   NotFound("unknown lineage 'x'"), Conflict("busy")])
def test_refused_requests_are_permanent_even_when_wrapped(error: Exception) -> None:
    assert is_permanent(error)
    assert is_permanent(_wrapped(error))
    assert is_permanent(RayStyleError(error))


@pytest.mark.parametrize("error", [Unavailable("object store unreachable"),
                                   ConnectionError("database went away"),
                                   RuntimeError("The actor died unexpectedly"),
                                   OSError("No space left on device")])
def test_what_may_go_away_is_transient(error: Exception) -> None:
    assert not is_permanent(error)
    assert not is_permanent(_wrapped(error))


def test_the_submitter_reads_one_line_without_server_paths() -> None:
    trace_like = ValueError("pyarrow.lib.ArrowInvalid: URI has empty scheme: "
                            "'/srv/oblivio/.oblivio/jobs/oblivio-job-1x/ray-train-2y'\n"
                            "  File \"/srv/oblivio/workers/training/runner.py\", line 90")
    line = one_line_cause(_wrapped(trace_like))
    assert "\n" not in line and "/srv" not in line
    assert line == "ValueError: pyarrow.lib.ArrowInvalid: URI has empty scheme: '.../ray-train-2y'"
    # A domain error's message is already written for people: shown as it is.
    refused = InvalidRequest("unknown option(s) for method 'npo': betta; known: beta")
    assert one_line_cause(RayStyleError(_wrapped(refused))) == str(refused)
    assert len(one_line_cause(RuntimeError("x" * 5000))) <= 300


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [retry_delay_seconds(n, base=10, cap=60) for n in (1, 2, 3, 4, 5)]
    assert delays == [10, 20, 40, 60, 60]
    assert retry_delay_seconds(3, base=0, cap=60) == 0


def test_our_own_context_beats_the_library_error_it_wraps() -> None:
    try:
        try:
            raise OSError("Repo id must be in the form 'repo_name': '/srv/models/x'")
        except OSError as exc:
            raise ValueError("base model '/srv/models/x' is neither a local directory nor in "
                             "the local Hugging Face cache") from exc
    except ValueError as err:
        line = one_line_cause(_wrapped(err))
    assert line == ("ValueError: base model '.../x' is neither a local directory nor in the "
                    "local Hugging Face cache")
    died = RayStyleError(RuntimeError("x"))
    died.cause = None  # only Ray's error: its name, without Ray's "ray::...(pid=...)" prefix
    assert one_line_cause(died) == "RayStyleError"
