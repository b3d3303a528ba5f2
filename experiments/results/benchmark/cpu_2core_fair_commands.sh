# The final CPU comparison with PyTorch (issue 23, item 10), each framework alone in a fresh process,
# alternating: run from the main checkout on a QUIET machine (`uptime` load below 1, nothing else
# running; the load before each child is recorded in the JSON). PyTorch in its own environment:
#   python3 -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy
# Expected wall time on the 2-core Zen 4, quiet: about 11 + 6 + 10 + 6 = 33 minutes.
set -eu
F="python -m experiments.fair_benchmark --torch_python /work/torchenv/bin/python"
R=experiments/results/benchmark
uptime
# 1. float32 train step against PyTorch channels-last float32 and channels-last bf16 autocast (~11 min).
$F --image_size 256 --batch_size 8 --steps 6 --rounds 7 --torch_variants cl,clbf16 \
    --json $R/cpu_2core_fair_f32.json --markdown $R/cpu_2core_fair_f32.md
# 2. JAX bfloat16 train step against PyTorch's channels-last bf16 autocast (~6 min).
$F --image_size 256 --batch_size 8 --steps 6 --rounds 5 --torch_variants clbf16 --set model.dtype=bfloat16 \
    --json $R/cpu_2core_fair_bf16.json --markdown $R/cpu_2core_fair_bf16.md
# 3. What a living JAX process costs a PyTorch child (the former in-process method's situation, ~10 min).
$F --image_size 256 --batch_size 8 --steps 6 --rounds 3 --torch_variants cl --probe_living_parent \
    --json $R/cpu_2core_fair_living_parent.json --markdown $R/cpu_2core_fair_living_parent.md
# 4. Inference, ONNX Runtime (the README's eval.runtime=onnxruntime) against PyTorch, batch 16 (~6 min).
$F --what infer --image_size 256 --batch_size 16 --steps 9 --rounds 5 --torch_variants cl,clbf16 \
    --set eval.runtime=onnxruntime --json $R/cpu_2core_fair_infer.json --markdown $R/cpu_2core_fair_infer.md
uptime
