#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv (scripts/setup.sh) and Chromium for the
# browser test, lints, runs pytest in two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium for the playground's browser test (Debian packages), where it is missing and can be
# installed; without it that test is skipped and says why.
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (Debian)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "setup: could not install chromium; the browser test will be skipped"
  fi
fi
.venv/bin/python -m ruff check .
# two workers (pytest-xdist; conftest.py gives each one torch thread): the suite is largely
# single-threaded Python (Triton's interpreter, servers, subprocesses) and takes half the time on
# two cores. `bash scripts/test.sh -n 0` runs it in one process.
.venv/bin/python -m pytest -n 2 "$@"
# Then, after a whole run against seed 0's models, the parity tests (the model against transformers, the
# engine against full recompute) again against seed 1's: other weights, other patches, about 40 s. A check
# that holds for one model only fails here rather than for a user (`bash scripts/seeds.sh` runs more seeds).
if [ $# -eq 0 ] && [ -z "${BLT_TEST_SEED:-}" ]; then
  echo "the parity tests against a second random model (BLT_TEST_SEED=1):"
  BLT_TEST_SEED=1 .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider tests/test_parity_transformers.py \
    tests/test_model.py tests/test_engine.py tests/test_static.py tests/test_overlap.py tests/test_shared_prompts.py \
    tests/test_prompt_scores.py tests/test_batched_prefill.py tests/test_kept_prefixes.py tests/test_guided.py \
    tests/test_cache_memory.py tests/test_preemption.py tests/test_jump_forward.py
fi
