"""Where a train step's time goes: each building block's forward and forward+backward, timed alone.

    python -m experiments.step_breakdown --image_size 256 --batch_size 8 --json OUT.json
    python -m experiments.step_breakdown --smoke             # a few seconds on any device

Times (median of `--steps` after one warm-up, in ms) at the shallowest level's shape (16 feature maps at
full resolution), where most of the step's memory traffic is: a 3x3 convolution at dilation rates 1 and
3 (and 3 in the `model.dilation_impl=space_to_batch` form), the 2x2 max-pooling in both
`model.pool_impl` forms, the 2x up-sampling in both `model.upsample_impl` forms, both dropout masks,
BatchNorm in both `model.batch_norm_impl` forms ("batch_norm" is `flax`), squeeze-and-excitation, and
the whole model's eval forward pass and train step (`--set model.KEY=VALUE` applies to those two). On the
GPU, the first session found the train step 20x slower than the forward pass (normally about 3x); this
names the block that makes it so.
`--blocks conv3x3_rate3 model` times only those.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import common
from experiments.gpu_benchmark import infer_slices_per_s, train_images_per_s
from rdunet_jax import layers, models


def median_ms(function, *arguments, steps: int) -> float:
    """Median milliseconds of the jitted `function(*arguments)` after a compiling warm-up call."""
    compiled = jax.jit(function)
    seconds, _ = common.median_seconds(lambda: jax.block_until_ready(compiled(*arguments)), steps, warmup=1)
    return 1e3 * seconds


def forward_and_backward(apply, parameters, x, steps: int) -> dict:
    """ms of `apply(parameters, x)` and of the gradient of its sum of squares wrt both arguments."""

    def loss(parameters, x):
        return jnp.sum(jnp.square(apply(parameters, x).astype(jnp.float32)))

    return {
        "forward_ms": median_ms(apply, parameters, x, steps=steps),
        "forward_backward_ms": median_ms(jax.grad(loss, argnums=(0, 1)), parameters, x, steps=steps),
    }


def module_timing(module, x, steps: int) -> dict:
    """`forward_and_backward` of a Flax module in training mode (batch statistics updated, dropout on)."""
    variables = module.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
    parameters, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def apply(parameters, x):
        output, _ = module.apply(
            {"params": parameters, **state}, x, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=list(state)
        )
        return output

    return forward_and_backward(apply, parameters, x, steps)


class _Conv(nn.Module):
    features: int
    dilation: int
    dtype: jnp.dtype
    dilation_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        conv = models.make_layers(False, self.dtype, dilation_impl=self.dilation_impl).conv
        return conv(self.features, (3, 3), kernel_dilation=self.dilation)(x)


class _Norm(nn.Module):
    dtype: jnp.dtype
    closed_form: bool = False

    @nn.compact
    def __call__(self, x):
        norm_class = layers.BatchNorm if self.closed_form else nn.BatchNorm
        return norm_class(use_running_average=False, dtype=self.dtype)(x)


BLOCK_NAMES = (
    "conv3x3_rate1",
    "conv3x3_rate3",
    "conv3x3_rate3_space_to_batch",
    "max_pool_reduce_window",
    "max_pool_reshape",
    "upsample_resize",
    "upsample_stencil",
    "dropout_mask_flax",
    "dropout_mask_bits",
    "batch_norm",
    "batch_norm_closed_form",
    "squeeze_excitation",
)


def blocks(args, dtype) -> dict:
    """Each block at (batch, size, size, 16), those named in `args.blocks` (all when empty)."""
    shape = (args.batch_size, args.image_size, args.image_size, 16)
    x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    half = x[:, ::2, ::2, :]
    key = jax.random.PRNGKey(3)
    none = {}
    timings = {
        "conv3x3_rate1": lambda: module_timing(_Conv(16, 1, dtype), x, args.steps),
        "conv3x3_rate3": lambda: module_timing(_Conv(16, 3, dtype), x, args.steps),
        "conv3x3_rate3_space_to_batch": lambda: module_timing(
            _Conv(16, 3, dtype, "space_to_batch"), x, args.steps
        ),
        "max_pool_reduce_window": lambda: forward_and_backward(
            lambda _, v: nn.max_pool(v, (2, 2), (2, 2)), none, x, args.steps
        ),
        "max_pool_reshape": lambda: forward_and_backward(
            lambda _, v: layers.max_pool_reshape(v), none, x, args.steps
        ),
        "upsample_resize": lambda: forward_and_backward(
            lambda _, v: layers.upsample_bilinear(v), none, half, args.steps
        ),
        "upsample_stencil": lambda: forward_and_backward(
            lambda _, v: layers.upsample_bilinear_stencil(v), none, half, args.steps
        ),
        "dropout_mask_flax": lambda: {
            "forward_ms": median_ms(lambda k: jax.random.bernoulli(k, 0.5, shape), key, steps=args.steps)
        },
        "dropout_mask_bits": lambda: {
            "forward_ms": median_ms(
                lambda k: layers.dropout_keep_mask(k, 0.5, shape)[0], key, steps=args.steps
            )
        },
        "batch_norm": lambda: module_timing(_Norm(dtype), x, args.steps),
        "batch_norm_closed_form": lambda: module_timing(_Norm(dtype, closed_form=True), x, args.steps),
        "squeeze_excitation": lambda: module_timing(models.SqueezeExcitation(8, dtype), x, args.steps),
    }
    assert tuple(timings) == BLOCK_NAMES
    return {name: timing() for name, timing in timings.items() if not args.blocks or name in args.blocks}


def whole_model(args, mode: str) -> dict:
    """The model's eval forward pass and the project's train step, as `gpu_benchmark` times them."""
    device = jax.devices()[0]
    forward = infer_slices_per_s(args, mode, args.batch_size, device)["batch_s"]
    step = train_images_per_s(args, mode, args.batch_size, device)["step_s"]
    return {"model_forward_ms": 1e3 * forward, "train_step_ms": 1e3 * step}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--blocks",
        nargs="*",
        default=[],
        choices=[*BLOCK_NAMES, "model"],
        help="time only these (all if none)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model.* override")
    parser.add_argument("--smoke", action="store_true", help="32 px, batch 2, tiny model")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.steps = 32, 2, 2
        args.set = ["features=4", "depth=2", "skip_dilation_rates=[[1,2,1],[1,2]]", *args.set]
    device = jax.devices()[0]
    report = {"device": f"{device.platform}:{device.device_kind}", "image_size": args.image_size}
    report |= {
        "batch_size": args.batch_size,
        "overrides": args.set,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "modes": {},
    }
    for mode in args.dtypes:
        dtype = jnp.dtype(mode)
        report["modes"][mode] = blocks(args, dtype)
        if not args.blocks or "model" in args.blocks:
            report["modes"][mode]["model"] = whole_model(args, mode)
        print(json.dumps({mode: report["modes"][mode]}), flush=True)
        common.save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
