"""Speed and memory of the RDU-net on this machine: the train step, inference, start-up and the pipeline.

    python -m experiments.benchmark --image_size 256 --batch_size 8 --json OUT.json
    python -m experiments.benchmark --image_size 128 256 --json OUT.json        # both sizes
    python -m experiments.benchmark --image_size 256 --set model.dtype=bfloat16  # any config key

Prints one markdown table row per image size and saves JSON with, per size:

- `train_step_s`: median seconds of a jit-compiled train step (after warm-up); `train_images_per_s`.
- `infer_ms_per_slice`: median milliseconds per slice of the eval forward pass at `--infer_batch_size`.
- `infer_ms_per_slice_onnxruntime` (with the `onnx` extra): the same weights exported to ONNX and run by
  ONNX Runtime (`eval.runtime='onnxruntime'`), timed alternately with XLA's batches;
  `infer_ratio_onnxruntime_vs_jax` (median of per-batch ratios) and the largest probability difference.
- `compile_s`: compiling the train step with the persistent cache off.
- `first_step_s_cold`, `first_step_s_warm`: from process start to the moment the first train step
  begins in a fresh child process (imports, config, data, model, compile), with an empty persistent
  compilation cache and then with the cache the first child filled (`startup_phases_s_*` break it down).
- `peak_rss_mb`: the peak resident memory of the warm child, which trains a few steps and nothing else.
- `pipeline_images_per_s`: the Grain training pipeline (resize, flips, zoom, batching) over the phantom
  or the real data named by `--data.name`/`--data.manual_dir`.
- `gflops_per_s`: XLA's cost analysis of the compiled train step (FLOPs) over `train_step_s`.

Against PyTorch's reference: `python -m experiments.fair_benchmark`, which runs each framework alone in
a fresh process. (This script used to start PyTorch as a child of its own living process, whose ratio did not
match what a user measures with each framework on its own.)
The machine may be shared: compare only figures taken side by side in one run.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import common

PROCESS_START = time.time()

REQUIRED_KEYS = (
    "train_step_s",
    "train_images_per_s",
    "infer_ms_per_slice",
    "compile_s",
    "first_step_s_cold",
    "first_step_s_warm",
    "peak_rss_mb",
    "pipeline_images_per_s",
    "gflops_per_s",
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (model.* and data.* overrides are typed from the config's defaults)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--image_size", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--infer_batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps (after one warm-up)")
    parser.add_argument("--infer_steps", type=int, default=5, help="timed inference batches")
    parser.add_argument("--pipeline_batches", type=int, default=20)
    parser.add_argument("--startup_steps", type=int, default=3, help="train steps of each start-up child")
    parser.add_argument("--variant", default="rdunet", help="one of the paper's model variants")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.dtype=bfloat16 or model.features=4 (repeatable)",
    )
    parser.add_argument("--skip_startup", action="store_true", help="no cold/warm child processes")
    parser.add_argument("--no_onnxruntime", action="store_true", help="no ONNX Runtime inference figure")
    parser.add_argument("--xla_flags", default=None, help="XLA_FLAGS for this run and its children")
    parser.add_argument("--json", default="", help="where to save the JSON")
    parser.add_argument("--markdown", default="", help="where to save the markdown table")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- config and state ------------------------------------------------------------------------------


def make_config(args, image_size: int):
    """The benchmarked config: the paper's variant at `image_size`, with `--set` overrides."""
    from rdunet_jax import config_lib, config_validation

    config = config_lib.apply_model_variant(config_lib.base_config(), args.variant)
    config.batch_size = args.batch_size
    config.data.image_size = image_size
    config.data.num_train = max(config.data.num_train, args.batch_size * args.pipeline_batches)
    config.data.data_dir = str(pathlib.Path("~/.cache/rdunet_jax/benchmark_tfds").expanduser())
    common.apply_set_items(config, args.set)
    config_validation.validate(config)
    return config


# --- measurements in this process ------------------------------------------------------------------


def compiled_train_step(config, model, batch):
    """(compiled train step, state, compile seconds, XLA FLOPs per step) with the persistent cache off."""
    import jax

    from rdunet_jax import steps

    jax.config.update("jax_enable_compilation_cache", False)
    state = steps.create_train_state(config, model, steps_per_epoch=20)
    started = time.perf_counter()
    compiled = steps.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    jax.config.update("jax_enable_compilation_cache", True)
    return compiled, state, compile_s, xla_flops(compiled)


def xla_flops(compiled) -> float:
    """FLOPs of a compiled computation by XLA's cost analysis (0 when the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


class TrainTimer:
    """Repeatable blocks of timed train steps on one compiled step (state carried across blocks)."""

    def __init__(self, compiled, state, batch):
        import jax

        self.compiled, self.state = compiled, state
        self.batch = jax.device_put(batch)
        self.times: list[float] = []
        self.run(1, record=False)  # warm-up: first-call allocations

    def run(self, steps: int, record: bool = True) -> None:
        import jax

        for _ in range(steps):
            started = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready(metrics)
            if record:
                self.times.append(time.perf_counter() - started)
        self.loss = float(metrics["loss"])


def measure_inference(config, model, args, image_size: int) -> dict:
    """Median ms/slice of the eval forward pass (running BatchNorm statistics, sigmoid) and its FLOP/s;
    with onnxruntime installed, also of the same weights exported to ONNX (`eval.runtime='onnxruntime'`),
    timed alternately with XLA's batches so both see the same load."""
    import jax
    import numpy as np

    from rdunet_jax import models

    variables = models.initialize_variables(model, image_size, config.seed)
    host_images = common.random_batch(args.infer_batch_size, image_size)["image"]
    images = jax.device_put(host_images)
    compiled, arguments = compiled_inference(model, variables, images)
    jax.block_until_ready(compiled(*arguments))
    runtime = None if args.no_onnxruntime else onnxruntime_model(config, model, variables, image_size)
    jax_times, runtime_times = [], []
    for _ in range(args.infer_steps):
        started = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        jax_times.append(time.perf_counter() - started)
        if runtime is not None:
            started = time.perf_counter()
            runtime.probabilities(host_images)
            runtime_times.append(time.perf_counter() - started)
    seconds = statistics.median(jax_times)
    result = {
        "infer_ms_per_slice": 1e3 * seconds / args.infer_batch_size,
        "infer_batch_size": args.infer_batch_size,
        "infer_gflops_per_s": xla_flops(compiled) / seconds / 1e9,
    }
    if runtime is not None:
        probabilities = np.asarray(compiled(*arguments)["probabilities"])
        result.update(
            infer_ms_per_slice_onnxruntime=1e3 * statistics.median(runtime_times) / args.infer_batch_size,
            infer_ratio_onnxruntime_vs_jax=statistics.median(
                ours / theirs for ours, theirs in zip(runtime_times, jax_times, strict=True)
            ),
            infer_onnxruntime_max_probability_difference=float(
                np.max(np.abs(runtime.probabilities(host_images) - probabilities))
            ),
        )
    if config.model.dtype != "float32":
        result.update(accuracy_against_float32(config, model, variables, args))
    return result


def compiled_inference(model, variables, images):
    """(executable, its arguments): `steps.eval_step` (running BatchNorm statistics, sigmoid, loss) of
    `model` with `variables` on `images`, compiled as evaluation compiles it."""
    import jax.numpy as jnp

    from rdunet_jax import inference, steps

    state = inference.JaxPredictor.from_variables(model, variables).state
    arguments = (state, {"image": images, "mask": jnp.zeros_like(images)})
    return steps.eval_step.lower(*arguments).compile(), arguments


def onnxruntime_model(config, model, variables, image_size: int):
    """The model exported to ONNX in an ONNX Runtime session, or None without the `onnx` extra."""
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        return None
    from rdunet_jax import onnx_export, onnx_runtime

    return onnx_runtime.OnnxRuntimePredictor(onnx_export.export_model(model, variables, image_size), step=0)


def accuracy_against_float32(config, model, variables, args) -> dict:
    """How far this mode's masks are from the float32 reference model's on the same slices and weights:
    the Dice of the two thresholded masks (1.0: identical) and the largest probability difference."""
    import jax
    import numpy as np

    from rdunet_jax import models

    reference_config = config.model.copy_and_resolve_references()
    reference_config.update(dtype="float32")
    reference = models.build_model(reference_config)
    images, _ = common.first_slices(config, config.data.train_split, args.infer_batch_size)
    got = np.asarray(jax.nn.sigmoid(model.apply(variables, images, train=False)))
    want = np.asarray(jax.nn.sigmoid(reference.apply(variables, images, train=False)))
    masks, reference_masks = got > 0.5, want > 0.5
    overlap = 2 * np.sum(masks & reference_masks)
    total = np.sum(masks) + np.sum(reference_masks)
    return {
        "infer_dice_vs_float32": float(overlap / total) if total else 1.0,
        "infer_max_probability_difference": float(np.max(np.abs(got - want))),
    }


def measure_pipeline(config, args) -> dict:
    """Images/s of the Grain training pipeline (preprocessing, augmentation, batching, prefetch)."""
    from rdunet_jax import datasets, input_pipeline

    source = datasets.load_source(config.data, config.data.train_split)
    batch_size = min(config.batch_size, len(source))
    dataset = input_pipeline.train_dataset(source, config.data, batch_size, config.seed, epoch=0)
    batches = min(args.pipeline_batches, len(dataset))
    # Timed from the iterator's creation (thread start-up included), over more batches than it prefetches.
    started = time.perf_counter()
    iterator = input_pipeline.to_iterator(dataset)
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - started
    images_per_s = batches * batch_size / max(seconds, 1e-9)
    return {"pipeline_images_per_s": images_per_s, "data": config.data.name}


# --- start-up, in child processes ------------------------------------------------------------------


def child_first_step(args) -> None:
    """Runs as a fresh process: the path of a real run up to its first train steps, then reports."""
    payload = json.loads(args._child)
    phases = {}
    from rdunet_jax import (
        compile_cache,
        config_validation,
        datasets,
        devices,
        input_pipeline,
        models,
        steps,
    )

    phases["imports"] = time.time()
    config = make_config(args, payload["image_size"])
    config.compilation_cache_dir = payload["cache_dir"]
    config_validation.validate(config)
    devices.enable_compilation_cache(config.compilation_cache_dir)
    model = models.build_model(config.model)
    source = datasets.load_source(config.data, config.data.train_split)
    dataset = input_pipeline.train_dataset(source, config.data, config.batch_size, config.seed, epoch=0)
    iterator = input_pipeline.to_iterator(dataset)
    mesh = devices.data_parallel_mesh()
    batch = devices.shard_batch(next(iterator), mesh)
    phases["data"] = time.time()
    state = steps.create_train_state(config, model, steps_per_epoch=len(dataset))
    phases["model"] = time.time()
    rss_before_training = common.peak_rss_mb()
    # As a run gets it: compiled (cold) or loaded from the executable cache (warm) before the first step.
    step = compile_cache.compiled_train_step(config, state, batch, len(dataset), mesh)
    first_step_at = time.time()
    phases["compile"] = first_step_at
    state, metrics = step(state, batch)
    float(metrics["loss"])
    phases["first_step_done"] = time.time()
    for _ in range(args.startup_steps - 1):
        state, metrics = step(state, devices.shard_batch(next(iterator), mesh))
    float(metrics["loss"])
    print(
        "CHILD "
        + json.dumps(
            {
                "first_step_at": first_step_at,
                "phases_at": phases,
                "peak_rss_mb": common.peak_rss_mb(),
                "rss_before_training_mb": rss_before_training,
            }
        ),
        flush=True,
    )


def run_child(args, image_size: int, cache_dir: str) -> dict:
    """Starts a fresh benchmark process for the first steps; returns its report and start-up seconds."""
    payload = json.dumps({"image_size": image_size, "cache_dir": cache_dir})
    command = [*common.module_command("benchmark"), "--_child", payload, "--batch_size", str(args.batch_size)]
    command += ["--variant", args.variant, "--startup_steps", str(args.startup_steps)]
    command += ["--pipeline_batches", str(args.pipeline_batches)]
    for item in args.set:
        command += ["--set", item]
    spawned_at = time.time()
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=common.child_environment()
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("CHILD ")]
    if completed.returncode or not lines:
        raise RuntimeError(f"start-up child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    report = json.loads(lines[-1][len("CHILD ") :])
    report["first_step_s"] = report.pop("first_step_at") - spawned_at
    # Seconds after the spawn at which each phase ended: imports, data, model, compile (the first step
    # begins), first_step_done.
    report["phases_s"] = {name: at - spawned_at for name, at in report.pop("phases_at").items()}
    return report


def measure_startup(args, image_size: int) -> dict:
    """First-step times with an empty and then a warm persistent cache, and the warm child's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="rdunet_bench_cache_") as cache_dir:
        cold = run_child(args, image_size, cache_dir)
        warm = run_child(args, image_size, cache_dir)
    return {
        "first_step_s_cold": cold["first_step_s"],
        "first_step_s_warm": warm["first_step_s"],
        "peak_rss_mb": warm["peak_rss_mb"],
        "peak_rss_mb_cold": cold["peak_rss_mb"],
        "rss_before_training_mb": warm["rss_before_training_mb"],
        "startup_phases_s_cold": cold["phases_s"],
        "startup_phases_s_warm": warm["phases_s"],
    }


# --- one image size --------------------------------------------------------------------------------


def benchmark_size(args, image_size: int) -> dict:
    """Every figure for one image size (see the module docstring)."""
    from rdunet_jax import config_lib, models

    config = make_config(args, image_size)
    model = models.build_model(config.model)
    batch = common.random_batch(args.batch_size, image_size)
    compiled, state, compile_s, flops = compiled_train_step(config, model, batch)
    timer = TrainTimer(compiled, state, batch)
    timer.run(args.steps)
    train_step_s = statistics.median(timer.times)
    result = {
        "image_size": image_size,
        "batch_size": args.batch_size,
        "model": {
            key: config.model[key]
            for key in ("variant", "features", "depth", "dtype", *config_lib.SPEED_OPTIONS)
        },
        "mode": common.mode_name(config.model),
        "parameters": models.count_parameters(state.params),
        "train_step_s": train_step_s,
        "train_step_s_all": timer.times,
        "train_images_per_s": args.batch_size / train_step_s,
        "final_loss": timer.loss,
        "compile_s": compile_s,
        "train_gflop": flops / 1e9,
        "gflops_per_s": flops / train_step_s / 1e9,
    }
    del timer, compiled, state  # free the training buffers before inference
    result.update(measure_inference(config, model, args, image_size))
    result.update(measure_pipeline(config, args))
    if args.skip_startup:
        result.update(first_step_s_cold=None, first_step_s_warm=None, peak_rss_mb=None)
    else:
        result.update(measure_startup(args, image_size))
    return result


# --- report ----------------------------------------------------------------------------------------


def markdown_table(results: list[dict]) -> str:
    """One row per image size."""
    cell = common.format_cell
    header = (
        "| px | batch | mode | train step (s) | train img/s | GFLOP/s | infer ms/slice "
        "| ONNX Runtime infer ms/slice | compile (s) | first step cold (s) | first step warm (s) "
        "| peak RSS (MB) | pipeline img/s |"
    )
    lines = [header, "|" + "---|" * 13]
    for row in results:
        lines.append(
            f"| {row['image_size']} | {row['batch_size']} | {row['mode']} "
            f"| {cell(row['train_step_s'], 3)} | {cell(row['train_images_per_s'], 2)} "
            f"| {cell(row['gflops_per_s'], 1)} | {cell(row['infer_ms_per_slice'], 1)} "
            f"| {cell(row.get('infer_ms_per_slice_onnxruntime'), 1)} | {cell(row['compile_s'], 1)} "
            f"| {cell(row['first_step_s_cold'], 1)} | {cell(row['first_step_s_warm'], 1)} "
            f"| {cell(row['peak_rss_mb'], 0)} | {cell(row['pipeline_images_per_s'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags  # before jax starts its backend; children inherit it
    if args._child:
        child_first_step(args)
        return {}
    results = [benchmark_size(args, size) for size in args.image_size]
    report = dict(results[-1])
    report["by_image_size"] = {str(row["image_size"]): row for row in results}
    report["environment"] = common.environment()
    report["command"] = " ".join([pathlib.Path(sys.executable).name, *sys.argv])
    common.print_and_save(report, markdown_table(results), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
