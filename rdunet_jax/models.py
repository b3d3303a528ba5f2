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
`dtype="bfloat16"` computes in bfloat16 with float32 parameters, float32 BatchNorm statistics and float32
logits. As in Flax's examples/imagenet, `RDUNet` builds the convolution, BatchNorm and dropout
constructors once (`make_layers`, in the forms the speed options pick from rdunet_jax/layers.py) and
hands them to the blocks.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import config_lib, heads, layers
from rdunet_jax.datasets.labels import BINARY_CLASSES

ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class Layers:
    """The layer constructors every block builds from, for training or for evaluation."""

    conv: ModuleDef  # nn.Conv without bias (BatchNorm follows), in the compute dtype
    norm: ModuleDef  # BatchNorm over the batch (training) or its running statistics (evaluation)
    dropout: ModuleDef
    dtype: Any  # the compute dtype, for the dense layers of squeeze-and-excitation


def make_layers(
    train: bool,
    dtype: Any = jnp.float32,
    dropout_rate: float = 0.5,
    batch_norm_momentum: float = layers.BATCH_NORM_MOMENTUM,
    dropout_impl: str = "flax",
    dilation_impl: str = "xla",
    batch_norm_impl: str = "flax",
    batch_norm_frozen: bool = False,
) -> Layers:
    """The blocks' convolution, BatchNorm and dropout constructors, in the speed options' forms; a frozen
    BatchNorm normalises by its running statistics in training too, and leaves them as they are."""
    return Layers(
        conv=functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=dtype,
            conv_general_dilated=layers.CONVOLUTIONS[layers.resolve_dilation_impl(dilation_impl)],
        ),
        norm=functools.partial(
            layers.NORMS[batch_norm_impl],
            use_running_average=not train or batch_norm_frozen,
            momentum=batch_norm_momentum,
            dtype=dtype,
        ),
        dropout=functools.partial(layers.DROPOUTS[dropout_impl], dropout_rate, deterministic=not train),
        dtype=dtype,
    )


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
    layers: Layers
    dilation_rate: int = 1

    @nn.compact
    def __call__(self, x):
        for index in range(2):
            if index:
                x = self.layers.dropout()(nn.relu(x))
            x = self.layers.conv(self.features, (3, 3), kernel_dilation=self.dilation_rate)(x)
            x = self.layers.norm()(x)
        return x


class ConvBlock(nn.Module):
    """The plain U-net block (Ronneberger et al. 2015): two 3x3 convolutions, no shortcut."""

    features: int
    layers: Layers
    dilation_rate: int = 1

    def _body(self) -> DoubleConv:
        return DoubleConv(self.features, self.layers, self.dilation_rate)

    @nn.compact
    def __call__(self, x):
        return nn.relu(self._body()(x))


class ResidualBlock(ConvBlock):
    """The paper's residual block: DoubleConv plus an identity (or 1x1 conv+BN) shortcut, then ReLU."""

    @nn.compact
    def __call__(self, x):
        body = self._body()(x)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = self.layers.norm()(self.layers.conv(self.features, (1, 1))(x))
        return nn.relu(body + shortcut)


class DilatedCascade(nn.Module):
    """The paper's DC module: cascaded 3x3 dilated conv-BN-ReLU on a skip, shape unchanged."""

    dilation_rates: Sequence[int]
    layers: Layers

    @nn.compact
    def __call__(self, x):
        for rate in self.dilation_rates:
            x = self.layers.conv(x.shape[-1], (3, 3), kernel_dilation=rate)(x)
            x = nn.relu(self.layers.norm()(x))
        return x


class EncoderDecoderBlock(nn.Module):
    """One U-net level's block: plain or residual, optionally followed by squeeze-and-excitation."""

    features: int
    layers: Layers
    block: str = "residual"
    use_se: bool = True
    se_reduction: int = 8
    dilation_rate: int = 1

    @nn.compact
    def __call__(self, x):
        block_class = {"plain": ConvBlock, "residual": ResidualBlock}[self.block]
        x = block_class(self.features, self.layers, self.dilation_rate)(x)
        if self.use_se:
            x = SqueezeExcitation(self.se_reduction, self.layers.dtype)(x)
        return x


class RDUNet(nn.Module):
    """The Residual Dilated U-net and, by configuration, the paper's baselines (see module docstring).

    `depth` is the number of 2x down-samplings: feature maps go features, 2*features, ...,
    features * 2**depth at the bottom. `skip_dilation_rates` holds one schedule per skip, shallow to
    deep (an empty schedule, or an empty tuple for all, leaves that skip plain).
    `encoder_dilation_rates` holds one rate per encoder level (depth + 1 of them) for ResDUNet.
    The `*_impl` fields and `remat` are the speed options (config_lib.SPEED_OPTIONS).
    """

    features: int = 16
    depth: int = 4
    block: str = "residual"
    use_se: bool = True
    se_reduction: int = 8
    skip_dilation_rates: Sequence[Sequence[int]] = config_lib.PAPER_SKIP_DILATION_RATES
    encoder_dilation_rates: Sequence[int] = ()
    dropout_rate: float = 0.5
    batch_norm_momentum: float = layers.BATCH_NORM_MOMENTUM
    num_classes: int = 1
    dtype: Any = jnp.float32
    upsample_impl: str = "resize"
    dropout_impl: str = "flax"
    remat: bool = False
    pool_impl: str = "reduce_window"
    dilation_impl: str = "xla"
    batch_norm_impl: str = "flax"
    batch_norm_frozen: bool = False

    def _block(self, features, index: int, block_layers: Layers, dilation_rate=1):
        # Explicit names: nn.remat's class is called CheckpointEncoderDecoderBlock, and the parameter
        # tree must not depend on the option.
        block_class = nn.remat(EncoderDecoderBlock) if self.remat else EncoderDecoderBlock
        return block_class(
            features,
            block_layers,
            self.block,
            self.use_se,
            self.se_reduction,
            dilation_rate,
            name=f"EncoderDecoderBlock_{index}",
        )

    @nn.compact
    def __call__(self, images, train: bool = False):
        block_layers = make_layers(
            train,
            self.dtype,
            self.dropout_rate,
            self.batch_norm_momentum,
            self.dropout_impl,
            self.dilation_impl,
            self.batch_norm_impl,
            self.batch_norm_frozen,
        )
        pool, upsample = layers.POOLS[self.pool_impl], layers.UPSAMPLINGS[self.upsample_impl]
        x = images.astype(self.dtype)
        encoder_rates = tuple(self.encoder_dilation_rates) or (1,) * (self.depth + 1)
        skip_rates = tuple(self.skip_dilation_rates) or ((),) * self.depth
        skips = []
        for level in range(self.depth + 1):
            if level:
                x = pool(x)
            x = self._block(self.features * 2**level, level, block_layers, encoder_rates[level])(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth)):
            skip = skips[level]
            if skip_rates[level]:
                skip = DilatedCascade(tuple(skip_rates[level]), block_layers)(skip)
            x = jnp.concatenate([upsample(x), skip], axis=-1)
            x = self._block(self.features * 2**level, 2 * self.depth - level, block_layers)(x)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
        return logits.astype(jnp.float32)


def build_model(model_config, classes=BINARY_CLASSES) -> RDUNet:
    """The `RDUNet` a config's `model` section describes, with the output channels of its `model.head` for
    `classes` (`config.data.classes`).

    Args:
      model_config: `config.model` (see `config_lib.base_config`): the architecture (features, depth,
        block, use_se, se_reduction, skip_dilation_rates, encoder_dilation_rates), dropout_rate,
        batch_norm_momentum, dtype ('float32' or 'bfloat16') and the speed options of
        `config_lib.SPEED_OPTIONS`; a speed option the section predates takes the value it ran with then,
        and dilation_impl 'auto' becomes the fast form for the default backend.

      classes: the class names of `data.classes` (one channel each for 'multilabel', plus background for
        'exclusive'; the binary head has one channel whatever they are).

    Returns:
      The Flax module (logits); its variables come from `initialize_variables`.
    """
    options = config_lib.speed_options(model_config)
    options["dilation_impl"] = layers.resolve_dilation_impl(options["dilation_impl"])
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
        batch_norm_frozen=model_config.get("batch_norm_frozen", False),
        num_classes=heads.num_output_channels(model_config.get("head", "binary"), len(classes)),
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
    return draw_variables(abstract_variables(model, image_size), seed)


def draw_variables(abstract, seed: int):
    """Variables of the shapes in `abstract` (any block's, from `jax.eval_shape` of its `init`) drawn as
    `initialize_variables` draws the model's."""
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

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, abstract))
