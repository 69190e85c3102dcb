#!/usr/bin/env bash
# A GPU session's checks in one device call, most needed first, each with its own limit, every log kept:
# bench/gpu_check.sh (checks and timings, at most 6 minutes; its later parts stop starting after
# --budget-s), then tests/gpu (120 s), then guided jump-forward timed on CUDA (60 s). About 9 minutes in
# all: give the device call timeout_s 570. Logs go to $OUT (the device tool's folder that comes back), else
# to gpu-logs/. The English text the GPU check sets its threshold on is taken from .gpudata/ when it was
# carried there (see bench/RESULTS.md, "GPU"). Needs torch (and transformers for the comparison), never the
# web stack. Extra arguments go to gpu_check.py. Last, what the check's figures say about the defaults it
# measured (bench/gpu_decisions.py), in the call's last lines.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${OUT:-gpu-logs}"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
if [ -f .gpudata/tinyshakespeare.txt ] && [ ! -f ../shared/data/tinyshakespeare.txt ]; then
    mkdir -p ../shared/data && cp .gpudata/tinyshakespeare.txt ../shared/data/
fi
bash bench/gpu_check.sh --budget-s 300 "$@" 2>&1 | tee "$logs/gpu_check.log"
echo "gpu_check: exit ${PIPESTATUS[0]}"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$logs/tests_gpu.log"
echo "tests/gpu: exit ${PIPESTATUS[0]}"
timeout 60 python3 bench/jump_forward.py --device cuda --dtype bfloat16 --least 2 --rounds 2 2>&1 \
    | tee "$logs/jump_forward.log"
echo "jump_forward: exit ${PIPESTATUS[0]}"
# last, so that the call's output ends with it: what the GPU check's figures say about the defaults
python3 bench/gpu_decisions.py "$logs/gpu_check.log" 2>&1 | tee "$logs/decisions.log"
