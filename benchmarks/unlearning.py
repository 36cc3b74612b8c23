"""The headline comparison: O3 vs GA vs GradDiff vs NPO (and S3T where it applies) on the
same sequential forget requests. Same as `oblivio bench`; see workers/evaluation/bench.py.

    .venv/bin/python benchmarks/unlearning.py --suite quick       # tiny model, CI
    flock /tmp/oblivio-heavy.lock .venv/bin/python benchmarks/unlearning.py --suite small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# The repository root instead of this folder: benchmarks/queue.py would shadow the
# standard library's queue module (torch imports it).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from workers.evaluation.bench import SUITES, result_json, run_bench, save_plots, suite_with  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--methods", help="comma-separated, e.g. ga,npo")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--data-dir", type=Path, default=Path(".cache/oblivio-data"),
                        help="where the converted bundled model is cached")
    args = parser.parse_args()
    suite = suite_with(args.suite, methods=args.methods.split(",") if args.methods else None)
    with tempfile.TemporaryDirectory(prefix="oblivio-bench-") as tmp:
        result = run_bench(suite, work_dir=Path(tmp), data_dir=args.data_dir.resolve(),
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{suite.name}.json").write_text(result_json(result))
    plots = save_plots(result, args.out) if result.rows else []
    print(result.markdown())
    print(f"({result.seconds:.0f} s; plots: {', '.join(map(str, plots)) or 'none'})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
