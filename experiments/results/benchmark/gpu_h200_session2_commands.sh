# The exact commands of the second H200 session (2026-11-29), run from the repository root with
# .whl/ carried (see experiments/README.md "On a GPU"); OUT is the device tool's output folder.
# Part 1 (one call, 380 s): the checked benchmark with the fix, the per-block A/B, two timing A/Bs
# (the last two reached their time limits while compiling and left no figures).
set -u; T0=$(date +%s); L=$OUT/all.log; el() { echo "$1 exit $2 at $(( $(date +%s)-T0 )) s" | tee -a $L; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
python3 -c "import jax,flax,grain,ml_collections,tensorflow_datasets;print(jax.__version__,flax.__version__,jax.devices())" >> $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
G=experiments/gpu_benchmark.py
timeout 220 python3 $G --dtypes bfloat16 float32 --batch_sizes 8 128 --infer_batch_sizes 128 --steps 10 --set dilation_impl=space_to_batch --json $OUT/after.json >> $L 2>&1; el after $?
timeout 80 python3 experiments/step_breakdown.py --dtypes bfloat16 float32 --blocks conv3x3_rate1 conv3x3_rate3 conv3x3_rate3_space_to_batch max_pool_reduce_window max_pool_reshape --json $OUT/breakdown.json >> $L 2>&1; el breakdown $?
timeout 60 python3 $G --no_check --dtypes bfloat16 --batch_sizes 128 --infer_batch_sizes 128 --steps 10 --set dilation_impl=space_to_batch --set pool_impl=reshape --json $OUT/after_reshape.json >> $L 2>&1; el after_reshape $?
timeout 70 python3 $G --no_check --dtypes bfloat16 --batch_sizes 128 --infer_batch_sizes 128 --steps 10 --json $OUT/before.json >> $L 2>&1; el before $?
grep -v -i "delay kernel\|sub-optimal" $L | tail -n 60

# Part 2 (a second call on the same warm machine, 204 s): float32 timings (checked in part 1) and
# bfloat16 at batch 256 (its compile outlasted the limit).
G=experiments/gpu_benchmark.py
timeout 150 python3 $G --no_check --dtypes float32 --batch_sizes 8 128 --infer_batch_sizes 128 --steps 10 --set dilation_impl=space_to_batch --json $OUT/after_f32.json >> $L 2>&1; el after_f32 $?
timeout 125 python3 $G --no_check --dtypes bfloat16 --batch_sizes 256 --infer_batch_sizes 256 --steps 10 --set dilation_impl=space_to_batch --set pool_impl=reshape --json $OUT/after_bf16_256.json >> $L 2>&1; el after_bf16_256 $?
grep -v -i "delay kernel\|sub-optimal" $L | tail -n 40
