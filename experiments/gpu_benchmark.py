"""Train images/s and inference slices/s of the RDU-net on an accelerator, in float32 and bfloat16.

    python -m experiments.gpu_benchmark --json experiments/results/gpu_<card>.json
    python -m experiments.gpu_benchmark --smoke          # seconds on a CPU: checks the script runs

For each compute mode and batch size: the median train step (the project's `steps.train_step`, jitted,
after warm-up) as images/s, and the median eval forward pass as slices/s, at 256x256 by default. Modes:
`float32` (float32 numerics: matmul/conv precision 'highest'), `tf32` (float32 parameters and activations,
XLA's default precision, which on Ampere and later GPUs multiplies in TensorFloat-32) and `bfloat16`
(model.dtype: bfloat16 compute, float32 parameters). Before timing, each mode's outputs are checked
against a CPU float32 reference on the same variables and batch: the eval logits and the first train
step's loss (tolerances looser for tf32 and bfloat16). The paper's schedule (350 epochs of 2,728 images)
in 10 minutes needs 1,600 train images/s.

Needs this package's dependencies; a GPU image without grain, tfds or ml_collections gets them as wheels
(experiments/gpu_session.sh shows how).
"""

import argparse
import json
import time

import jax
import numpy as np

from experiments import common
from rdunet_jax import config_lib, config_validation, inference, models, steps

PAPER_IMAGES_PER_10_MINUTES = 350 * 2728 / 600  # 1,591 train images/s
# Largest |logit difference| allowed against the CPU float32 reference, relative to the largest |logit|.
LOGIT_TOLERANCE = {"float32": 1e-3, "tf32": 2e-2, "bfloat16": 5e-2}
LOSS_TOLERANCE = {"float32": 1e-4, "tf32": 2e-3, "bfloat16": 2e-2}
# Compute mode -> (model.dtype, jax matmul/convolution precision).
MODES = {
    "float32": ("float32", "highest"),
    "tf32": ("float32", "default"),
    "bfloat16": ("bfloat16", "default"),
}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--infer_batch_sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(MODES), default=["float32", "tf32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model.* override")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 32 px, a few steps (any device)")
    parser.add_argument(
        "--no_check", action="store_true", help="skip the CPU reference check (timing A/B runs only)"
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_sizes, args.infer_batch_sizes, args.steps = 32, [2], [4], 2
        args.set = ["features=4", "depth=2", "skip_dilation_rates=[[1,2,1],[1,2]]", *args.set]
    return args


def make_config(args, dtype: str, batch_size: int):
    """The paper's RDU-net config at `args.image_size`, with `dtype` and any `--set model.*` overrides."""
    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.batch_size = batch_size
    config.data.image_size = args.image_size
    config.model.dtype = MODES[dtype][0]
    # `--set` names model keys, with or without the "model." prefix.
    common.apply_set_items(config, [f"model.{item.removeprefix('model.')}" for item in args.set])
    config_validation.validate(config)
    return config


def eval_logits(model, variables, images, device):
    """The eval-mode logits computed on `device`."""
    variables, images = jax.device_put((variables, images), device)
    return np.asarray(inference.JaxPredictor.from_variables(model, variables).logits(images))


def first_step_loss(config, model, batch, device) -> float:
    """The loss of the first train step from the seeded initial state, computed on `device`."""
    with jax.default_device(device):
        state = steps.create_train_state(config, model, steps_per_epoch=10)
        state, batch = jax.device_put((state, batch), device)
        _, metrics = steps.train_step(state, batch)
        return float(metrics["loss"])


def cpu_reference(args) -> tuple[np.ndarray, float]:
    """(eval logits, first-step loss) in float32 on the CPU, for the first batch size (computed once)."""
    cpu = jax.devices("cpu")[0]
    config = make_config(args, "float32", args.batch_sizes[0])
    # XLA's own dilated convolution: the reference for every `--set model.dilation_impl` form.
    config.model.dilation_impl = "xla"
    model = models.build_model(config.model)
    variables = models.initialize_variables(model, args.image_size, config.seed)
    batch = common.random_batch(args.batch_sizes[0], args.image_size)
    with jax.default_matmul_precision("highest"):
        return eval_logits(model, variables, batch["image"], cpu), first_step_loss(config, model, batch, cpu)


def check_against_cpu(args, dtype: str, accelerator, reference) -> dict:
    """This mode's logits and first loss on the accelerator against `cpu_reference`."""
    want, reference_loss = reference
    config = make_config(args, dtype, args.batch_sizes[0])
    model = models.build_model(config.model)
    reference_model = models.build_model(make_config(args, "float32", args.batch_sizes[0]).model)
    variables = models.initialize_variables(reference_model, args.image_size, config.seed)
    batch = common.random_batch(args.batch_sizes[0], args.image_size)
    got = eval_logits(model, variables, batch["image"], accelerator)
    logit_error = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))
    loss = first_step_loss(config, model, batch, accelerator)
    agreement = float(np.mean((got > 0) == (want > 0)))
    check = {
        "max_relative_logit_error": logit_error,
        "pixel_agreement": agreement,
        "first_loss": loss,
        "first_loss_cpu_float32": reference_loss,
        "passed": logit_error <= LOGIT_TOLERANCE[dtype]
        and abs(loss - reference_loss) <= LOSS_TOLERANCE[dtype],
    }
    print(f"check {dtype}: {check}", flush=True)
    return check


def train_images_per_s(args, dtype: str, batch_size: int, device) -> dict:
    """Median train-step time at one batch size, as images/s."""
    config = make_config(args, dtype, batch_size)
    model = models.build_model(config.model)
    with jax.default_device(device):
        state = jax.device_put(steps.create_train_state(config, model, steps_per_epoch=10), device)
        batch = jax.device_put(common.random_batch(batch_size, args.image_size), device)
        started = time.perf_counter()
        step = steps.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - started
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics)

        seconds, _ = common.median_seconds(run, args.steps, warmup=1)
    return {"step_s": seconds, "images_per_s": batch_size / seconds, "compile_s": compile_s}


def infer_slices_per_s(args, dtype: str, batch_size: int, device) -> dict:
    """Median eval forward pass (sigmoid probabilities) at one batch size, as slices/s."""
    config = make_config(args, dtype, batch_size)
    model = models.build_model(config.model)
    variables = jax.device_put(models.initialize_variables(model, args.image_size, config.seed), device)
    images = jax.device_put(common.random_batch(batch_size, args.image_size)["image"], device)
    forward = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)))
    seconds, _ = common.median_seconds(
        lambda: jax.block_until_ready(forward(variables, images)), args.steps, warmup=1
    )
    return {"batch_s": seconds, "slices_per_s": batch_size / seconds}


def peak_memory_gb(device) -> float | None:
    """The device allocator's peak bytes in use, where the backend reports it."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None


def markdown(report: dict) -> str:
    """Tables of train images/s and inference slices/s per dtype and batch size."""
    lines = [f"{report['device']} ({report['platform']}), {report['image_size']}x{report['image_size']}", ""]
    lines += [
        "| dtype | batch | train step (ms) | train img/s | paper schedule (min) |",
        "|---|---|---|---|---|",
    ]
    for row in report["train"]:
        minutes = 350 * 2728 / row["images_per_s"] / 60
        lines.append(
            f"| {row['dtype']} | {row['batch_size']} | {1e3 * row['step_s']:.1f} "
            f"| {row['images_per_s']:.0f} | {minutes:.1f} |"
        )
    lines += ["", "| dtype | batch | infer slices/s | check vs CPU f32 |", "|---|---|---|---|"]
    for row in report["infer"]:
        check = report["checks"].get(row["dtype"])
        verdict = "not checked"
        if check:
            verdict = "ok" if check["passed"] else "FAILED"
            verdict += f" (logit err {check['max_relative_logit_error']:.1e})"
        lines.append(f"| {row['dtype']} | {row['batch_size']} | {row['slices_per_s']:.0f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    report = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "image_size": args.image_size,
        "smoke": args.smoke,
        "overrides": args.set,
        "paper_schedule_images_per_s": PAPER_IMAGES_PER_10_MINUTES,
        "checks": {},
        "train": [],
        "infer": [],
    }
    reference = None if args.no_check else cpu_reference(args)
    for dtype in args.dtypes:
        with jax.default_matmul_precision(MODES[dtype][1]):
            if reference is not None:
                report["checks"][dtype] = check_against_cpu(args, dtype, device, reference)
            measurements = [("train", size, train_images_per_s) for size in args.batch_sizes]
            measurements += [("infer", size, infer_slices_per_s) for size in args.infer_batch_sizes]
            for kind, batch_size, measure in measurements:
                row = {"dtype": dtype, "batch_size": batch_size} | measure(args, dtype, batch_size, device)
                report[kind].append(row)
                print(json.dumps(row), flush=True)
                common.save_json(report, args.json)
    report["peak_memory_gb"] = peak_memory_gb(device)
    report["best_train_images_per_s"] = max(row["images_per_s"] for row in report["train"])
    report["meets_paper_schedule_in_10_minutes"] = (
        report["best_train_images_per_s"] >= PAPER_IMAGES_PER_10_MINUTES
    )
    report["markdown"] = markdown(report)
    print(report["markdown"], flush=True)
    common.save_json(report, args.json)
    if not all(check["passed"] for check in report["checks"].values()):
        raise SystemExit("outputs differ from the CPU float32 reference beyond tolerance (see 'checks')")
    return report


if __name__ == "__main__":
    main()
