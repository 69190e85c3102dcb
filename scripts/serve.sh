#!/usr/bin/env bash
# Set up .venv if needed (scripts/setup.sh), then run blt-serve with the given arguments
# (none: the shipped model on http://127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/blt-serve "$@"
