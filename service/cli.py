"""`oblivio`: run the service and talk to it.

Ticket, lineage and version commands call the HTTP API (`--api-url`, default
`http://<api_host>:<api_port>`, or `OBLIVIO_API_URL`), authenticated with `--token`,
`OBLIVIO_API_TOKEN`, or the admin token file `<data_dir>/admin-token`. `serve`, `db upgrade`
and `token ...` work on the database directly: they are how a fresh install gets going.

Exit codes: 0 success; 2 the request was refused (bad input, unknown id, conflict, missing
permission); 1 the service failed or could not be reached. Errors are one readable line on
stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from service import cli_render as render
from service.cli_schedule import schedule_app
from service import cli_watch
from service.cli_bench import bench
from service.cli_receipts import receipt_app
from service.client import ApiError, ApiUnreachable, OblivioClient

app = typer.Typer(name="oblivio", help="Continual machine unlearning for language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
ticket_app = typer.Typer(help="File, follow, cancel and revoke deletion tickets.",
                         no_args_is_help=True)
versions_app = typer.Typer(help="Adapter versions of a lineage.", no_args_is_help=True)
lineage_app = typer.Typer(help="Lineages: a base model and its chain of adapters.",
                          no_args_is_help=True)
token_app = typer.Typer(help="API tokens (works on the database directly).",
                        no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(ticket_app, name="ticket")
app.add_typer(versions_app, name="versions")
app.add_typer(lineage_app, name="lineage")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")
app.add_typer(schedule_app, name="schedule")
app.add_typer(receipt_app, name="receipt")
app.command("bench")(bench)

EXIT_REFUSED = 2
EXIT_FAILED = 1

ApiUrl = Annotated[str | None, typer.Option(
    "--api-url", envvar="OBLIVIO_API_URL", show_default=False,
    help="oblivio API base URL [default: http://<api_host>:<api_port>]")]
Token = Annotated[str | None, typer.Option(
    "--token", envvar="OBLIVIO_API_TOKEN", show_default=False,
    help="API token [default: <data_dir>/admin-token]")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


# --- plumbing -----------------------------------------------------------------------------

def _fail(message: str, code: int) -> NoReturn:
    render.err().print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _settings() -> Any:
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"OBLIVIO_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors())
        _fail(f"invalid settings: {problems}", EXIT_REFUSED)


def default_api_url(settings: Any) -> str:
    # A server bound to all interfaces is reached on loopback from this machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.api_host,
                                                                       settings.api_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


def _client(api_url: str | None, token: str | None) -> OblivioClient:
    settings = None
    if not api_url or not token:
        settings = _settings()
    if not token:
        from service.startup import admin_token_path

        path = admin_token_path(settings)
        try:
            token = path.read_text().strip() or None
        except OSError:
            token = None
    return OblivioClient(api_url or default_api_url(settings), token)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn every expected failure into a one-line message and an exit code."""
    from storage.errors import OblivioError

    try:
        yield
    except ApiUnreachable as exc:
        _fail(exc.message, EXIT_FAILED)
    except ApiError as exc:
        hint = ""
        if exc.status == 401:
            hint = " (pass --token, set OBLIVIO_API_TOKEN, or run where <data_dir>/admin-token is)"
        code = EXIT_REFUSED if 400 <= exc.status < 500 else EXIT_FAILED
        _fail(f"{exc.message} [HTTP {exc.status}]{hint}", code)
    except OblivioError as exc:
        _fail(str(exc), EXIT_REFUSED)


@contextmanager
def api(api_url: str | None, token: str | None) -> Iterator[OblivioClient]:
    """A client for the API, with its failures turned into messages and exit codes."""
    with _errors(), _client(api_url, token) as client:
        yield client


# --- serve --------------------------------------------------------------------------------

@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [default: api_host]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: api_port]")] = None,
    workers: Annotated[bool, typer.Option(
        "--workers/--no-workers", help="Start the background workers (Ray dispatcher).")] = True,
) -> None:
    """Run the API (and the background workers) on the configured settings."""
    import uvicorn

    from service.app import create_app
    from service.background import start_background_workers
    from service.startup import admin_token_path, is_embedded, prepare

    from workers.logcontext import configure_logging

    settings = _settings()
    updates = {k: v for k, v in {"api_host": host, "api_port": port}.items() if v is not None}
    settings = settings.model_copy(update=updates)
    configure_logging(settings.log_format, settings.log_level)
    api_app = create_app(settings)
    try:
        report = prepare(settings, api_app.state.sessions)
    except Exception as exc:  # the DB is down or the URL is wrong: say so, no traceback
        _fail(f"cannot prepare the database at {_safe_url(settings.resolved_database_url)}: "
              f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    api_app.state.startup = report
    url = default_api_url(settings)
    print(f"oblivio API:     {url}", flush=True)
    print(f"OpenAPI docs:    {url}/docs", flush=True)
    print(f"metrics:         {url}/metrics", flush=True)
    print(f"dashboard:       {url}/dashboard", flush=True)
    token_file = admin_token_path(settings).resolve()
    if report.admin_token_file is not None:
        print(f"admin token written to {report.admin_token_file}", flush=True)
    elif is_embedded(settings) and token_file.exists():
        print(f"admin token: {token_file}", flush=True)
    else:
        print("create an API token with `oblivio token create --role admin`", flush=True)
    if workers:
        print("starting Ray, the dispatcher and the generation deployment...", flush=True)
    background = start_background_workers(settings, api_app) if workers else None
    try:
        # log_config=None: uvicorn's loggers go through the root handler (JSON or text).
        uvicorn.run(api_app, host=settings.api_host, port=settings.api_port,
                    log_level=settings.log_level.lower(), log_config=None)
    finally:
        if background is not None:
            background.stop()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password we could find either
        return "<unparsable database URL>"


# --- db and tokens (direct database access) -------------------------------------------------

@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations to the configured database."""
    from storage import migrate

    settings = _settings()
    url = settings.resolved_database_url
    try:
        migrate.upgrade(url)
        revision = migrate.current_revision(url)
    except Exception as exc:
        _fail(f"cannot migrate the database at {_safe_url(url)}: {type(exc).__name__}: {exc}",
              EXIT_FAILED)
    print(f"database {_safe_url(url)} is at revision {revision}")


@contextmanager
def _db_session() -> Iterator[Any]:
    from storage import migrate
    from storage.db import make_engine, make_session_factory, transaction
    from storage.errors import OblivioError

    settings = _settings()
    url = settings.resolved_database_url
    try:
        revision = migrate.current_revision(url)
    except Exception as exc:
        _fail(f"cannot open the database at {_safe_url(url)}: {type(exc).__name__}: {exc}",
              EXIT_FAILED)
    if revision is None:
        _fail(f"the database at {_safe_url(url)} has no schema yet; run `oblivio db upgrade` "
              "first", EXIT_FAILED)
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    except OblivioError as exc:
        _fail(str(exc), EXIT_REFUSED)
    finally:
        engine.dispose()


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="submitter, operator or admin")],
    name: Annotated[str | None, typer.Option(help="A label [default: <role>-<time>]")] = None,
    as_json: Json = False,
) -> None:
    """Create a token and print its secret (once: it is stored only as a hash)."""
    from service.schemas.tokens import TokenOut
    from storage import tokens

    name = name or f"{role}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    with _db_session() as session:
        token, secret = tokens.create_token(session, role=role, name=name, actor="cli")
        info = TokenOut.build(token).model_dump(mode="json")
    if as_json:
        render.print_json({**info, "token": secret})
        return
    render.err().print(f"created {info['role']} token {info['name']!r} ({info['id']}); "
                     "store it now, it is not shown again:", markup=False)
    print(secret)


@token_app.command("list")
def token_list(as_json: Json = False) -> None:
    """List tokens (never their secrets)."""
    from service.schemas.tokens import TokenOut
    from storage import tokens

    with _db_session() as session:
        items = [TokenOut.build(t).model_dump(mode="json") for t in tokens.list_tokens(session)]
    if as_json:
        render.print_json(items)
    else:
        render.out().print(render.token_table(items))


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="Token id")]) -> None:
    """Revoke a token; it stops working at once."""
    import uuid

    from storage import tokens

    try:
        parsed = uuid.UUID(token_id)
    except ValueError:
        _fail(f"{token_id!r} is not a token id (a UUID)", EXIT_REFUSED)
    with _db_session() as session:
        tokens.revoke_token(session, token_id=parsed, actor="cli")
    print(f"revoked token {parsed}")


# --- tickets -------------------------------------------------------------------------------

def _parse_qa(pairs: list[str]) -> list[dict[str, str]]:
    out = []
    for pair in pairs:
        question, sep, answer = pair.partition("=>")
        if not sep:
            _fail(f"--qa expects 'question=>answer', got {pair!r}", EXIT_REFUSED)
        out.append({"question": question.strip(), "answer": answer.strip()})
    return out


def _read_body(file: str) -> dict[str, Any]:
    try:
        raw = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_REFUSED)
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"{file} is not valid JSON: {exc}", EXIT_REFUSED)
    if not isinstance(body, dict):
        _fail(f"{file} must hold a JSON object (a ticket body like the API's)", EXIT_REFUSED)
    return body


@ticket_app.command("submit")
def ticket_submit(
    file: Annotated[str | None, typer.Argument(
        help="JSON ticket body like the API's ('-' reads stdin)", show_default=False)] = None,
    text: Annotated[list[str] | None, typer.Option(
        "--text", help="A text to forget (repeatable)")] = None,
    qa: Annotated[list[str] | None, typer.Option(
        "--qa", help="A 'question=>answer' pair to forget (repeatable)")] = None,
    target: Annotated[str | None, typer.Option(help="Who/what is forgotten")] = None,
    dataset: Annotated[str | None, typer.Option(help="delete_records: the dataset")] = None,
    record_id: Annotated[list[str] | None, typer.Option(
        "--record-id", help="delete_records: a record id (repeatable)")] = None,
    subject_id: Annotated[str | None, typer.Option(
        help="delete_records: every record of this data subject")] = None,
    lineage: Annotated[str | None, typer.Option(help="Lineage [default: default]")] = None,
    engine: Annotated[str | None, typer.Option(
        help="o3 (forget default), idk, npo, ga, graddiff; s3t (delete_records)")] = None,
    priority: Annotated[int | None, typer.Option(help="-100..100, higher runs first")] = None,
    not_before: Annotated[str | None, typer.Option(
        help="ISO 8601 time with zone; do not start earlier")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Retrying with the same key never files a second ticket")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the id")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the ticket with a progress bar until it ends; exit 1 if it "
                       "fails or is rejected")] = False,
    timeout: cli_watch.Timeout = None,
    api_url: ApiUrl = None, token: Token = None, as_json: Json = False,
) -> None:
    """File a deletion ticket from FILE or from --text/--qa (forget) or --dataset (records)."""
    from_options = bool(text or qa or dataset or record_id or subject_id)
    if file and from_options:
        _fail("give either FILE or --text/--qa/--dataset options, not both", EXIT_REFUSED)
    if file:
        body = _read_body(file)
    elif dataset or record_id or subject_id:
        body = {"kind": "delete_records", "dataset": dataset}
        if record_id:
            body["record_ids"] = record_id
        if subject_id:
            body["subject_id"] = subject_id
    elif text or qa:
        forget: dict[str, Any] = {}
        if text:
            forget["texts"] = text
        if qa:
            forget["qa"] = _parse_qa(qa)
        body = {"kind": "forget", "forget": forget}
    else:
        _fail("nothing to submit: give FILE, --text/--qa, or --dataset with --record-id or "
              "--subject-id", EXIT_REFUSED)
    overrides = {"target": target, "lineage": lineage, "engine": engine, "priority": priority,
                 "not_before": not_before}
    body.update({k: v for k, v in overrides.items() if v is not None})
    with api(api_url, token) as client:
        ticket = client.submit_ticket(body, idempotency_key=idempotency_key)
        if wait:
            render.err().print(f"ticket {ticket['id']} {ticket['status']} (lineage "
                               f"{ticket['lineage']}, engine {ticket['engine']})", markup=False)
            # The bar is on stderr, so `ID=$(oblivio ticket submit ... --wait -q)` shows it.
            ticket = cli_watch.follow(client, ticket["id"], timeout=timeout,
                                      show_progress=not as_json)
    if wait:
        if quiet and not as_json:
            print(ticket["id"])
        cli_watch.finish(ticket, as_json=as_json, quiet=quiet)
        return
    if as_json:
        render.print_json(ticket)
    elif quiet:
        print(ticket["id"])
    else:
        render.out().print(f"ticket {ticket['id']} {ticket['status']} (lineage "
                         f"{ticket['lineage']}, engine {ticket['engine']})", markup=False)


@ticket_app.command("watch")
def ticket_watch(ticket_id: Annotated[str, typer.Argument(help="Ticket id")],
                 timeout: cli_watch.Timeout = None, api_url: ApiUrl = None,
                 token: Token = None, as_json: Json = False) -> None:
    """Follow a ticket with a progress bar until it ends; exit 1 if it fails or is rejected."""
    with api(api_url, token) as client:
        ticket = cli_watch.follow(client, ticket_id, timeout=timeout, show_progress=not as_json)
    cli_watch.finish(ticket, as_json=as_json)


@ticket_app.command("show")
def ticket_show(ticket_id: Annotated[str, typer.Argument(help="Ticket id")],
                api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Show one ticket: status, progress, result version."""
    with api(api_url, token) as client:
        ticket = client.get_ticket(ticket_id)
    if as_json:
        render.print_json(ticket)
    else:
        render.out().print(render.ticket_detail(ticket))
        if ticket.get("timeline"):
            render.out().print(render.timeline_table(ticket["timeline"]))


@ticket_app.command("list")
def ticket_list(
    status: Annotated[str | None, typer.Option(
        help="queued, running, evaluating, awaiting_review, done, reopened, failed, ...")] = None,
    lineage: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, help="Page size")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    api_url: ApiUrl = None, token: Token = None, as_json: Json = False,
) -> None:
    """List tickets, newest first (a page at a time)."""
    with api(api_url, token) as client:
        page = client.list_tickets(status=status, lineage=lineage, limit=limit, cursor=cursor)
    if as_json:
        render.print_json(page)
        return
    if not page["items"]:
        render.out().print("no tickets")
    else:
        render.out().print(render.ticket_table(page["items"]))
    if page.get("next_cursor"):
        render.err().print(f"more: --cursor {page['next_cursor']}", markup=False)


@ticket_app.command("cancel")
def ticket_cancel(ticket_id: Annotated[str, typer.Argument(help="Ticket id")],
                  api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Cancel a ticket that has not started yet."""
    with api(api_url, token) as client:
        ticket = client.cancel_ticket(ticket_id)
    if as_json:
        render.print_json(ticket)
    else:
        render.out().print(f"ticket {ticket['id']} {ticket['status']}", markup=False)


@ticket_app.command("revoke")
def ticket_revoke(ticket_id: Annotated[str, typer.Argument(help="Id of the done ticket")],
                  reason: Annotated[str, typer.Option(help="Why (kept in its timeline)")],
                  api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Withdraw one done ticket's forgetting, keeping the others (operator; o3 lineages)."""
    with api(api_url, token) as client:
        revoke_ticket = client.revoke_ticket(ticket_id, reason=reason)
    if as_json:
        render.print_json(revoke_ticket)
    else:
        render.out().print(f"revocation queued as ticket {revoke_ticket['id']}; "
                           f"follow it with: oblivio ticket watch {revoke_ticket['id']}",
                           markup=False)


@ticket_app.command("receipt")
def ticket_receipt(ticket_id: Annotated[str, typer.Argument(help="Ticket id")],
                   fmt: Annotated[str, typer.Option(
                       "--format", help="md, html or json (the signed record)")] = "md",
                   api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """The signed receipt of a done ticket: versions, hashes, evaluation, timestamps."""
    from service import receipt_render

    fmt = "json" if as_json else fmt
    if fmt not in ("md", "html", "json"):
        _fail(f"--format must be md, html or json, not {fmt!r}", EXIT_REFUSED)
    with api(api_url, token) as client:
        receipt = client.receipt(ticket_id)
    if fmt == "json":
        # `oblivio receipt verify` re-canonicalises, so indentation does not matter.
        render.print_json(receipt)
    elif fmt == "html":
        print(receipt_render.to_html(receipt), end="")
    else:
        print(receipt_render.to_markdown(receipt), end="")


# --- lineages and versions ------------------------------------------------------------------

LineageOpt = Annotated[str, typer.Option("--lineage", "-l", help="Lineage name")]


@lineage_app.command("create")
def lineage_create(
    name: Annotated[str, typer.Argument(help="Lineage name")],
    base_model: Annotated[str | None, typer.Option(
        help="Base model path/id [default: the service's]")] = None,
    engine: Annotated[str | None, typer.Option(help="o3, s3t, ga, graddiff or npo")] = None,
    api_url: ApiUrl = None, token: Token = None, as_json: Json = False,
) -> None:
    """Create a lineage (operator)."""
    with api(api_url, token) as client:
        lineage = client.create_lineage(name, base_model=base_model, engine=engine)
    if as_json:
        render.print_json(lineage)
    else:
        render.out().print(f"lineage {lineage['name']} on {lineage['base_model']} "
                         f"(engine {lineage['engine']})", markup=False)


@lineage_app.command("list")
def lineage_list(api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """List lineages and their aliases (operator)."""
    with api(api_url, token) as client:
        items = client.list_lineages()
    if as_json:
        render.print_json(items)
    else:
        render.out().print(render.lineage_table(items))


@versions_app.command("list")
def versions_list(lineage: LineageOpt = "default", api_url: ApiUrl = None, token: Token = None,
                  as_json: Json = False) -> None:
    """List the adapter versions of a lineage (operator)."""
    with api(api_url, token) as client:
        items = client.list_versions(lineage)
    if as_json:
        render.print_json(items)
    elif not items:
        render.out().print(f"lineage {lineage} has no versions yet", markup=False)
    else:
        render.out().print(render.version_table(items))


@app.command()
def promote(version: Annotated[int, typer.Argument(help="Version number (N of lineage@vN)")],
            lineage: LineageOpt = "default",
            alias: Annotated[str, typer.Option(help="live or candidate")] = "live",
            api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Point `live` at a version (operator)."""
    with api(api_url, token) as client:
        result = client.promote(lineage, version, alias=alias)
    if as_json:
        render.print_json(result)
    else:
        render.out().print(f"{alias} -> {result['label']}", markup=False)


@app.command()
def rollback(lineage: LineageOpt = "default", api_url: ApiUrl = None, token: Token = None,
             as_json: Json = False) -> None:
    """Move `live` back to the previous version (operator)."""
    with api(api_url, token) as client:
        result = client.rollback(lineage)
    if as_json:
        render.print_json(result)
    else:
        render.out().print(f"live -> {result['label']}", markup=False)


@app.command()
def revoke(version_id: Annotated[str, typer.Argument(help="Version id (UUID)")],
           reason: Annotated[str, typer.Option(help="Why (kept in the audit trail)")],
           tickets: Annotated[str, typer.Option(
               help="Its tickets awaiting review: requeue (train again) or fail")] = "requeue",
           api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Withdraw a version for good (operator); if it was live, its done tickets reopen."""
    if tickets not in ("requeue", "fail"):
        _fail(f"--tickets must be requeue or fail, not {tickets!r}", EXIT_REFUSED)
    with api(api_url, token) as client:
        result = client.revoke(version_id, reason=reason, tickets=tickets)
    if as_json:
        render.print_json(result)
    else:
        render.out().print(f"{result['label']} revoked", markup=False)


@app.command()
def ask(prompt: Annotated[str, typer.Argument(help="The question (one user turn)")],
        lineage: LineageOpt = "default",
        version: Annotated[str | None, typer.Option(
            help="v3, candidate, base or a version id [default: live]")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1, max=1024,
                                                    help="Longest answer, in tokens")] = 64,
        api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Ask the unlearned model: the answer prints as it is decoded, then which version
    gave it (e.g. to check that a ticket's target is forgotten)."""
    with api(api_url, token) as client:
        if as_json:
            render.print_json(client.generate(prompt, lineage=lineage, version=version,
                                              max_new_tokens=max_new_tokens))
            return
        with client.stream_answer(prompt, lineage=lineage, version=version,
                                  max_new_tokens=max_new_tokens) as answer:
            for piece in answer.pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        render.err().print(f"({answer.model})", markup=False)


# Commands of other areas, in their own modules (imported here, after what they reuse).
from service import cli_datasets  # noqa: E402

app.add_typer(cli_datasets.dataset_app, name="dataset")
lineage_app.command("finetune")(cli_datasets.lineage_finetune)


def main() -> None:
    """Console entry point: never shows a traceback, whatever happens."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last line of defence; commands handle what they expect
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("OBLIVIO_DEBUG"):
            raise
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
