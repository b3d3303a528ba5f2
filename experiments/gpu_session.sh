#!/usr/bin/env bash
# One GPU session in a fixed time box: pending study runs in parallel processes (the card is far from
# busy with one small run) for STUDY_SECONDS (default 360), then the GPU benchmark alone on the card until
# SECONDS, then an archive of the new records.
#
#   bash experiments/gpu_session.sh OUT DATA_ROOT [SECONDS=560]
#
# OUT receives gpu.txt, gpu_benchmark.json, the logs and results.tgz (experiments/results as it ends;
# unpack it over the checkout: finished runs are skipped next time, unfinished ones rerun). DATA_ROOT holds
# covid-semiseg/. Wheels in .whl/ (packages the GPU image lacks: grain, tfds, ml_collections...) are
# installed first. Study runs use float32 matmul precision ('highest'), as on the CPU; no two processes
# ever share a run (each takes its own arms and folds).
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

# 1. Studies, for STUDY_SECONDS (runs cut short leave no record and rerun next time). The prepared
# dataset is built once, before the processes that read it start.
budget=${STUDY_BUDGET:-small}
# exec: each background job is then the Python process itself, so its pid is the one to signal.
study() { exec python3 experiments/run_study.py "$@" --budget "$budget" --data_root "$data_root"; }
python3 -c "
import sys; sys.path.insert(0, 'experiments')
from studies import design
from rdunet_jax.datasets import builder
budget = design.BUDGETS[('$budget', 'semiseg')]
builder.prepare(design.base_config('semiseg', budget, '$data_root').data)
" || exit 1
folds=$(python3 -c "import sys; sys.path.insert(0, 'experiments'); from studies import design
print(' '.join(map(str, range(design.BUDGETS[('$budget', 'semiseg')].cv_folds))))")
export JAX_DEFAULT_MATMUL_PRECISION=highest
pids=()
recipe_arms=$(python3 -c "import sys; sys.path.insert(0, 'experiments'); from studies import design
print(' '.join(arm.name for arm in design.STUDIES['recipe'].arms[1:]))")
for fold in $folds; do
  study ablation --folds "$fold" >"$out/ablation_$fold.log" 2>&1 &
  pids+=($!)
  # Only the schedules no other study runs; the shared arms (paper, residual_se, resdunet) come from the
  # ablation, and running `dilation` once more afterwards records them.
  study dilation --folds "$fold" --arms decreasing,increasing,rate1 >"$out/dilation_$fold.log" 2>&1 &
  pids+=($!)
  if [ "${RECIPE:-1}" = 1 ]; then
    for arm in $recipe_arms; do
      study recipe --folds "$fold" --arms "$arm" >"$out/recipe_${arm}_$fold.log" 2>&1 &
      pids+=($!)
    done
  fi
done
# SIGTERM: each run saves a checkpoint and exits within seconds.
(sleep "$((${STUDY_SECONDS:-360} - ($(date +%s) - started)))"; kill -TERM "${pids[@]}" 2>/dev/null) &
killer=$!
wait "${pids[@]}" 2>/dev/null
kill "$killer" 2>/dev/null
echo "studies ended with $(left) s left"
sleep 2

# 2. The benchmark, alone on the card, in the time left (it saves its figures as it goes).
unset JAX_DEFAULT_MATMUL_PRECISION
timeout "$(($(left) - 20))" python3 experiments/gpu_benchmark.py --batch_sizes 8 64 \
  --infer_batch_sizes 16 128 --steps 10 --json "$out/gpu_benchmark.json" >"$out/benchmark.log" 2>&1
echo "benchmark: exit $?, $(left) s left"
tar czf "$out/results.tgz" experiments/results
# Logs: one archive (the tool brings back few files).
tar czf "$out/logs.tgz" -C "$out" $(cd "$out" && ls ./*.log)
rm -f "$out"/ablation_*.log "$out"/dilation_*.log "$out"/recipe_*.log
ls -la "$out"
