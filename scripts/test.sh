#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv (scripts/setup.sh), lints, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "$@"
