"""An independent numpy reference of the Residual Dilated U-net's evaluation forward pass.

Written from the paper (Amer, Ye, Janan, ICCVW 2021) and the README's "The model" section, sharing no code
with `rdunet_jax`: it reads the Flax variables (params and batch_stats) by their module paths and computes
in float64. Arrays are NHWC. Architecture, as the README states it:

- a 3x3 convolution (no bias, zero 'SAME' padding, optionally dilated) is always followed by BatchNorm,
  which in evaluation is (x - running mean) / sqrt(running var + eps) * scale + bias;
- plain U-net block: conv-BN-ReLU-conv-BN-ReLU; residual block: conv-BN-ReLU-(dropout)-conv-BN, plus
  the input (or its 1x1 conv + BN when the width changes), then ReLU; dropout is the identity here;
- squeeze-and-excitation after each block: global average pool, Dense(C/r)-ReLU-Dense(C)-sigmoid, the
  input's channels scaled by the gates;
- encoder levels of features * 2**level maps, 2x2 max-pooling between them; ResDUNet dilates both 3x3
  convolutions of encoder level l by rate l of its schedule;
- the DC module on skip l: one 3x3 dilated conv-BN-ReLU per rate of its schedule, in order, width unchanged;
- decoder: bilinear 2x up-sampling (half-pixel centres, edge pixels repeated), concatenated with the
  (DC-processed) skip along channels, then a block of the skip's width. Neither the paper nor the
  variable shapes fix the order of the concatenation (the next kernel sees 3 * width channels either
  way); [up-sampled, skip] is the order the package's checkpoints hold, pinned here;
- a 1x1 convolution with bias to one logit per pixel.

Module paths are Flax's names in order of use: encoder block l is `EncoderDecoderBlock_{l}`, the decoder
blocks follow in data-flow order (deepest first), so the decoder block of level l is
`EncoderDecoderBlock_{2 * depth - l}`. A DC module is found by its width (each level has its own).
"""

import dataclasses

import numpy as np
from scipy import special

# Flax's nn.BatchNorm default (and PyTorch's); the model config does not change it.
BATCH_NORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The `model.*` keys that decide the network's function."""

    features: int
    depth: int
    block: str
    use_se: bool
    se_reduction: int
    skip_dilation_rates: tuple
    encoder_dilation_rates: tuple

    @classmethod
    def from_config(cls, model_config) -> "Architecture":
        return cls(
            features=int(model_config.features),
            depth=int(model_config.depth),
            block=str(model_config.block),
            use_se=bool(model_config.use_se),
            se_reduction=int(model_config.se_reduction),
            skip_dilation_rates=tuple(
                tuple(int(r) for r in rates) for rates in model_config.skip_dilation_rates
            ),
            encoder_dilation_rates=tuple(int(r) for r in model_config.encoder_dilation_rates),
        )

    def width(self, level: int) -> int:
        return self.features * 2**level

    def encoder_rate(self, level: int) -> int:
        return self.encoder_dilation_rates[level] if self.encoder_dilation_rates else 1

    def skip_schedule(self, level: int) -> tuple:
        return tuple(self.skip_dilation_rates[level]) if self.skip_dilation_rates else ()


class Variables:
    """Flax variables read by path, each checked for its expected shape and recorded as used.

    With `training_momentum`, BatchNorm takes its training form: it normalises by the batch's own
    statistics and records in `updated_stats` the running averages it would store,
    momentum * old + (1 - momentum) * batch statistic (the variance biased, over batch, height, width).
    """

    def __init__(self, variables, training_momentum=None):
        self._collections = {
            name: _to_float64(variables[name]) for name in ("params", "batch_stats") if name in variables
        }
        self.used = set()
        self.training_momentum = training_momentum
        self.updated_stats = {}

    def get(self, collection: str, path: tuple, name: str, shape: tuple) -> np.ndarray:
        node = self._collections[collection]
        for key in path:
            if key not in node:
                raise KeyError(f"{collection}/{'/'.join(path)}: no {key!r} (has {sorted(node)})")
            node = node[key]
        value = node[name]
        if value.shape != tuple(shape):
            raise ValueError(f"{collection}/{'/'.join(path)}/{name}: shape {value.shape}, expected {shape}")
        self.used.add((collection, *path, name))
        return value

    def shape(self, collection: str, path: tuple, name: str) -> tuple:
        node = self._collections[collection]
        for key in path:
            node = node[key]
        return node[name].shape

    def children(self, path: tuple = ()) -> list:
        node = self._collections["params"]
        for key in path:
            node = node[key]
        return sorted(node)

    def unused(self) -> list:
        """Paths of variables the forward pass never read (a model with parts the paper lacks)."""
        found = []

        def walk(collection, node, path):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(collection, value, (*path, key))
                elif (collection, *path, key) not in self.used:
                    found.append("/".join((collection, *path, key)))

        for collection, tree in self._collections.items():
            walk(collection, tree, ())
        return found


def _to_float64(tree):
    if hasattr(tree, "items"):
        return {key: _to_float64(value) for key, value in tree.items()}
    return np.asarray(tree, np.float64)


# --- layers -----------------------------------------------------------------------------------------


def conv2d(x: np.ndarray, kernel: np.ndarray, dilation: int = 1, bias=None) -> np.ndarray:
    """Cross-correlation of NHWC x with an HWIO kernel, stride 1, zero padding keeping the size ('SAME')."""
    kernel_h, kernel_w = kernel.shape[:2]
    reach_h, reach_w = (kernel_h - 1) * dilation, (kernel_w - 1) * dilation
    batch, height, width, _ = x.shape
    padded = np.pad(
        x, ((0, 0), (reach_h // 2, reach_h - reach_h // 2), (reach_w // 2, reach_w - reach_w // 2), (0, 0))
    )
    out = np.zeros((batch, height, width, kernel.shape[3]))
    for i in range(kernel_h):
        for j in range(kernel_w):
            window = padded[:, i * dilation : i * dilation + height, j * dilation : j * dilation + width, :]
            out += window @ kernel[i, j]
    return out if bias is None else out + bias


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def batch_norm(x: np.ndarray, scale, bias, mean, var) -> np.ndarray:
    """BatchNorm in evaluation: the running statistics normalise, then the learned affine map."""
    return (x - mean) / np.sqrt(var + BATCH_NORM_EPSILON) * scale + bias


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 max-pooling with stride 2 (sizes are even)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def upsample_axis_weights(length: int) -> np.ndarray:
    """The (2 * length, length) matrix of bilinear 2x up-sampling along one axis, half-pixel centres.

    Output pixel o has its centre at input coordinate (o + 0.5) / 2 - 0.5; it interpolates linearly
    between the two nearest input pixels, positions outside the image taking the edge pixel's value.
    """
    weights = np.zeros((2 * length, length))
    for out_index in range(2 * length):
        source = (out_index + 0.5) / 2 - 0.5
        lower = int(np.floor(source))
        fraction = source - lower
        weights[out_index, min(max(lower, 0), length - 1)] += 1 - fraction
        weights[out_index, min(max(lower + 1, 0), length - 1)] += fraction
    return weights


def upsample_bilinear_2x(x: np.ndarray) -> np.ndarray:
    """Bilinear 2x up-sampling of NHWC x (half-pixel centres, edge-clamped)."""
    rows, columns = upsample_axis_weights(x.shape[1]), upsample_axis_weights(x.shape[2])
    return np.einsum("oh,nhwc,pw->nopc", rows, x, columns)


# --- blocks -------------------------------------------------------------------------------------------


def conv_bn(
    variables: Variables, path: tuple, index: int, x, features: int, dilation: int = 1, size: int = 3
):
    """Conv_{index} (no bias) then BatchNorm_{index}, both under `path`."""
    kernel = variables.get("params", (*path, f"Conv_{index}"), "kernel", (size, size, x.shape[-1], features))
    return batch_norm_at(variables, path, index, conv2d(x, kernel, dilation))


def batch_norm_at(variables: Variables, path: tuple, index: int, x):
    """BatchNorm_{index} under `path`, in evaluation form or (see `Variables`) training form."""
    path, shape = (*path, f"BatchNorm_{index}"), (x.shape[-1],)
    scale, bias = variables.get("params", path, "scale", shape), variables.get("params", path, "bias", shape)
    mean = variables.get("batch_stats", path, "mean", shape)
    var = variables.get("batch_stats", path, "var", shape)
    momentum = variables.training_momentum
    if momentum is None:
        return batch_norm(x, scale, bias, mean, var)
    batch_mean, batch_var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    variables.updated_stats[path] = {
        "mean": momentum * mean + (1 - momentum) * batch_mean,
        "var": momentum * var + (1 - momentum) * batch_var,
    }
    return batch_norm(x, scale, bias, batch_mean, batch_var)


def two_convolutions(variables: Variables, path: tuple, x, features: int, dilation: int):
    """conv3x3-BN-ReLU-(dropout: identity in evaluation)-conv3x3-BN, the body both blocks share."""
    hidden = relu(conv_bn(variables, path, 0, x, features, dilation))
    return conv_bn(variables, path, 1, hidden, features, dilation)


def plain_block(variables: Variables, path: tuple, x, features: int, dilation: int = 1):
    """The U-net block: the body then ReLU."""
    return relu(two_convolutions(variables, (*path, "DoubleConv_0"), x, features, dilation))


def residual_block(variables: Variables, path: tuple, x, features: int, dilation: int = 1):
    """He et al.'s residual unit as the paper uses it: ReLU(body(x) + shortcut(x))."""
    body = two_convolutions(variables, (*path, "DoubleConv_0"), x, features, dilation)
    shortcut = x if x.shape[-1] == features else conv_bn(variables, path, 0, x, features, size=1)
    return relu(body + shortcut)


def squeeze_excitation(variables: Variables, path: tuple, x, reduction: int, pooling=np.mean):
    """Hu et al.'s squeeze-and-excitation: channel gates from the global average of each channel
    (`pooling` lets a test show that another statistic gives another output)."""
    channels = x.shape[-1]
    hidden_width = max(channels // reduction, 1)
    squeezed = pooling(x, axis=(1, 2))
    first, second = (*path, "Dense_0"), (*path, "Dense_1")
    hidden = relu(
        squeezed @ variables.get("params", first, "kernel", (channels, hidden_width))
        + variables.get("params", first, "bias", (hidden_width,))
    )
    gates = special.expit(
        hidden @ variables.get("params", second, "kernel", (hidden_width, channels))
        + variables.get("params", second, "bias", (channels,))
    )
    return x * gates[:, None, None, :]


def dilated_cascade(variables: Variables, path: tuple, x, rates):
    """The paper's DC module: 3x3 dilated conv-BN-ReLU for each rate in order, width unchanged."""
    for index, rate in enumerate(rates):
        x = relu(conv_bn(variables, path, index, x, x.shape[-1], rate))
    return x


def level_block(variables: Variables, architecture: Architecture, index: int, x, features: int, dilation=1):
    """EncoderDecoderBlock_{index}: the plain or residual block, then squeeze-and-excitation if used."""
    path = (f"EncoderDecoderBlock_{index}",)
    if architecture.block == "plain":
        x = plain_block(variables, (*path, "ConvBlock_0"), x, features, dilation)
    elif architecture.block == "residual":
        x = residual_block(variables, (*path, "ResidualBlock_0"), x, features, dilation)
    else:
        raise ValueError(f"unknown block {architecture.block!r}")
    if architecture.use_se:
        x = squeeze_excitation(variables, (*path, "SqueezeExcitation_0"), x, architecture.se_reduction)
    return x


def _cascade_path(variables: Variables, width: int) -> tuple:
    """The DilatedCascade module whose convolutions have `width` channels."""
    matches = [
        name
        for name in variables.children()
        if name.startswith("DilatedCascade_")
        and variables.shape("params", (name, "Conv_0"), "kernel")[2] == width
    ]
    if len(matches) != 1:
        raise KeyError(f"expected one DilatedCascade of width {width}, found {matches}")
    return (matches[0],)


def forward(
    variables, images: np.ndarray, architecture: Architecture, return_reader: bool = False, outputs: int = 1
):
    """The network's logits (N, H, W, outputs) for NHWC images, in float64."""
    reader = variables if isinstance(variables, Variables) else Variables(variables)
    x = np.asarray(images, np.float64)
    skips = []
    for level in range(architecture.depth + 1):
        if level:
            x = max_pool_2x2(x)
        x = level_block(
            reader, architecture, level, x, architecture.width(level), architecture.encoder_rate(level)
        )
        skips.append(x)
    x = skips[architecture.depth]
    for level in reversed(range(architecture.depth)):
        skip = skips[level]
        schedule = architecture.skip_schedule(level)
        if schedule:
            skip = dilated_cascade(reader, _cascade_path(reader, architecture.width(level)), skip, schedule)
        x = np.concatenate([upsample_bilinear_2x(x), skip], axis=-1)
        x = level_block(reader, architecture, 2 * architecture.depth - level, x, architecture.width(level))
    channels = x.shape[-1]
    logits = conv2d(
        x,
        reader.get("params", ("Conv_0",), "kernel", (1, 1, channels, outputs)),
        bias=reader.get("params", ("Conv_0",), "bias", (outputs,)),
    )
    return (logits, reader) if return_reader else logits


# --- output heads ---------------------------------------------------------------------------------------
#
# 'binary': one logit per pixel through the logistic function (the paper's); 'exclusive': background plus
# K class logits, normalised over channels (softmax: one class per pixel); 'multilabel': K logits, each
# through its own logistic function (classes may overlap).


def head_outputs(head: str, num_classes: int) -> int:
    """The number of logits per pixel of a head over `num_classes` foreground classes."""
    return {"binary": 1, "exclusive": num_classes + 1, "multilabel": num_classes}[head]


def head_probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    """The head's probabilities of float64 logits (N, H, W, C)."""
    if head == "exclusive":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


# --- parameter count by hand --------------------------------------------------------------------------


def parameter_count(architecture: Architecture, in_channels: int = 1, num_classes: int = 1) -> int:
    """Trainable scalars of the network, counted layer by layer from the widths (no model involved)."""

    def conv(inputs, outputs, size=3):  # no bias: BatchNorm's bias takes its place
        return size * size * inputs * outputs

    def norm(channels):  # scale and bias (the running statistics are not trained)
        return 2 * channels

    def block(inputs, outputs):
        count = conv(inputs, outputs) + norm(outputs) + conv(outputs, outputs) + norm(outputs)
        if architecture.block == "residual" and inputs != outputs:
            count += conv(inputs, outputs, size=1) + norm(outputs)
        if architecture.use_se:
            hidden = max(outputs // architecture.se_reduction, 1)
            count += outputs * hidden + hidden + hidden * outputs + outputs
        return count

    total, channels = 0, in_channels
    for level in range(architecture.depth + 1):
        total += block(channels, architecture.width(level))
        channels = architecture.width(level)
    for level in reversed(range(architecture.depth)):
        skip_width = architecture.width(level)
        total += len(architecture.skip_schedule(level)) * (conv(skip_width, skip_width) + norm(skip_width))
        total += block(channels + skip_width, skip_width)
        channels = skip_width
    return total + channels * num_classes + num_classes
