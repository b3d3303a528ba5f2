#!/usr/bin/env bash
# Test-suite time, before and after a change: alternating rounds, each in a fresh process on a cold
# compilation cache (as CI runs), one git worktree per commit. Run from the checkout with nothing else running:
#   experiments/test_time_ab.sh BEFORE AFTER [ROUNDS] [PYTEST ARGUMENTS...]
#   experiments/test_time_ab.sh 160b059 5813171 2 tests/test_models.py tests/test_reference_forward.py -n0
# Prints one line a run (round, commit, seconds) and each commit's median.
set -euo pipefail
before=${1:?BEFORE commit}
after=${2:?AFTER commit}
rounds=${3:-2}
shift $(($# < 3 ? $# : 3))
python=${PYTHON:-$(pwd)/.venv/bin/python}
# The worktrees are not beside ../shared/data: the real-data tests read it where this checkout has it.
export RDUNET_DATA_ROOT=${RDUNET_DATA_ROOT:-$(cd .. && pwd)/shared/data}
scratch=$(mktemp -d)
trap 'git worktree remove --force "$scratch/before" 2>/dev/null; git worktree remove --force "$scratch/after" 2>/dev/null; rm -rf "$scratch"' EXIT
git worktree add -q --detach "$scratch/before" "$before"
git worktree add -q --detach "$scratch/after" "$after"
for round in $(seq "$rounds"); do
  for side in before after; do
    rm -rf "$scratch/$side/.pytest_cache"  # the compilation cache lives there: cold, as in CI
    start=$(date +%s.%N)
    (cd "$scratch/$side" && "$python" -m pytest -q "$@" >"$scratch/$side.log" 2>&1) ||
      { tail -n 20 "$scratch/$side.log"; exit 1; }
    echo "$round $side $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")" | tee -a "$scratch/times"
  done
done
python3 - "$scratch/times" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    _, side, seconds = line.split()
    times.setdefault(side, []).append(float(seconds))
before, after = statistics.median(times["before"]), statistics.median(times["after"])
print(f"median before {before:.1f} s, after {after:.1f} s, ratio {after / before:.2f}")
PY
