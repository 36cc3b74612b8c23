"""`oblivio bench`: the unlearning benchmark table, run locally (no service needed)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer


def bench(
    suite: Annotated[str, typer.Option(help="quick (tiny model, seconds), small (bundled "
                                            "model, minutes) or full (hours)")] = "quick",
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods/engines [default: the suite's, e.g. o3,ga,graddiff,npo,s3t]")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where the PNG plots and results JSON go")] = Path(
        "bench-results"),
    work_dir: Annotated[Path | None, typer.Option(
        help="Scratch space for models and adapters [default: a temporary directory]")] = None,
) -> None:
    """Compare unlearning methods on the same sequential requests; print the Markdown table."""
    from service.cli import EXIT_REFUSED, _fail, _settings
    from workers.evaluation.bench import result_json, run_bench, save_plots, suite_with

    try:
        chosen = suite_with(suite, methods=[m.strip() for m in methods.split(",") if m.strip()]
                            if methods else None)
    except ValueError as exc:
        _fail(str(exc), EXIT_REFUSED)
    settings = _settings()
    with tempfile.TemporaryDirectory(prefix="oblivio-bench-") as tmp:
        scratch = work_dir or Path(tmp)
        result = run_bench(chosen, work_dir=scratch, base_model=settings.base_model,
                           data_dir=settings.data_dir.resolve(),
                           progress=lambda line: typer.echo(line, err=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{chosen.name}.json").write_text(result_json(result))
    plots = save_plots(result, out) if result.rows else []
    typer.echo(result.markdown())
    typer.echo(f"({result.seconds:.0f} s; plots: {', '.join(str(p) for p in plots) or 'none'})",
               err=True)
