"""`oblivio dataset ...` and `oblivio lineage finetune`: S3T's datasets and fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service import cli_render as render
from service import cli_watch
from service.cli import EXIT_FAILED, EXIT_REFUSED, ApiUrl, Json, Token, _fail, api

dataset_app = typer.Typer(help="Fine-tuning datasets (records with ids and data subjects).",
                          no_args_is_help=True)


@dataset_app.command("add")
def dataset_add(
    name: Annotated[str, typer.Argument(help="Dataset name")],
    file: Annotated[Path, typer.Argument(help="JSONL: one record per line: id, subject_id?, "
                                              "text or prompt/response")],
    api_url: ApiUrl = None, token: Token = None, as_json: Json = False,
) -> None:
    """Register the records of FILE under NAME (operator)."""
    try:
        jsonl = file.read_text()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_REFUSED)
    with api(api_url, token) as client:
        out = client.add_dataset_jsonl(name, jsonl)
    if as_json:
        render.print_json(out)
    else:
        render.out().print(f"dataset {out['name']}: {out['records']} records, "
                           f"{out['subjects']} subjects", markup=False)


@dataset_app.command("show")
def dataset_show(name: Annotated[str, typer.Argument(help="Dataset name")],
                 api_url: ApiUrl = None, token: Token = None, as_json: Json = False) -> None:
    """Counts, and shards with their slices once fine-tuned (operator)."""
    with api(api_url, token) as client:
        out = client.get_dataset(name)
    if as_json:
        render.print_json(out)
        return
    console = render.out()
    console.print(f"dataset {out['name']}: {out['records']} records ({out['deleted_records']} "
                  f"deleted), {out['subjects']} subjects", markup=False)
    for shard in out["shards"]:
        console.print(f"  shard {shard['shard']}: {shard['records']} records, slices "
                      f"{json.dumps(shard['slices'])}", markup=False)


def lineage_finetune(
    name: Annotated[str, typer.Argument(help="Lineage name")],
    dataset: Annotated[str, typer.Option(help="Registered dataset")],
    shards: Annotated[int, typer.Option(help="Shards (ensembled models)")] = 1,
    slices: Annotated[int, typer.Option(help="Slices per shard (layer groups)")] = 2,
    sequences_per_shard: Annotated[int, typer.Option(help="Slice orderings per shard")] = 2,
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="Other S3T option as NAME=JSON, e.g. epochs=12 (repeatable)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it with a progress bar")] = False,
    api_url: ApiUrl = None, token: Token = None, as_json: Json = False,
) -> None:
    """Fine-tune a lineage on a dataset with S3T (operator); --wait follows it to the end."""
    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, raw = item.partition("=")
        if not sep:
            _fail(f"--option expects NAME=VALUE, got {item!r}", EXIT_REFUSED)
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    body = {"dataset": dataset, "engine": "s3t", "shards": shards, "slices": slices,
            "sequences_per_shard": sequences_per_shard, "options": options}
    with api(api_url, token) as client:
        out = client.finetune(name, body)
        if not wait:
            if as_json:
                render.print_json(out)
            else:
                render.out().print(f"job {out['job_id']} queued (ticket {out['ticket_id']})",
                                   markup=False)
            return
        ticket = cli_watch.follow(client, out["ticket_id"], show_progress=not as_json)
    if as_json:
        render.print_json({**out, "status": ticket["status"],
                           "version": (ticket.get("result_version") or {}).get("label")})
    if ticket["status"] in cli_watch.REVIEW_STATES:
        # Held back like any ticket's version: say how to promote it, as `ticket --wait` does.
        if not as_json:
            render.out().print(cli_watch.outcome_line(ticket)[0], markup=False)
        return
    if ticket["status"] != "done":
        _fail(f"fine-tune {ticket['status']}: {ticket.get('error') or 'no error recorded'}",
              EXIT_FAILED)
    if not as_json:
        render.out().print(f"{ticket['result_version']['label']} is live", markup=False)

