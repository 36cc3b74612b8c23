"""`oblivio ticket watch ID`, `oblivio ticket submit ... --wait` (and `oblivio lineage
finetune --wait`, which follows its fine-tune's ticket with `follow`): follow a ticket to
its end.

A progress bar on stderr (phase, step / total steps, elapsed, ETA) while it runs; then one
line on stdout with the outcome. Exit codes: 0 done (or waiting for an operator's review,
which the line says how to give); 1 failed, rejected, cancelled, or still running at
`--timeout`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from service import cli_render as render

FAILED_STATES = frozenset({"failed", "rejected", "cancelled"})
# A held version's ticket waits for an operator (issue 15): following it ends there too.
REVIEW_STATES = frozenset({"awaiting_review"})
EXIT_FAILED = 1


def is_finished(ticket: dict[str, Any]) -> bool:
    return ticket["status"] == "done" or ticket["status"] in FAILED_STATES | REVIEW_STATES


def follow(client: Any, ticket_id: str, *, timeout: float | None = None,
           poll_seconds: float = 1.0, show_progress: bool = True) -> dict[str, Any]:
    """Poll the ticket until it is finished (or `timeout` seconds pass); returns it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    ticket = client.get_ticket(ticket_id)
    progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=render.err(), disable=not show_progress)
    with progress:
        task = progress.add_task(_describe(ticket), total=None)
        while not is_finished(ticket):
            if timeout is not None and time.monotonic() - started > timeout:
                break
            _update(progress, task, ticket)
            time.sleep(poll_seconds)
            ticket = client.get_ticket(ticket_id)
        _update(progress, task, ticket)
    return ticket


def _describe(ticket: dict[str, Any]) -> str:
    phase = (ticket.get("progress") or {}).get("phase")
    status = ticket["status"]
    return f"{status}: {phase}" if phase and phase != status else status


def _update(progress: Any, task: Any, ticket: dict[str, Any]) -> None:
    info = ticket.get("progress") or {}
    total, step = info.get("max_steps"), info.get("step")
    fields: dict[str, Any] = {"description": _describe(ticket)}
    if isinstance(total, int) and total > 0:
        fields["total"] = total
        if isinstance(step, int):
            fields["completed"] = min(step, total)
    if ticket["status"] == "done" and isinstance(total, int):
        fields["completed"] = total
    progress.update(task, **fields)


def outcome_line(ticket: dict[str, Any]) -> tuple[str, int]:
    """The final line and the exit code for a followed ticket."""
    version = (ticket.get("result_version") or {}).get("label")
    status, tid = ticket["status"], ticket["id"]
    if status == "done":
        return f"ticket {tid} done: {version or 'no new version'}", 0
    if status in REVIEW_STATES:
        number = version.rsplit("@v", 1)[-1] if version else "N"
        return (f"ticket {tid} is waiting for review: {version or 'its version'} did not pass "
                f"its evaluation on its own; an operator can make it live with `oblivio "
                f"promote --lineage {ticket['lineage']} {number}`"), 0
    if status in FAILED_STATES:
        return f"ticket {tid} {status}: {ticket.get('error') or 'no reason given'}", EXIT_FAILED
    return f"ticket {tid} is still {status} (gave up waiting)", EXIT_FAILED


def finish(ticket: dict[str, Any], *, as_json: bool, quiet: bool = False) -> None:
    """Print the outcome (or the ticket as JSON) and exit with its code.

    `quiet`: stdout carries only the id (printed by the caller); the line goes to stderr.
    """
    line, code = outcome_line(ticket)
    if as_json:
        render.print_json(ticket)
    elif code == 0 and quiet:
        render.err().print(line, markup=False)
    elif code == 0:
        render.out().print(line, markup=False)
    else:
        render.err().print(f"error: {line}", markup=False)
    if code:
        raise typer.Exit(code)


Timeout = Annotated[float | None, typer.Option(
    help="Stop waiting after this many seconds (exit 1) [default: wait for the end]")]
