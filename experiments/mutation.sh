#!/usr/bin/env bash
# Mutation testing of the loss, metric, model, semi-supervised and volume/DICOM code (mutmut 3; not in CI: about an hour on 2 cores).
#   experiments/mutation.sh [MODULE ...]          run losses, metrics, models (default: those three; the others:
#                                                  python -m experiments.mutation modules), then report
#   experiments/mutation.sh models 'rdunet_jax.models.xǁSqueezeExcitationǁ*'   only the mutants matching a glob
#   experiments/mutation.sh report                the table and every survivor with its diff, from the last runs
# Each module is staged in .mutation/MODULE (git-ignored) and keeps its verdicts there: a second run tests only
# mutants without a verdict (new or changed code, changed tests); delete that folder to start afresh. Inspect one mutant with
#   (cd .mutation/models && mutmut show NAME)
# Needs mutmut 3.8 (pip install mutmut==3.8.1). MUTMUT and PYTHON name other executables; MAX_CHILDREN
# sets the workers per module (default: mutmut's, the CPU count).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# PYTHON and MUTMUT given as paths are resolved here, before the script moves to the checkout and mutmut to
# each staged folder, where a relative path would name nothing.
absolute() { if [[ $1 == */* ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else echo "$1"; fi; }
python=$(absolute "${PYTHON:-python}")
mutmut=$(absolute "${MUTMUT:-mutmut}")
cd "$repo" # `python -m experiments.mutation` runs from the checkout
# The staged tests live two folders deeper than the checkout's, where tests/helpers.py would look for the
# real data beside them: point them at the checkout's.
export RDUNET_DATA_ROOT=${RDUNET_DATA_ROOT:-$repo/../shared/data}
children=()
[[ -n ${MAX_CHILDREN:-} ]] && children=(--max-children "$MAX_CHILDREN")

if [[ ${1:-} == report ]]; then
  exec "$python" -m experiments.mutation report --mutmut "$mutmut"
fi

modules=(losses metrics models)
known=" $("$python" -m experiments.mutation modules) "
globs=()
if [[ $# -gt 0 ]]; then
  modules=()
  for argument in "$@"; do
    if [[ $known == *" $argument "* ]]; then
      modules+=("$argument")
    elif [[ $argument == rdunet_jax.* ]]; then
      globs+=("$argument")
    else
      echo "experiments/mutation.sh: '$argument' is neither a module ($(echo $known | sed 's/ /, /g')), report nor a mutant glob" >&2
      exit 2
    fi
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
