#!/usr/bin/env bash
# Mutation testing of the loss, metric, model and semi-supervised code (mutmut 3; not in CI: about an hour on 2 cores).
#   experiments/mutation.sh [MODULE ...]          run losses, metrics, models (default: those three; also layers, selftrain, mean_teacher), then report
#   experiments/mutation.sh models 'rdunet_jax.models.xǁSqueezeExcitationǁ*'   only the mutants matching a glob
#   experiments/mutation.sh report                the table and every survivor with its diff, from the last runs
# Each module is staged in .mutation/MODULE (git-ignored) and keeps its verdicts there: a second run tests only
# mutants without a verdict (new or changed code, changed tests); delete that folder to start afresh. Inspect one mutant with
#   (cd .mutation/models && mutmut show NAME)
# Needs mutmut 3.8 (pip install mutmut==3.8.1). MUTMUT and PYTHON name other executables; MAX_CHILDREN
# sets the workers per module (default: mutmut's, the CPU count).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" # `python -m experiments.mutation` runs from the checkout
python=${PYTHON:-python}
mutmut=${MUTMUT:-mutmut}
children=()
[[ -n ${MAX_CHILDREN:-} ]] && children=(--max-children "$MAX_CHILDREN")

if [[ ${1:-} == report ]]; then
  exec "$python" -m experiments.mutation report --mutmut "$mutmut"
fi

modules=(losses metrics models)
globs=()
if [[ $# -gt 0 ]]; then
  modules=()
  for argument in "$@"; do
    case $argument in
      losses | metrics | models | layers | selftrain | mean_teacher) modules+=("$argument") ;;
      rdunet_jax.*) globs+=("$argument") ;;
      *) echo "experiments/mutation.sh: '$argument' is neither a module (losses, metrics, models, layers, selftrain, mean_teacher), report nor a mutant glob" >&2; exit 2 ;;
    esac
  done
fi

for module in "${modules[@]}"; do
  "$python" -m experiments.mutation prepare "$module"
  start=$(date +%s)
  # Named mutants are tested again even when they have a verdict; unnamed, only those without one.
  # mutmut's whole output (its progress line redrawn) goes to run.log; the last lines are shown.
  (cd "$repo/.mutation/$module" && nice -n 10 "$mutmut" run "${children[@]}" "${globs[@]}" 2>&1 |
    tr '\r' '\n' >run.log) || { tail -n 40 "$repo/.mutation/$module/run.log"; exit 1; }
  tail -n 3 "$repo/.mutation/$module/run.log"
  echo "$module: $(($(date +%s) - start)) s"
done
"$python" -m experiments.mutation report --mutmut "$mutmut" --no_diffs
