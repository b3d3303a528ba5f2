#!/usr/bin/env bash
# One GPU session in a fixed time box of SECONDS, in phases (PHASES, default "breakdown benchmark studies"):
#   breakdown  experiments/step_breakdown.py: each block's forward and backward alone (BREAKDOWN_SECONDS)
#   benchmark  experiments/gpu_benchmark.py, alone on the card, as configured and with the model.* speed
#              options in BENCHMARK_SETS, default none (BENCHMARK_SECONDS; on an H200 compiling the
#              batch-128 step alone took 95-108 s, XLA's autotuner)
#   studies    pending study runs in parallel processes until 40 s before the end (the card is far from
#              busy with one small run); runs cut short leave no record and rerun next time
#
#   bash experiments/gpu_session.sh OUT DATA_ROOT [SECONDS=560]
#
# OUT receives gpu.txt, the JSON of each measurement, logs.tgz and results.tgz (experiments/results as it
# ends: unpack it over the checkout). DATA_ROOT holds covid-semiseg/. Wheels in .whl/ (what the GPU image
# lacks: grain, tfds, ml_collections...) are installed first. Study runs use float32 matmul precision
# ('highest'), as on the CPU; no two processes ever share a run (each takes its own arms and folds).
set -u
out=${1:?OUT}
data_root=${2:?DATA_ROOT}
seconds=${3:-560}
started=$(date +%s)
left() { echo $((seconds - ($(date +%s) - started))); }
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && python3 -c \
  "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())") >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

breakdown() {
  timeout "${BREAKDOWN_SECONDS:-120}" python3 experiments/step_breakdown.py --image_size 256 --batch_size 8 \
    --json "$out/step_breakdown.json" >"$out/breakdown.log" 2>&1
  echo "breakdown: exit $?, $(left) s left"
}

benchmark() {
  local each=$((${BENCHMARK_SECONDS:-300} / (1 + $(wc -w <<<"${BENCHMARK_SETS-}"))))
  local name set
  for set in "" ${BENCHMARK_SETS-}; do
    name=gpu_benchmark${set:+_${set//[^a-z0-9]/_}}
    timeout "$each" python3 experiments/gpu_benchmark.py --dtypes bfloat16 float32 --batch_sizes 8 128 \
      --infer_batch_sizes 128 --steps 10 ${set:+--set "$set"} --json "$out/$name.json" >"$out/$name.log" 2>&1
    echo "$name: exit $?, $(left) s left"
  done
}

studies() {
  local budget=${STUDY_BUDGET:-small} pids=() fold arm recipe_arms folds
  # exec: each background job is then the Python process itself, so its pid is the one to signal.
  study() { exec python3 experiments/run_study.py "$@" --budget "$budget" --data_root "$data_root"; }
  # The prepared dataset is built once, before the processes that read it start.
  python3 -c "
import sys; sys.path.insert(0, 'experiments')
from studies import design
from rdunet_jax.datasets import builder
budget = design.BUDGETS[('$budget', 'semiseg')]
builder.prepare(design.base_config('semiseg', budget, '$data_root').data)
" >"$out/prepare.log" 2>&1 || return 1
  folds=$(python3 -c "import sys; sys.path.insert(0, 'experiments'); from studies import design
print(' '.join(map(str, range(design.BUDGETS[('$budget', 'semiseg')].cv_folds))))")
  recipe_arms=$(python3 -c "import sys; sys.path.insert(0, 'experiments'); from studies import design
print(' '.join(arm.name for arm in design.STUDIES['recipe'].arms[1:]))")
  export JAX_DEFAULT_MATMUL_PRECISION=highest
  for fold in $folds; do
    study ablation --folds "$fold" >"$out/ablation_$fold.log" 2>&1 &
    pids+=($!)
    # Only the schedules no other study runs; the shared arms (paper, residual_se, resdunet) come from
    # the ablation, and running `dilation` once more afterwards records them.
    study dilation --folds "$fold" --arms decreasing,increasing,rate1 >"$out/dilation_$fold.log" 2>&1 &
    pids+=($!)
    for arm in $recipe_arms; do
      study recipe --folds "$fold" --arms "$arm" >"$out/recipe_${arm}_$fold.log" 2>&1 &
      pids+=($!)
    done
  done
  unset JAX_DEFAULT_MATMUL_PRECISION
  # SIGTERM: each run saves a checkpoint and exits within seconds; SIGKILL 20 s later regardless.
  (sleep "$(($(left) - 40))"; kill -TERM "${pids[@]}" 2>/dev/null; sleep 20; kill -KILL "${pids[@]}" 2>/dev/null) &
  local killer=$!
  wait "${pids[@]}" 2>/dev/null
  kill "$killer" 2>/dev/null
  echo "studies ended with $(left) s left"
}

for phase in ${PHASES:-breakdown benchmark studies}; do
  "$phase"
done
tar czf "$out/results.tgz" experiments/results
# The logs as one archive (the tool brings back at most 8 files).
(cd "$out" && tar czf logs.tgz ./*.log && rm -f ./*.log)
ls -la "$out"
