#!/usr/bin/env bash
# Runs the whole test suite with real parts: installs the project, starts PostgreSQL on
# 127.0.0.1 (Debian package), and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
bash .ci/postgres.sh
bash .ci/browser.sh   # chromium + chromedriver for the dashboard's browser test
export RAY_AUTH_MODE=disabled
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q -ra "$@"
