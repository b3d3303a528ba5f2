#!/usr/bin/env bash
# One GPU session in a fixed time box of SECONDS, in phases (PHASES, default "breakdown benchmark studies"):
#   breakdown  experiments/step_breakdown.py: each block's forward and backward alone (BREAKDOWN_SECONDS)
#   benchmark  experiments/gpu_benchmark.py, alone on the card, as configured and with the model.* speed
#              options in BENCHMARK_SETS, default none (BENCHMARK_SECONDS; on an H200 compiling the
#              batch-128 step alone took 95-108 s, XLA's autotuner)
#   studies    pending study runs in parallel processes until 40 s before the end (the card is far from
#              busy with one small run); runs cut short leave no record and rerun next time
#   unpack     experiments/pack_ma2020.py: the Ma et al. parts found in PACK (.gpu_data/ma2020) into
#              DATA_ROOT/covid19-ct-seg-2d, checked; the folder may stay incomplete (a part per call)
#   ab         experiments/compiler_options_ab.py: the bfloat16 train step with today's speed defaults
#              against AB_VARIANTS (default: BatchNorm and dropout in their old forms, 'flax'), compiled
#              in one process and timed round-robin (AB_SECONDS=200, AB_BATCH_SIZE=8, AB_ROUNDS=30,
#              AB_EXTRA: more arguments)
#   paper      the paper's table on ma2020_2d (issue 28; experiments/README.md "Paper table on a GPU"):
#              checks the unpacked folder is complete, prepares the random and blocks splits, then
#              trains PAPER_QUEUE's arms seed by seed, PAPER_CONCURRENCY processes at a time, starting
#              one only while more than PAPER_MIN_START s are left, and stops them PAPER_STOP_MARGIN s
#              before the end (SIGTERM: each saves a checkpoint that the same command resumes from on
#              this machine); PAPER_BUDGET (paper), PAPER_SETS (run_study --set items), PAPER_DATA_DIR,
#              RESULTS_ROOT, RUNS_ROOT, PAPER_MPS=1 (runs share the card through CUDA MPS; untried);
#              OUT gets runs.tgz (each run's logs and metrics, no checkpoints)
#   cv         the cross-validation runs listed in CV_RUNS (default experiments/multiclass_cv_runs.txt:
#              "candidate fold config [--config.key=value ...]" lines) on DATA_ROOT/covid-semiseg: the
#              prepared datasets are built once (experiments/prepare_cv.py; `{data_root}` in an override is
#              DATA_ROOT), then CV_CONCURRENCY (10) processes at a time in the file's order, starting one only while
#              more than CV_MIN_START (150) s are left, SIGTERM
#              CV_STOP_MARGIN (25) s before the end; workdirs in CV_ROOT (/dev/shm/cv: Orbax's saves stay
#              off the disk), `latest` saved every CV_CHECKPOINT_EVERY_EPOCHS (50) epochs; OUT gets
#              cv_runs.tgz (each run's config, train log and metrics; no checkpoints) and smi.log
#
#   bash experiments/gpu_session.sh OUT DATA_ROOT [SECONDS=560]
#
# OUT receives gpu.txt, the JSON of each measurement, logs.tgz and results.tgz (experiments/results as it
# ends, or RESULTS_ROOT: unpack it over the checkout). DATA_ROOT holds covid-semiseg/ (studies) or
# covid19-ct-seg-2d/ (paper). Wheels in WHEEL_DIR (.whl/: what the GPU image lacks, grain, tfds,
# ml_collections...) are installed first. Study runs use float32 matmul precision ('highest'), as on the
# CPU, unless they compute in bfloat16; no two processes ever share a run (each takes its own arms and
# folds or seeds).
set -u
out=${1:?OUT}
data_root=${2:?DATA_ROOT}
seconds=${3:-560}
started=$(date +%s)
left() { echo $((seconds - ($(date +%s) - started))); }
cd "$(dirname "$0")/.."

# Runs the shell commands in the array named $2 (labels: the array named $1), at most $3 at a time, in
# order, starting one only while more than $4 s are left, and stops those still running $5 s before the
# end: SIGTERM (a training run saves a checkpoint at its next step and exits; one still compiling or
# evaluating hears it only afterwards), then SIGKILL 20 s later regardless. Prints, prefixed by $6, each
# run's start, exit status and seconds. Each command is run with `exec`, so its pid is the one signalled.
run_pool() {
  local -n pool_labels=$1 pool_commands=$2
  local concurrency=$3 min_start=$4 margin=$5 prefix=$6 next=0 pid
  local -A running=() started_at=()
  pool_reap() {
    for pid in "${!running[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"
        echo "$prefix: ${running[$pid]}: exit $?, $(($(date +%s) - started_at[$pid])) s, $(left) s left"
        unset "running[$pid]" "started_at[$pid]"
      fi
    done
  }
  while :; do
    pool_reap
    if (($(left) <= margin)); then
      ((${#running[@]})) && kill -TERM "${!running[@]}" 2>/dev/null
      for _ in $(seq 20); do
        pool_reap
        ((${#running[@]})) || break
        sleep 1
      done
      if ((${#running[@]})); then
        echo "$prefix: killing ${running[*]}, alive 20 s after SIGTERM (a checkpoint saved before is kept)"
        kill -KILL "${!running[@]}" 2>/dev/null
      fi
      break
    fi
    while ((${#running[@]} < concurrency && next < ${#pool_commands[@]} && $(left) > min_start)); do
      bash -c "exec ${pool_commands[next]}" &
      running[$!]=${pool_labels[next]}
      started_at[$!]=$(date +%s)
      echo "$prefix: started ${pool_labels[next]}, $(left) s left"
      next=$((next + 1))
    done
    ((${#running[@]})) || break
    sleep 2
  done
  echo "$prefix: $next of ${#pool_commands[@]} runs started; $(left) s left"
}

results_root=${RESULTS_ROOT:-experiments/results}
wheel_dir=${WHEEL_DIR:-.whl}
if compgen -G "$wheel_dir/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheel_dir"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && python3 -c \
  "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())
import grain, ml_collections, tensorboardX, tensorflow_datasets") >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

breakdown() {
  timeout "${BREAKDOWN_SECONDS:-120}" python3 -m experiments.step_breakdown --image_size 256 --batch_size 8 \
    --json "$out/step_breakdown.json" >"$out/breakdown.log" 2>&1
  echo "breakdown: exit $?, $(left) s left"
}

benchmark() {
  local each=$((${BENCHMARK_SECONDS:-300} / (1 + $(wc -w <<<"${BENCHMARK_SETS-}"))))
  local name set
  for set in "" ${BENCHMARK_SETS-}; do
    name=gpu_benchmark${set:+_${set//[^a-z0-9]/_}}
    timeout "$each" python3 -m experiments.gpu_benchmark --dtypes bfloat16 float32 --batch_sizes 8 128 \
      --infer_batch_sizes 128 --steps 10 ${set:+--set "$set"} --json "$out/$name.json" >"$out/$name.log" 2>&1
    echo "$name: exit $?, $(left) s left"
  done
}

studies() {
  local budget=${STUDY_BUDGET:-small} pids=() fold arm recipe_arms folds
  # exec: each background job is then the Python process itself, so its pid is the one to signal.
  study() { exec python3 -m experiments.run_study "$@" --budget "$budget" --data_root "$data_root"; }
  # The prepared dataset is built once, before the processes that read it start.
  python3 -c "
from experiments.studies import design
from rdunet_jax.datasets import builder
budget = design.BUDGETS[('$budget', 'semiseg')]
builder.prepare(design.base_config('semiseg', budget, '$data_root').data)
" >"$out/prepare.log" 2>&1 || return 1
  folds=$(python3 -c "from experiments.studies import design
print(' '.join(map(str, range(design.BUDGETS[('$budget', 'semiseg')].cv_folds))))")
  recipe_arms=$(python3 -c "from experiments.studies import design
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
  [[ ${PAPER_MPS-} == 1 ]] && echo quit | nvidia-cuda-mps-control 2>/dev/null
  # SIGTERM: each run saves a checkpoint and exits within seconds; SIGKILL 20 s later regardless.
  (sleep "$(($(left) - 40))"; kill -TERM "${pids[@]}" 2>/dev/null; sleep 20; kill -KILL "${pids[@]}" 2>/dev/null) &
  local killer=$!
  wait "${pids[@]}" 2>/dev/null
  kill "$killer" 2>/dev/null
  echo "studies ended with $(left) s left"
}

unpack() {
  python3 -m experiments.pack_ma2020 unpack --pack "${PACK:-.gpu_data/ma2020}" \
    --dest "$data_root/covid19-ct-seg-2d" --partial
  echo "unpack: exit $?, $(left) s left"
}

ab() {
  local batch=${AB_BATCH_SIZE:-8} variants=() variant
  for variant in ${AB_VARIANTS:-old_forms=model.batch_norm_impl=flax,model.dropout_impl=flax}; do
    variants+=(--model_option "$variant")
  done
  # One process: the variants share XLA's autotuning of the convolutions they have in common, and
  # round-robin rounds keep the card's drift out of the ratios. It prints only at its end.
  timeout "${AB_SECONDS:-200}" python3 -m experiments.compiler_options_ab --what train --image_size 256 \
    --batch_size "$batch" --rounds "${AB_ROUNDS:-30}" --set model.dtype=bfloat16 "${variants[@]}" \
    ${AB_EXTRA-} --json "$out/speed_ab_b$batch.json" --markdown "$out/speed_ab_b$batch.md" >"$out/speed_ab.log" 2>&1
  echo "ab: exit $?, $(left) s left"
  cat "$out/speed_ab_b$batch.md" 2>/dev/null
}

paper() {
  local budget=${PAPER_BUDGET:-paper} runs_root=${RUNS_ROOT:-experiments/runs}
  local concurrency=${PAPER_CONCURRENCY:-2} min_start=${PAPER_MIN_START:-240} margin=${PAPER_STOP_MARGIN:-60}
  local common=(--budget "$budget" --dataset ma2020_2d --data_root "$data_root"
    --data_dir "${PAPER_DATA_DIR-}" --results_root "$results_root" --runs_root "$runs_root")
  for item in ${PAPER_SETS-dtype=bfloat16 num_epochs=80}; do common+=(--set "$item"); done
  python3 -m experiments.pack_ma2020 unpack --pack "${PACK:-.gpu_data/ma2020}" \
    --dest "$data_root/covid19-ct-seg-2d" || return 1
  # The prepared datasets (random and blocks splits) are built once, before the processes that read them
  # start; then the queue: "study arm seed" lines of the runs not yet recorded, in PAPER_QUEUE order
  # within each seed.
  local queue_text queue
  queue_text=$(python3 - "${common[@]}" <<'PYTHON' 2>"$out/paper_prepare.log"
import sys
queue_out, sys.stdout = sys.stdout, sys.stderr  # only the queue goes to the shell
import os
from experiments import run_study
from experiments.studies import runner
from rdunet_jax.datasets import builder
order = os.environ.get(
    "PAPER_QUEUE",
    "ablation:rdunet ablation:unet ablation:resdunet split_leakage:blocks dilation:decreasing "
    "dilation:increasing dilation:rate1 ablation:residual_se ablation:residual",
).split()
plans = {}
for study_name in dict.fromkeys(item.split(":")[0] for item in order):
    args = run_study.parse_args([study_name, *sys.argv[1:]])
    study, dataset, budget, base, specs, tag = run_study.prepare_study(args)
    plans[study_name] = (study, specs, tag, budget)
    results_root = args.results_root
prepared = set()
for study, specs, tag, budget in plans.values():
    for spec in specs:
        if spec.config.data.split_scheme not in prepared:
            builder.prepare(spec.config.data)
            prepared.add(spec.config.data.split_scheme)
seeds = next(iter(plans.values()))[3].seeds
for seed in seeds:
    for item in order:
        study_name, arm = item.split(":")
        study, specs, tag, budget = plans[study_name]
        spec = next(s for s in specs if s.arm == arm and s.replicate.seed == seed)
        status, _ = runner.run_status(spec, f"{results_root}/{study_name}/{tag}", results_root)
        if status == "pending":
            print(study_name, arm, seed, file=queue_out)
PYTHON
  ) || {
    echo "paper: preparing failed (paper_prepare.log):"
    tail -n 3 "$out/paper_prepare.log"
    return 1
  }
  mapfile -t queue <<<"$queue_text"
  [[ -z ${queue[0]} ]] && queue=()
  echo "paper: ${#queue[@]} runs pending, $(left) s left: ${queue[*]/%/;}"
  [[ " ${common[*]} " == *" dtype=bfloat16 "* ]] || export JAX_DEFAULT_MATMUL_PRECISION=highest
  if [[ ${PAPER_MPS-} == 1 ]] && nvidia-cuda-mps-control -d; then
    echo "paper: CUDA MPS daemon started"
  fi
  local labels=() commands=() study arm seed item
  for item in "${queue[@]}"; do
    read -r study arm seed <<<"$item"
    labels+=("$study $arm seed $seed")
    commands+=("$(printf '%q ' python3 -m experiments.run_study "$study" "${common[@]}" --arms "$arm" \
      --seeds "$seed")>$(printf '%q' "$out/paper_${study}_${arm}_seed$seed.log") 2>&1")
  done
  run_pool labels commands "$concurrency" "$min_start" "$margin" paper
  unset JAX_DEFAULT_MATMUL_PRECISION
  [[ ${PAPER_MPS-} == 1 ]] && echo quit | nvidia-cuda-mps-control 2>/dev/null
  # Records other studies can reuse (split_leakage's random arm is ablation's rdunet; dilation's paper,
  # residual_se and resdunet arms are ablation's) are copied, and every table rewritten, training nothing.
  (($(left) > 8)) && timeout "$(($(left) - 3))" python3 -c "import sys
from experiments import run_study
for study in ('ablation', 'split_leakage', 'dilation'):
    run_study.main([study, *sys.argv[1:], '--max_runs', '0'])" "${common[@]}" >"$out/paper_tables.log" 2>&1
  tar czf "$out/runs.tgz" --exclude=checkpoints --exclude=tensorboard "$runs_root" 2>/dev/null
  grep -h "left; tables in" "$out/paper_tables.log" 2>/dev/null
  if grep -q "left; tables in" "$out/paper_tables.log" 2>/dev/null &&
    ! grep -h "left; tables in" "$out/paper_tables.log" | grep -qv " 0 left;"; then
    echo "paper: every run of the three studies is recorded"
  else
    echo "paper: to continue (unfinished runs resume from their checkpoints on this warm machine; a fresh"
    echo "one needs both data calls again and restarts them), with the same carry:"
    echo "  PHASES=paper PAPER_BUDGET=$budget PAPER_SETS=\"${PAPER_SETS-dtype=bfloat16 num_epochs=80}\"" \
      "bash experiments/gpu_session.sh \$OUT $data_root $seconds"
  fi
}

cv() {
  local runs_file=${CV_RUNS:-experiments/multiclass_cv_runs.txt} root=${CV_ROOT:-/dev/shm/cv}
  local concurrency=${CV_CONCURRENCY:-10} min_start=${CV_MIN_START:-150} margin=${CV_STOP_MARGIN:-25}
  local data_dir=/tmp/cv_tfds lines=() line candidate fold config extra
  # About 11 MB a checkpoint, three kept per run: fall back to the disk where memory is short.
  if ! mkdir -p "$root" || (($(df --output=avail -B1M "$root" | tail -n 1) < 4096)); then
    root=/tmp/cv
    mkdir -p "$root"
  fi
  echo "cv: workdirs in $root"
  mapfile -t lines < <(grep -v '^#' "$runs_file" | grep .)
  if ((${#lines[@]} == 0)); then
    echo "cv: no runs in $runs_file"
    return 1
  fi
  local common=(--config.data.manual_dir="$data_root/covid-semiseg" --config.data.data_dir="$data_dir"
    --config.data.cv_folds=5 --config.eval.split=validation
    --config.checkpoint_every_epochs="${CV_CHECKPOINT_EVERY_EPOCHS:-50}")
  # The prepared datasets are built once, before the processes that read them start.
  python3 -m experiments.prepare_cv "$runs_file" "$data_root" "$data_dir" >"$out/cv_prepare.log" 2>&1 || {
    echo "cv: preparing failed:"
    tail -n 3 "$out/cv_prepare.log"
    return 1
  }
  echo "cv: ${#lines[@]} runs, datasets prepared, $(left) s left"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 >"$out/smi.log" 2>&1 &
  local smi=$!
  export JAX_DEFAULT_MATMUL_PRECISION=highest
  local labels=() commands=() words=()
  for line in "${lines[@]}"; do
    # candidate, fold, config, then the run's --config overrides, one word each (never glob-expanded)
    read -ra words <<<"${line//\{data_root\}/"$data_root"}"
    candidate=${words[0]} fold=${words[1]} config=${words[2]}
    labels+=("$candidate fold $fold")
    commands+=("$(printf '%q ' python3 -m rdunet_jax.main --config "$config" --workdir "$root/$candidate-cv$fold" \
      "${common[@]}" --config.data.cv_fold="$fold" "${words[@]:3}")>$(printf '%q' "$out/cv_${candidate}_$fold.log") 2>&1")
  done
  run_pool labels commands "$concurrency" "$min_start" "$margin" cv
  unset JAX_DEFAULT_MATMUL_PRECISION
  kill "$smi" 2>/dev/null
  # Pseudo-label masks and weight maps stay behind (1,600 of each a run): summary.json comes back.
  tar czf "$out/cv_runs.tgz" -C "$root" --exclude=checkpoints --exclude=tensorboard --exclude=overlays \
    --exclude=masks --exclude=confidence .
}

for phase in ${PHASES:-breakdown benchmark studies}; do
  "$phase"
done
tar czf "$out/results.tgz" "$results_root"
# The logs as one archive (the tool brings back at most 8 files).
(cd "$out" && tar czf logs.tgz ./*.log && rm -f ./*.log)
ls -la "$out"
