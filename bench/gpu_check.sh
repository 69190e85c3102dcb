#!/usr/bin/env bash
# The GPU check in one command, inside 6 minutes of device time: a BLT with the released 1B shapes and
# random weights built on the GPU, checked against full recompute, timed, and compared with
# transformers in the same run (bench/gpu_check.py; JSON line last). Needs torch and transformers,
# not the web stack. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 360 python3 bench/gpu_check.py "$@"
