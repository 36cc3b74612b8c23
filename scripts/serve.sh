#!/usr/bin/env bash
# Runs the oblivio service on the embedded defaults: SQLite + local object store in
# ./.oblivio (or $OBLIVIO_DATA_DIR), a local Ray cluster, and the bundled SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec .venv/bin/oblivio serve "$@"
