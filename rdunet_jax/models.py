"""The Residual Dilated U-net family (Amer, Ye, Janan, 2021) as small Flax Linen blocks.

Every baseline of the paper is a configuration of `RDUNet`, not a separate class:

| paper model        | block      | use_se | skip_dilation_rates   | encoder_dilation_rates |
|--------------------|------------|--------|-----------------------|------------------------|
| U-net              | "plain"    | False  | ()                    | ()                     |
| U-net + residual   | "residual" | False  | ()                    | ()                     |
| + residual + SE    | "residual" | True   | ()                    | ()                     |
| RDU-net (ours)     | "residual" | True   | (1,2,3,3,2,1)x2, (1,2,2,1)x2 | ()              |
| ResDUNet           | "residual" | True   | ()                    | (4, 3, 2, 1, 1)        |

Arrays are NHWC; the network returns logits (the sigmoid is applied by the loss and by prediction).

Speed options (none changes the parameter tree, so checkpoints stay interchangeable):

- `dtype="bfloat16"` computes in bfloat16 with float32 parameters, float32 BatchNorm statistics and
  float32 logits.
- `upsample_impl`: "resize" (`jax.image.resize`) or "stencil" (the config default: the same 2x bilinear
  up-sampling as a fixed 0.75/0.25 stencil, equal to float tolerance, and its gradient is cheap too).
- `dropout_impl`: "flax" (`nn.Dropout`: one threefry draw per element) or "bits" (the config default: the
  same Bernoulli masks drawn from fewer random bits: one bit per element at rate 0.5, 16 otherwise; other
  masks than "flax" for the same key, same distribution).
- `remat`: recompute each block's activations in the backward pass instead of keeping them.
- `dilation_impl`: "xla" (`lax.conv_general_dilated` with a kernel dilation) or "space_to_batch" (the
  same dilated convolution as an undilated one over the input's rate x rate phases, as TensorFlow's
  `atrous_conv2d` does), equal to float tolerance; the config's "auto" picks "space_to_batch" on GPUs and
  "xla" elsewhere. On a GPU, XLA computes the kernel gradient of a dilated convolution as a strided
  convolution with an image-sized window, 30x slower than the phases' (H200: 14.4 against 0.45 ms for a
  16-channel 256x256 layer, batch 8, bfloat16); on a CPU the phases' transposes cost more than they save
  (2.8x slower).
- `pool_impl`: "reduce_window" (`nn.max_pool`, whose gradient is XLA's select-and-scatter) or "reshape"
  (the config default: the same 2x2 maximum as a reshape and a max, whose gradient is elementwise; it
  differs only where a window holds tied maxima, e.g. zeros after a ReLU, which share the gradient instead
  of the first taking it, and that gradient then meets the ReLU's zero derivative).
- `batch_norm_impl`: "flax" (`nn.BatchNorm`, its training gradient by differentiating the statistics'
  formulas) or "closed_form" (the config default: `BatchNorm`, the same variables, forward pass and
  evaluation arithmetic, with the textbook closed-form gradient as a custom VJP; equal to float tolerance,
  7.8% faster CPU train step, 207 MB fewer temporaries at 256 px). Being a custom VJP, it has first-order
  reverse-mode derivatives only: forward-mode (`jax.jvp`) and second-order ones (a gradient penalty) need
  "flax".
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PAPER_SKIP_DILATION_RATES = ((1, 2, 3, 3, 2, 1), (1, 2, 3, 3, 2, 1), (1, 2, 2, 1), (1, 2, 2, 1))
RESDUNET_ENCODER_DILATION_RATES = (4, 3, 2, 1, 1)


# PyTorch's default (0.1 in its convention). Keras' and Flax's 0.99 lets the running statistics lag
# hundreds of steps behind the weights, which spoils validation in short runs.
BATCH_NORM_MOMENTUM = 0.9


UPSAMPLE_IMPLS = ("resize", "stencil")
DROPOUT_IMPLS = ("flax", "bits")
POOL_IMPLS = ("reduce_window", "reshape")
DILATION_IMPLS = ("auto", "xla", "space_to_batch")
BATCH_NORM_IMPLS = ("flax", "closed_form")

# Every speed option, with what a config saved before the option existed ran with: its old form, not
# today's default (build_model, the study runner and the benchmark's mode names read this table).
KEYLESS_MODEL_OPTIONS = {
    "upsample_impl": "resize",
    "dropout_impl": "flax",
    "pool_impl": "reduce_window",
    "batch_norm_impl": "flax",
    "remat": False,
    "dilation_impl": "auto",
}


def resolve_dilation_impl(dilation_impl: str) -> str:
    """The config's `model.dilation_impl`, with "auto" made the fast form for the default backend."""
    if dilation_impl != "auto":
        return dilation_impl
    return "space_to_batch" if jax.default_backend() == "gpu" else "xla"


_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_plain_nhwc_dilation(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, kwargs) -> bool:
    """Whether a convolution is the 2-D, NHWC, stride-1 dilated kind that `conv_space_to_batch` rewrites."""
    if lhs.ndim != 4 or tuple(rhs_dilation or (1, 1)) == (1, 1) or kwargs.get("batch_group_count", 1) != 1:
        return False
    numbers = kwargs.get("dimension_numbers")
    if numbers is None or lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, numbers
    ) != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return False
    unit = (1, 1)
    negative_padding = not isinstance(padding, str) and any(side < 0 for pair in padding for side in pair)
    return tuple(window_strides) == unit and tuple(lhs_dilation or unit) == unit and not negative_padding


def conv_space_to_batch(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs):
    """An atrous convolution computed as an undilated one over the input's phases (space-to-batch)."""
    # Anything else (no dilation, strides, another layout) is left to XLA as it is.
    if not _is_plain_nhwc_dilation(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, kwargs):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, **kwargs
        )
    rate_h, rate_w = rhs_dilation
    batch, height, width, channels = lhs.shape
    kernel_h, kernel_w = rhs.shape[:2]
    if isinstance(padding, str):
        reach = ((kernel_h - 1) * rate_h + 1, (kernel_w - 1) * rate_w + 1)
        padding = lax.padtype_to_pads((height, width), reach, window_strides, padding)
    (top, bottom), (left, right) = padding
    padded_h, padded_w = height + top + bottom, width + left + right
    out_h, out_w = padded_h - (kernel_h - 1) * rate_h, padded_w - (kernel_w - 1) * rate_w
    # Round each padded axis up to a multiple of its rate, so that every phase has the same length.
    extra_h, extra_w = -padded_h % rate_h, -padded_w % rate_w
    x = jnp.pad(lhs, ((0, 0), (top, bottom + extra_h), (left, right + extra_w), (0, 0)))
    phase_h, phase_w = (padded_h + extra_h) // rate_h, (padded_w + extra_w) // rate_w
    x = x.reshape(batch, phase_h, rate_h, phase_w, rate_w, channels).transpose(2, 4, 0, 1, 3, 5)
    x = x.reshape(rate_h * rate_w * batch, phase_h, phase_w, channels)
    y = lax.conv_general_dilated(x, rhs, (1, 1), "VALID", **kwargs)
    features = y.shape[-1]
    phase_out_h, phase_out_w = y.shape[1:3]
    y = y.reshape(rate_h, rate_w, batch, phase_out_h, phase_out_w, features).transpose(2, 3, 0, 4, 1, 5)
    y = y.reshape(batch, phase_out_h * rate_h, phase_out_w * rate_w, features)
    return y[:, :out_h, :out_w, :]


def conv3x3(features: int, dilation_rate: int, dtype: Any, dilation_impl: str) -> nn.Conv:
    """The paper's 3x3 convolution (no bias: BatchNorm follows), dilated in `dilation_impl`'s form."""
    space_to_batch = resolve_dilation_impl(dilation_impl) == "space_to_batch"
    conv = conv_space_to_batch if space_to_batch else lax.conv_general_dilated
    return nn.Conv(
        features,
        (3, 3),
        kernel_dilation=dilation_rate,
        use_bias=False,
        dtype=dtype,
        conv_general_dilated=conv,
    )


@jax.custom_vjp
def batch_normalize(x, mean, inverse_std, scale, bias):
    """BatchNorm's affine normalisation, (x - mean) * inverse_std * scale + bias, whose gradient takes
    `mean` and `inverse_std` to be x's own batch statistics (Ioffe and Szegedy 2015, section 3)."""
    return (x - mean) * (inverse_std * scale) + bias


def _batch_normalize_forward(x, mean, inverse_std, scale, bias):
    return batch_normalize(x, mean, inverse_std, scale, bias), (x, mean, inverse_std, scale)


def _batch_normalize_backward(residuals, grad):
    # The closed form keeps only x for the backward pass and reads it twice; differentiating the
    # statistics' formulas instead kept more activation-sized arrays (8% of the CPU train step).
    x, mean, inverse_std, scale = residuals
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    normalized = (x - mean) * inverse_std
    grad_bias = jnp.sum(grad, axes)
    grad_scale = jnp.sum(grad * normalized, axes)
    grad_x = (scale * inverse_std / count) * (count * grad - grad_bias - normalized * grad_scale)
    # The statistics reach the caller through stop_gradient: their own cotangents are never used.
    return grad_x.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(inverse_std), grad_scale, grad_bias


batch_normalize.defvjp(_batch_normalize_forward, _batch_normalize_backward)


class BatchNorm(nn.Module):
    """Batch normalisation as `nn.BatchNorm` computes it (same variables, statistics and evaluation
    arithmetic), with the closed-form training gradient of `batch_normalize`."""

    use_running_average: bool
    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        if self.use_running_average:
            # nn.BatchNorm's operations in its order: checkpoints evaluate to the same bits either way.
            y = (x - running_mean.value) * (lax.rsqrt(running_var.value + self.epsilon) * scale) + bias
            return y.astype(self.dtype)
        statistics_input = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(statistics_input, axes)
        # nn.BatchNorm's one-pass variance, clipped at 0 against round-off.
        var = jnp.maximum(0.0, jnp.mean(jnp.square(statistics_input), axes) - jnp.square(mean))
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        inverse_std = lax.rsqrt(var + self.epsilon)
        y = batch_normalize(x, lax.stop_gradient(mean), lax.stop_gradient(inverse_std), scale, bias)
        return y.astype(self.dtype)


def _norm(train: bool, momentum: float, dtype: Any, impl: str) -> nn.Module:
    norm_class = BatchNorm if impl == "closed_form" else nn.BatchNorm
    return norm_class(use_running_average=not train, momentum=momentum, dtype=dtype)


def dropout_keep_mask(key, rate: float, shape) -> tuple[jax.Array, float]:
    """A Bernoulli(1 - rate) keep mask from few random bits, and the exact keep probability.

    At rate 0.5 each element takes one bit of a 32-bit draw (32 times fewer threefry evaluations than
    `jax.random.bernoulli`, which spends one per element); otherwise 16 bits, the keep probability
    rounded to a multiple of 1/65536 and returned so the rescaling keeps the expectation exact.
    """
    size = int(np.prod(shape))
    if rate == 0.5:
        words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
        bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        return bits.reshape(-1)[:size].reshape(shape).astype(bool), 0.5
    threshold = int(round((1.0 - rate) * 65536))
    words = jax.random.bits(key, (-(-size // 2),), jnp.uint32)
    halves = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
    return halves < threshold, threshold / 65536


class BitsDropout(nn.Module):
    """Inverted dropout like `nn.Dropout`, with masks from `dropout_keep_mask` (few random bits)."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep, keep_probability = dropout_keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(keep_probability, x.dtype), jnp.zeros((), x.dtype))


def _dropout(rate: float, train: bool, impl: str) -> nn.Module:
    if impl == "bits":
        return BitsDropout(rate, deterministic=not train)
    return nn.Dropout(rate, deterministic=not train)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): a learned per-channel gate from global context."""

    reduction: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        squeezed = jnp.mean(x, axis=(1, 2))
        hidden = nn.relu(nn.Dense(max(channels // self.reduction, 1), dtype=self.dtype)(squeezed))
        gates = nn.sigmoid(nn.Dense(channels, dtype=self.dtype)(hidden))
        return x * gates[:, None, None, :]


class DoubleConv(nn.Module):
    """conv3x3-BN-ReLU-dropout-conv3x3-BN: the body shared by the U-net and the residual block."""

    features: int
    dropout_rate: float = 0.5
    dilation_rate: int = 1
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM
    dtype: Any = jnp.float32
    dropout_impl: str = "flax"
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool):
        for index in range(2):
            if index:
                x = nn.relu(x)
                x = _dropout(self.dropout_rate, train, self.dropout_impl)(x)
            x = conv3x3(self.features, self.dilation_rate, self.dtype, self.dilation_impl)(x)
            x = _norm(train, self.batch_norm_momentum, self.dtype, self.batch_norm_impl)(x)
        return x


class ConvBlock(nn.Module):
    """The plain U-net block (Ronneberger et al. 2015): two 3x3 convolutions, no shortcut."""

    features: int
    dropout_rate: float = 0.5
    dilation_rate: int = 1
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM
    dtype: Any = jnp.float32
    dropout_impl: str = "flax"
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"

    def _body(self) -> DoubleConv:
        return DoubleConv(
            self.features,
            self.dropout_rate,
            self.dilation_rate,
            self.batch_norm_momentum,
            self.dtype,
            self.dropout_impl,
            self.dilation_impl,
            self.batch_norm_impl,
        )

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.relu(self._body()(x, train))


class ResidualBlock(ConvBlock):
    """The paper's residual block: DoubleConv plus an identity (or 1x1 conv+BN) shortcut, then ReLU."""

    @nn.compact
    def __call__(self, x, train: bool):
        body = self._body()(x, train)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype)(x)
            shortcut = _norm(train, self.batch_norm_momentum, self.dtype, self.batch_norm_impl)(shortcut)
        return nn.relu(body + shortcut)


class DilatedCascade(nn.Module):
    """The paper's DC module: cascaded 3x3 dilated conv-BN-ReLU on a skip, shape unchanged."""

    dilation_rates: Sequence[int]
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM
    dtype: Any = jnp.float32
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool):
        for rate in self.dilation_rates:
            x = conv3x3(x.shape[-1], rate, self.dtype, self.dilation_impl)(x)
            norm = _norm(train, self.batch_norm_momentum, self.dtype, self.batch_norm_impl)
            x = nn.relu(norm(x))
        return x


class EncoderDecoderBlock(nn.Module):
    """One U-net level's block: plain or residual, optionally followed by squeeze-and-excitation."""

    features: int
    block: str = "residual"
    use_se: bool = True
    se_reduction: int = 8
    dropout_rate: float = 0.5
    dilation_rate: int = 1
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM
    dtype: Any = jnp.float32
    dropout_impl: str = "flax"
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool):
        block_class = {"plain": ConvBlock, "residual": ResidualBlock}[self.block]
        x = block_class(
            self.features,
            self.dropout_rate,
            self.dilation_rate,
            self.batch_norm_momentum,
            self.dtype,
            self.dropout_impl,
            self.dilation_impl,
            self.batch_norm_impl,
        )(x, train)
        if self.use_se:
            x = SqueezeExcitation(self.se_reduction, self.dtype)(x)
        return x


def max_pool_reshape(x):
    """2x2 max-pooling, stride 2, as a reshape and a max (the U-net's down-sampling step)."""
    batch, height, width, channels = x.shape
    return jnp.max(x.reshape(batch, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


def upsample_bilinear(x):
    """2x bilinear up-sampling (half-pixel centres, as Keras' UpSampling2D and torch's default)."""
    batch, height, width, channels = x.shape
    return jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "bilinear")


def _upsample_axis_stencil(x, axis: int):
    """2x bilinear along one axis: output 2i is 0.75 x[i] + 0.25 x[i-1], 2i+1 is 0.75 x[i] + 0.25 x[i+1],
    with the edge pixel repeated (what half-pixel centres give at the borders)."""
    length = x.shape[axis]
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    last = lax.slice_in_dim(x, length - 1, length, axis=axis)
    previous = jnp.concatenate([first, lax.slice_in_dim(x, 0, length - 1, axis=axis)], axis=axis)
    following = jnp.concatenate([lax.slice_in_dim(x, 1, length, axis=axis), last], axis=axis)
    three_quarters = x * jnp.asarray(0.75, x.dtype)
    even = three_quarters + previous * jnp.asarray(0.25, x.dtype)
    odd = three_quarters + following * jnp.asarray(0.25, x.dtype)
    shape = list(x.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


# A named subprogram (XLA inlines it): the ONNX export finds it by name and writes one Resize operator.
@jax.jit
def upsample_bilinear_stencil(x):
    """`upsample_bilinear` as a fixed stencil of slices and adds (no resize weights; cheaper gradient)."""
    return _upsample_axis_stencil(_upsample_axis_stencil(x, 1), 2)


class RDUNet(nn.Module):
    """The Residual Dilated U-net and, by configuration, the paper's baselines (see module docstring).

    `depth` is the number of 2x down-samplings: feature maps go features, 2*features, ...,
    features * 2**depth at the bottom. `skip_dilation_rates` holds one schedule per skip, shallow to
    deep (an empty schedule, or an empty tuple for all, leaves that skip plain).
    `encoder_dilation_rates` holds one rate per encoder level (depth + 1 of them) for ResDUNet.
    """

    features: int = 16
    depth: int = 4
    block: str = "residual"
    use_se: bool = True
    se_reduction: int = 8
    skip_dilation_rates: Sequence[Sequence[int]] = PAPER_SKIP_DILATION_RATES
    encoder_dilation_rates: Sequence[int] = ()
    dropout_rate: float = 0.5
    batch_norm_momentum: float = BATCH_NORM_MOMENTUM
    num_classes: int = 1
    dtype: Any = jnp.float32
    upsample_impl: str = "resize"
    dropout_impl: str = "flax"
    remat: bool = False
    pool_impl: str = "reduce_window"
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"

    def _block(self, features, index: int, dilation_rate=1):
        # Explicit names: nn.remat's class is called CheckpointEncoderDecoderBlock, and the parameter
        # tree must not depend on the option.
        block_class = EncoderDecoderBlock
        if self.remat:
            block_class = nn.remat(EncoderDecoderBlock, static_argnums=(2,))  # `train` is static
        return block_class(
            features,
            self.block,
            self.use_se,
            self.se_reduction,
            self.dropout_rate,
            dilation_rate,
            self.batch_norm_momentum,
            self.dtype,
            self.dropout_impl,
            self.dilation_impl,
            self.batch_norm_impl,
            name=f"EncoderDecoderBlock_{index}",
        )

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = images.astype(self.dtype)
        encoder_rates = tuple(self.encoder_dilation_rates) or (1,) * (self.depth + 1)
        skip_rates = tuple(self.skip_dilation_rates) or ((),) * self.depth
        skips = []
        for level in range(self.depth + 1):
            if level:
                x = max_pool_reshape(x) if self.pool_impl == "reshape" else nn.max_pool(x, (2, 2), (2, 2))
            x = self._block(self.features * 2**level, level, encoder_rates[level])(x, train)
            skips.append(x)
        x = skips.pop()
        upsample = upsample_bilinear_stencil if self.upsample_impl == "stencil" else upsample_bilinear
        for level in reversed(range(self.depth)):
            skip = skips[level]
            if skip_rates[level]:
                skip = DilatedCascade(
                    tuple(skip_rates[level]),
                    self.batch_norm_momentum,
                    self.dtype,
                    self.dilation_impl,
                    self.batch_norm_impl,
                )(skip, train)
            x = jnp.concatenate([upsample(x), skip], axis=-1)
            x = self._block(self.features * 2**level, 2 * self.depth - level)(x, train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
        return logits.astype(jnp.float32)


def build_model(model_config) -> RDUNet:
    """Builds an `RDUNet` from a config's `model` section."""
    options = {key: model_config.get(key, old) for key, old in KEYLESS_MODEL_OPTIONS.items()}
    options["dilation_impl"] = resolve_dilation_impl(options["dilation_impl"])
    return RDUNet(
        features=model_config.features,
        depth=model_config.depth,
        block=model_config.block,
        use_se=model_config.use_se,
        se_reduction=model_config.se_reduction,
        skip_dilation_rates=tuple(tuple(rates) for rates in model_config.skip_dilation_rates),
        encoder_dilation_rates=tuple(model_config.encoder_dilation_rates),
        dropout_rate=model_config.dropout_rate,
        batch_norm_momentum=model_config.batch_norm_momentum,
        num_classes=1,
        dtype=jnp.dtype(model_config.dtype),
        **options,
    )


def count_parameters(params) -> int:
    """The number of trainable scalars (batch statistics are not parameters)."""
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def abstract_variables(model: RDUNet, image_size: int):
    """Shapes and dtypes of the model's variables, without running or compiling the initialisers."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


# Standard deviation of a unit normal truncated to (-2, 2), as in jax.nn.initializers.variance_scaling.
_TRUNCATED_NORMAL_STDDEV = 0.87962566103423978


def _truncated_normal(rng: np.random.Generator, shape, stddev: float) -> np.ndarray:
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return (values * stddev).astype(np.float32)


def initialize_variables(model: RDUNet, image_size: int, seed: int):
    """The model's variables drawn from Flax's default initialisers (LeCun-normal kernels, zero
    biases, unit BatchNorm scales and variances) in numpy.

    Same distributions as `model.init`, but nothing is compiled: XLA takes 10-15 s to compile the
    initialisers of the full model, longer than a training epoch on the phantom.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return _truncated_normal(rng, leaf.shape, np.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STDDEV)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        raise ValueError(f"no initialiser for variable {jax.tree_util.keystr(path)}")

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(model, image_size))
    return jax.device_put(variables)
