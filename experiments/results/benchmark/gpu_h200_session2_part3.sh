# Part 3 of the second H200 session (2026-11-29): the config's default (model.dilation_impl=auto) on the
# card, bfloat16 at batch 128, 30 timed steps, to repeat part 1's figure with the default resolved there.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "from rdunet_jax import models; print('auto ->', models.resolve_dilation_impl('auto'))"
timeout 150 python3 experiments/gpu_benchmark.py --no_check --dtypes bfloat16 --batch_sizes 128 --infer_batch_sizes 128 \
  --steps 30 --json "$OUT/auto.json" 2>&1 | grep -v -i "delay kernel\|sub-optimal"
