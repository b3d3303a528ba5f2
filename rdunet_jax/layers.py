"""XLA rewrites of the network's layers: each computes what a Flax or JAX layer computes, faster.

Each is a choice of a speed option (`config_lib.SPEED_OPTIONS`, measured in experiments/README.md). None
changes the parameter tree, so checkpoints are shared between them:

- `conv_space_to_batch`: a dilated convolution as an undilated one over the input's phases, as
  TensorFlow's `atrous_conv2d` does; on a GPU, XLA turns the kernel gradient of a dilated convolution into a
  strided convolution with an image-sized window, while the phases' gradient is an ordinary one.
- `BatchNorm`: `nn.BatchNorm` with its training gradient in closed form (a custom VJP).
- `BitsDropout`: `nn.Dropout`'s Bernoulli masks drawn from fewer random bits.
- `max_pool_reshape`: 2x2 max-pooling whose gradient is elementwise instead of a select-and-scatter.
- `upsample_bilinear_stencil`: `jax.image.resize`'s 2x bilinear up-sampling as a fixed stencil.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# PyTorch's default (0.1 in its convention). Keras' and Flax's 0.99 lets the running statistics lag
# hundreds of steps behind the weights, which spoils validation in short runs.
BATCH_NORM_MOMENTUM = 0.9


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


@jax.custom_vjp
def batch_normalize(x, mean, inverse_std, scale, bias):
    """BatchNorm's affine normalisation, (x - mean) * inverse_std * scale + bias, whose gradient takes
    `mean` and `inverse_std` to be x's own batch statistics (Ioffe and Szegedy 2015, section 3)."""
    return (x - mean) * (inverse_std * scale) + bias


def _batch_normalize_forward(x, mean, inverse_std, scale, bias):
    return batch_normalize(x, mean, inverse_std, scale, bias), (x, mean, inverse_std, scale)


def _batch_normalize_backward(residuals, grad):
    # The closed form keeps only x for the backward pass and reads it twice; differentiating the
    # statistics' formulas instead kept more activation-sized arrays.
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
    arithmetic), with the closed-form training gradient of `batch_normalize`.

    Being a custom VJP, it has first-order reverse-mode derivatives only: forward-mode (`jax.jvp`) and
    second-order ones (a gradient penalty) need `nn.BatchNorm`.
    """

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
    """Inverted dropout like `nn.Dropout`, with masks from `dropout_keep_mask` (few random bits; other
    masks than `nn.Dropout`'s for the same key, same distribution)."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep, keep_probability = dropout_keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(keep_probability, x.dtype), jnp.zeros((), x.dtype))


def max_pool_reduce_window(x):
    """2x2 max-pooling, stride 2, as `nn.max_pool` (XLA's reduce-window; select-and-scatter gradient)."""
    return nn.max_pool(x, (2, 2), (2, 2))


def max_pool_reshape(x):
    """2x2 max-pooling, stride 2, as a reshape and a max, whose gradient is elementwise.

    It differs from `max_pool_reduce_window` only where a window holds tied maxima, e.g. zeros after a
    ReLU, which share the gradient instead of the first taking it; that gradient then meets the ReLU's zero
    derivative.
    """
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


# Each speed option's forms by name (after "auto" is resolved); config_lib.SPEED_OPTIONS offers these names.
CONVOLUTIONS = {"xla": lax.conv_general_dilated, "space_to_batch": conv_space_to_batch}
NORMS = {"flax": nn.BatchNorm, "closed_form": BatchNorm}
DROPOUTS = {"flax": nn.Dropout, "bits": BitsDropout}
POOLS = {"reduce_window": max_pool_reduce_window, "reshape": max_pool_reshape}
UPSAMPLINGS = {"resize": upsample_bilinear, "stencil": upsample_bilinear_stencil}
