"""`oblivio bench`: the headline table, its notes for engines that are not there yet, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.evaluation.bench import (
    BenchResult,
    Row,
    fictitious_world,
    headline_table,
    save_plots,
    suite_with,
)


def _rows() -> list[Row]:
    return [Row("ga", 1, 0.9, 0.5, 0.4, None, 0.51, 0.2, 30.0, 0.1, 2.0),
            Row("npo", 1, 0.8, 0.9, 0.95, 1.0, 0.55, None, 12.5, 0.0, 4.0)]


def test_headline_table_has_every_column_and_ratios_of_training_time():
    result = BenchResult("quick", rows=_rows(), notes=["o3: engine not registered yet, skipped"],
                         base={"mia_auc": 0.9, "perplexity": 8.0})
    table = headline_table(result)
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("forget efficacy", "neighbour", "utility", "MIA AUC", "relearn",
                   "fluency", "train s"):
        assert column in header
    assert "| ga | 1 | 0.90 | 0.50 | 0.40 | - | 0.51 | 0.20 | 30.0 / 0.10 | 2.0 (1.00) |" in table
    assert "| npo | 1 | 0.80 | 0.90 | 0.95 | 1.00 | 0.55 | - | 12.5 / 0.00 | 4.0 (2.00) |" in table
    assert "Note: o3: engine not registered yet, skipped" in table
    assert "base 0.90" in table


def test_plots_are_written(tmp_path: Path):
    paths = save_plots(BenchResult("quick", rows=_rows()), tmp_path)
    assert [p.name for p in paths] == ["tradeoff_quick.png", "sequential_quick.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_quick_world_keeps_neighbours_apart_from_the_requests():
    requests, neighbours, utility = fictitious_world(3)
    forgotten = {r.target for r in requests}
    assert len(requests) == 3 and all(len(r.qa) == 2 for r in requests)
    assert not any(t.split()[0] in p.question for p in neighbours for t in forgotten)
    assert utility and neighbours
    with pytest.raises(ValueError, match="at most"):
        fictitious_world(10)
    with pytest.raises(ValueError, match="unknown suite"):
        suite_with("huge")
    assert suite_with("quick", methods=["ga"]).methods == ("ga",)


def test_oblivio_bench_quick_prints_the_table_on_a_tiny_model(tmp_path: Path, bundled_model,
                                                              monkeypatch):
    """The real quick suite (tiny model), with one baseline and one unregistered engine."""
    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.setenv("OBLIVIO_BASE_MODEL", str(bundled_model.local_path))
    monkeypatch.setenv("OBLIVIO_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "--suite", "quick", "--methods", "ga",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| method | requests | forget efficacy" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ga |")]
    assert [line.split("|")[2].strip() for line in rows] == ["1", "2"]
    saved = json.loads((out / "bench_quick.json").read_text())
    assert [row["requests"] for row in saved["rows"]] == [1, 2]
    assert (out / "tradeoff_quick.png").exists() and (out / "sequential_quick.png").exists()
    bad = CliRunner().invoke(app, ["bench", "--suite", "nope"])
    assert bad.exit_code == 2 and "unknown suite" in bad.stderr
