"""`oblivio schedule add | list | remove`: batch unlearning windows (calls /v1/schedules)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from service import cli_render as render

schedule_app = typer.Typer(help="Schedules: unlearn a lineage's tickets together at a cron "
                           "window instead of one job per ticket, retrain an S3T lineage's "
                           "cut layers, or re-evaluate the live version.",
                           no_args_is_help=True)


@schedule_app.command("add")
def schedule_add(
    cron: Annotated[str, typer.Option("--cron", help='5-field cron in UTC, e.g. "0 2 * * *"')],
    lineage: Annotated[str, typer.Option("--lineage", "-l", help="Lineage name")] = "default",
    min_tickets: Annotated[int, typer.Option("--min-tickets", help="Skip a window with fewer "
                                             "waiting")] = 1,
    max_tickets: Annotated[int, typer.Option("--max-tickets", help="At most this many per "
                                             "window's job")] = 64,
    action: Annotated[str, typer.Option("--action", help="unlearn (the waiting tickets in one "
                                        "job), retrain (S3T: the cut layers, once per window)"
                                        " or evaluate (the live version, again)")] = "unlearn",
    api_url: Annotated[str | None, typer.Option("--api-url", envvar="OBLIVIO_API_URL",
                                                show_default=False)] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="OBLIVIO_API_TOKEN",
                                              show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Add a schedule (operator): the lineage's tickets (or retrains) wait for the window."""
    from service.cli import api

    with api(api_url, token) as client:
        item = client._call("POST", "/v1/schedules", json={
            "cron": cron, "lineage": lineage, "min_tickets": min_tickets,
            "max_tickets": max_tickets, "action": action})
    if as_json:
        render.print_json(item)
    else:
        render.out().print(f"{item['action']} schedule {item['id']}: lineage "
                           f"{item['lineage']} at \"{item['cron']}\" (UTC), "
                           f"{item['min_tickets']}..."
                           f"{item['max_tickets']} tickets; next window "
                           f"{item['next_run_at']}; {item['waiting_tickets']} waiting",
                           markup=False)


@schedule_app.command("list")
def schedule_list(
    api_url: Annotated[str | None, typer.Option("--api-url", envvar="OBLIVIO_API_URL",
                                                show_default=False)] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="OBLIVIO_API_TOKEN",
                                              show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List schedules and the tickets waiting for each (operator)."""
    from service.cli import api

    with api(api_url, token) as client:
        items = client._call("GET", "/v1/schedules")
    if as_json:
        render.print_json(items)
        return
    if not items:
        render.out().print("no schedules", markup=False)
        return
    table = Table("id", "lineage", "action", "cron (UTC)", "tickets", "waiting",
                  "next window", "last run")
    for s in items:
        table.add_row(s["id"], s["lineage"], s["action"], s["cron"],
                      f"{s['min_tickets']}..{s['max_tickets']}", str(s["waiting_tickets"]),
                      s["next_run_at"], s["last_run_at"] or "-")
    render.out().print(table)


@schedule_app.command("remove")
def schedule_remove(
    schedule_id: Annotated[str, typer.Argument(help="Schedule id")],
    api_url: Annotated[str | None, typer.Option("--api-url", envvar="OBLIVIO_API_URL",
                                                show_default=False)] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="OBLIVIO_API_TOKEN",
                                              show_default=False)] = None,
) -> None:
    """Remove a schedule (operator); its waiting tickets go back to the normal queue."""
    from service.cli import api

    with api(api_url, token) as client:
        result = client._call("DELETE", f"/v1/schedules/{schedule_id}")
    render.out().print(f"removed schedule {schedule_id}; {result['released_tickets']} "
                       "ticket(s) back in the queue", markup=False)


@schedule_app.command("run")
def schedule_run() -> None:
    """Run every due window once and exit (for a Kubernetes CronJob or RayJob; set
    OBLIVIO_SCHEDULER_ENABLED=false on the API replicas when using this form)."""
    from service.cli import EXIT_FAILED, _fail, _settings
    from service.scheduler import SchedulerLoop
    from storage.db import make_engine, make_session_factory
    from workers.runtime import start_runtime

    settings = _settings()
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    # Ray only (joined, or local): the job runner's training runs on it.
    runtime = start_runtime(settings.worker_config(), dispatcher=False, serving=False)
    try:
        loop = SchedulerLoop(settings, sessions)
        windows = loop.run_once()
    except Exception as exc:
        _fail(f"scheduled run failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    finally:
        runtime.stop()
    for w in windows:
        what = w.skipped or ("the live version re-evaluated" if w.action == "evaluate"
                             else f"{len(w.tickets)} ticket(s)")
        render.out().print(f"{w.action} schedule {w.schedule_id} ({w.lineage}): {what}",
                           markup=False)
    if windows:
        render.out().print(f"{loop.jobs_run} job(s) run", markup=False)
    if not windows:
        render.out().print("no window due (or another replica leads)", markup=False)
