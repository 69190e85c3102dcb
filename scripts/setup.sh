#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Safe to run again: it skips what is
# already there. An importable torch (a GPU build, say) is kept; where none is importable, a GPU
# machine gets the default torch and a CPU-only machine the CPU build (torch 2.13.0, which this
# project's CI machines hold on disk). Override with BLT_TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so that a torch installed system-wide is reused, not replaced.
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${BLT_TORCH_SPEC:-}" ]; then
    spec=$BLT_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.5"
  else
    spec="torch==2.13.0"
  fi
  echo "setup: installing $spec"
  "$PY" -m pip install -q "$spec"
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
