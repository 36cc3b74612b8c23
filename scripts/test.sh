#!/usr/bin/env bash
# Runs the whole test suite with real parts: installs the project, starts PostgreSQL on
# 127.0.0.1 (Debian package), and runs pytest. Extra arguments go to pytest.
#
# Nothing the suite starts may outlive it: pytest runs under scripts/no_leftovers.py, which
# fails the run (exit 3) if any process it started is still running afterwards, and a
# PostgreSQL cluster this script had to start is stopped again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test

PG_VERSION=${PG_VERSION:-15}
PG_CLUSTER=${PG_CLUSTER:-main}
pg_online() {
  command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null \
    | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' | grep -q online
}
pg_was_online=no
if pg_online; then pg_was_online=yes; fi
bash .ci/postgres.sh
bash .ci/browser.sh   # chromium + chromedriver for the dashboard's browser test
if [ "$pg_was_online" = no ] && pg_online; then
  trap 'pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop || true' EXIT
fi

export RAY_AUTH_MODE=disabled
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python scripts/no_leftovers.py -- .venv/bin/python -m pytest -q -ra --durations=25 "$@"
