#!/usr/bin/env bash
# The test suite against the random tiny models of several seeds, one after another (CI runs seed 0 only):
# a check that holds for one model only shows up here. About 3 minutes a seed on 2 cores. One line per
# seed, then the seeds that failed; exits 1 if any did. Extra arguments after `--` go to pytest.
#   bash scripts/seeds.sh 1 2 3            # seeds 1, 2 and 3
#   bash scripts/seeds.sh 5 -- -x tests/test_engine.py
set -uo pipefail
cd "$(dirname "$0")/.."
seeds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
[ -x .venv/bin/python ] || bash scripts/setup.sh
failed=()
log=$(mktemp)
for seed in "${seeds[@]}"; do
  BLT_TEST_SEED="$seed" .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" > "$log" 2>&1
  status=$?
  echo "seed $seed: $(tail -n 1 "$log")"
  [ "$status" -eq 0 ] || failed+=("$seed")
done
rm -f "$log"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (rerun one with BLT_TEST_SEED=N bash scripts/test.sh)"
  exit 1
fi
