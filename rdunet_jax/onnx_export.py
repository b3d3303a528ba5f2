"""ONNX export of a trained model: the forward pass as an ONNX graph, for ONNX Runtime (the fastest CPU
inference we measured) and other tools that read ONNX.

The graph is translated from the model's traced program (its jaxpr), primitive by primitive, so every
configuration of `models.RDUNet` (the paper's baselines included) exports without a second copy of the
architecture; the parameters and BatchNorm statistics are folded into constants. The input is NHWC like the
model's (`images`, float32 in [0, 1], any batch size); the outputs are `logits` and `probabilities`.
"""

import copy
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import files
from rdunet_jax.errors import UserError

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
# Constants up to this many elements are materialised when folded; larger broadcasts stay rank-expanded
# and rely on ONNX broadcasting (a BatchNorm scale must not become an activation-sized initializer).
_MAX_FOLDED_ELEMENTS = 1 << 16
_INT64_MAX = np.iinfo(np.int64).max


def _onnx():
    try:
        import onnx
    except ImportError as error:
        raise UserError("ONNX export needs the onnx package: pip install -e '.[onnx]'") from error
    return onnx


class _Const:
    """A value known at export time; `array` may be rank-expanded (size-1 axes) for a larger `shape`."""

    def __init__(self, array, shape=None):
        self.array = np.asarray(array)
        self.shape = tuple(self.array.shape if shape is None else shape)

    def materialized(self) -> np.ndarray:
        if self.array.shape != self.shape:
            if not _concrete(self.shape):
                raise NotImplementedError(f"a constant broadcast to the symbolic shape {self.shape}")
            return np.broadcast_to(self.array, self.shape)
        return self.array

    def is_scalar_zero(self) -> bool:
        """Whether this is the 0 of `max(x, 0)`, JAX's ReLU."""
        return self.array.ndim == 0 and float(self.array) == 0.0


class _PendingConv:
    """A convolution not yet written, so that the per-channel affine maps (BatchNorm in evaluation mode)
    and the ReLU after it fold into its kernel, bias and activation, as ONNX Runtime's kernels expect."""

    def __init__(self, image: str, kernel: np.ndarray, attributes: dict, out_spec, shape):
        self.image, self.kernel, self.attributes = image, kernel, attributes
        self.bias = np.zeros(kernel.shape[0], kernel.dtype)
        self.out_spec, self.shape, self.relu = tuple(out_spec), tuple(shape), False
        self.output = None  # the ONNX name, once written

    def channel_factor(self, value):
        """`value` as one number per output channel, or None when it varies along another axis."""
        if not isinstance(value, _Const):
            return None
        array = value.array
        if array.ndim == 0:
            return np.full(self.kernel.shape[0], array, self.kernel.dtype)
        channel_axis = self.out_spec[1]
        if array.ndim != len(self.shape) or any(
            size != 1 for axis, size in enumerate(array.shape) if axis != channel_axis
        ):
            return None
        if array.shape[channel_axis] not in (1, self.kernel.shape[0]):
            return None
        return np.broadcast_to(array.reshape(-1), self.kernel.shape[:1]).astype(self.kernel.dtype)

    def folded(self, name: str, values, out_shape):
        """A new convolution computing `self <name> constant`, or None when that does not fold. (A new
        one, not this one changed: other consumers of this convolution still need its plain output.)"""
        if self.relu or len(values) != 2 or tuple(out_shape) != self.shape:
            return None  # the constant also broadcasts the convolution's output: not a bias or scale
        first, second = values
        if first is not self:
            if name not in ("add", "mul", "max"):
                return None
            first, second = second, first
        result = copy.copy(self)
        result.output = None
        if name == "max":
            if not (isinstance(second, _Const) and second.is_scalar_zero()):
                return None
            result.relu = True
            return result
        factor = self.channel_factor(second) if name in ("add", "sub", "mul", "div") else None
        if factor is None:
            return None
        if name in ("mul", "div"):
            factor = factor if name == "mul" else 1 / factor
            result.kernel = self.kernel * factor.reshape((-1,) + (1,) * (self.kernel.ndim - 1))
            result.bias = self.bias * factor
        else:
            result.bias = self.bias + (factor if name == "add" else -factor)
        return result


def _concrete(shape) -> bool:
    return all(isinstance(size, int) for size in shape)


def _same_size(first, second) -> bool:
    """Whether two sizes, either possibly symbolic, are the same."""
    try:
        return bool(first == second)
    except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared are not the same
        return False


def _covers(operand_shapes, shape) -> bool:
    """Whether ONNX's broadcasting of operands of `operand_shapes` gives all of `shape`."""
    for axis, size in enumerate(shape):
        if _same_size(size, 1):
            continue
        if not any(
            len(operand) == len(shape) and _same_size(operand[axis], size) for operand in operand_shapes
        ):
            return False
    return True


def _onnx_shape(shape) -> list[int]:
    """A shape for Reshape: the one symbolic (batch) dimension becomes -1, inferred by ONNX."""
    dims = [size if isinstance(size, int) else -1 for size in shape]
    if dims.count(-1) > 1:
        raise NotImplementedError(f"a shape with more than one symbolic dimension: {shape}")
    return dims


# ONNX operator per elementwise primitive, and its numpy twin for folding constants.
_ELEMENTWISE = {
    "add": ("Add", np.add),
    "sub": ("Sub", np.subtract),
    "mul": ("Mul", np.multiply),
    "div": ("Div", np.divide),
    "max": ("Max", np.maximum),
    "min": ("Min", np.minimum),
    "neg": ("Neg", np.negative),
    "exp": ("Exp", np.exp),
    "log": ("Log", np.log),
    "sqrt": ("Sqrt", np.sqrt),
    "tanh": ("Tanh", np.tanh),
    "abs": ("Abs", np.abs),
    "logistic": ("Sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    "rsqrt": (None, lambda x: 1 / np.sqrt(x)),
}
# Primitives whose body is another jaxpr, inlined: jit, and the custom derivatives of relu and friends.
_NESTED = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


class _GraphBuilder:
    """Accumulates ONNX nodes and initializers while walking a jaxpr."""

    def __init__(self, batch_size=None):
        self.onnx = _onnx()
        self.nodes, self.initializers, self._count = [], [], 0
        self.batch_size, self._batch_tensor = batch_size, None  # the symbolic batch size, its ONNX value

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, array, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        output = output or self.name(op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def shape_tensor(self, shape) -> str:
        """`shape` as an ONNX int64 tensor, the symbolic batch size read off the input at run time."""
        if _concrete(shape):
            return self.constant(np.array(shape, np.int64))
        parts = []
        for size in shape:
            if isinstance(size, int):
                parts.append(self.constant(np.array([size], np.int64)))
            elif self.batch_size is not None and _same_size(size, self.batch_size):
                if self._batch_tensor is None:
                    starts, ends = (self.constant(np.array([index], np.int64)) for index in (0, 1))
                    self._batch_tensor = self.node("Slice", [self.node("Shape", [INPUT_NAME]), starts, ends])
                parts.append(self._batch_tensor)
            else:
                raise NotImplementedError(f"a shape with the symbolic size {size}")
        return self.node("Concat", parts, axis=0)

    # --- values ---------------------------------------------------------------------------------------

    def tensor(self, value, dtype) -> str:
        """The ONNX name of a value, constants becoming initializers of the variable's dtype."""
        if isinstance(value, _Const):
            return self.constant(value.array.astype(dtype))
        if isinstance(value, _PendingConv):
            return self.write_conv(value)
        return value

    def materialized(self, value, dtype) -> str:
        if isinstance(value, _Const):
            return self.constant(value.materialized().astype(dtype))
        return self.tensor(value, dtype)

    def write_conv(self, conv: _PendingConv) -> str:
        if conv.output is None:
            kernel = self.constant(conv.kernel, "kernel")
            bias = self.constant(conv.bias, "bias")
            output = self.node("Conv", [conv.image, kernel, bias], **conv.attributes)
            if conv.relu:
                output = self.node("Relu", [output])
            conv.output = self.node(
                "Transpose", [output], perm=[int(axis) for axis in np.argsort(conv.out_spec)]
            )
        return conv.output

    # --- the walk -------------------------------------------------------------------------------------

    def run(self, jaxpr, consts, inputs) -> list:
        env = {}

        def read(var):
            if hasattr(var, "val"):  # a literal
                return _Const(np.asarray(var.val, var.aval.dtype))
            return env[var]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value if isinstance(value, _Const | str) else _Const(value)
        for var, value in zip(jaxpr.invars, inputs, strict=True):
            env[var] = value
        for equation in jaxpr.eqns:
            values = [read(var) for var in equation.invars]
            outputs = self.equation(equation, values)
            for var, value in zip(equation.outvars, outputs, strict=True):
                env[var] = value
        return [read(var) for var in jaxpr.outvars]

    def equation(self, equation, values) -> list:
        name = equation.primitive.name
        params = equation.params
        out_aval = equation.outvars[0].aval
        if name in ("jit", "pjit") and params.get("name") == "upsample_bilinear_stencil":
            return [self.upsample(values[0], equation)]
        if name in _NESTED:
            closed = params[_NESTED[name]]
            return self.run(closed.jaxpr, closed.consts, values)
        if name in _ELEMENTWISE:
            return [self.elementwise(name, values, equation)]
        if all(isinstance(value, _Const) for value in values) and _concrete(out_aval.shape):
            if int(np.prod(out_aval.shape)) <= _MAX_FOLDED_ELEMENTS:
                arrays = [jnp.asarray(value.materialized()) for value in values]
                results = equation.primitive.bind(*arrays, **params)
                results = results if equation.primitive.multiple_results else [results]
                return [_Const(np.asarray(result)) for result in results]
        converter = getattr(self, f"_{name}", None)
        if converter is None:
            raise NotImplementedError(f"no ONNX translation for the JAX primitive {name!r}")
        return [converter(values, params, equation)]

    def elementwise(self, name: str, values, equation):
        op_type, numpy_function = _ELEMENTWISE[name]
        out_aval = equation.outvars[0].aval
        dtype = out_aval.dtype
        if all(isinstance(value, _Const) for value in values):
            result = numpy_function(*[value.array for value in values]).astype(dtype)
            shape = out_aval.shape
            if _concrete(shape) and int(np.prod(shape)) <= _MAX_FOLDED_ELEMENTS:
                return _Const(np.broadcast_to(result, shape).copy())
            return _Const(result, shape)
        convolutions = [value for value in values if isinstance(value, _PendingConv)]
        if len(convolutions) == 1:
            folded = convolutions[0].folded(name, values, out_aval.shape)
            if folded is not None:
                return folded
        if name == "max" and isinstance(values[1], _Const) and values[1].is_scalar_zero():
            return self.node("Relu", [self.tensor(values[0], dtype)])
        inputs = [self.tensor(value, dtype) for value in values]
        if name == "rsqrt":
            output = self.node("Reciprocal", [self.node("Sqrt", inputs)])
        else:
            output = self.node(op_type, inputs)
        # JAX broadcasts size-1 axes itself, and constants are kept with size-1 axes: when no operand is
        # as large as the result along some axis, ONNX's broadcasting alone would leave it too small.
        stored = [
            value.array.shape if isinstance(value, _Const) else var.aval.shape
            for value, var in zip(values, equation.invars, strict=True)
        ]
        if not _covers(stored, out_aval.shape):
            output = self.node("Expand", [output, self.shape_tensor(out_aval.shape)])
        return output

    def upsample(self, value, equation) -> str:
        """`layers.upsample_bilinear_stencil` (2x bilinear, half-pixel centres, NHWC) as ONNX's Resize."""
        image = self.node("Transpose", [self.materialized(value, np.float32)], perm=[0, 3, 1, 2])
        scales = self.constant(np.array([1, 1, 2, 2], np.float32))
        resized = self.node(
            "Resize", [image, "", scales], mode="linear", coordinate_transformation_mode="half_pixel"
        )
        return self.node("Transpose", [resized], perm=[0, 2, 3, 1])

    # --- structural primitives (one method per JAX primitive, `_<name>`) -------------------------------

    def _broadcast_in_dim(self, values, params, equation):
        (operand,) = values
        shape, dimensions = params["shape"], params["broadcast_dimensions"]
        expanded = [1] * len(shape)
        in_shape = equation.invars[0].aval.shape
        for axis, dimension in enumerate(dimensions):
            expanded[dimension] = in_shape[axis]
        if isinstance(operand, _Const):
            return _Const(operand.materialized().reshape(_onnx_shape(expanded)), shape)
        operand = self.tensor(operand, equation.invars[0].aval.dtype)
        reshaped = self.node("Reshape", [operand, self.constant(np.array(_onnx_shape(expanded)))])
        if all(_same_size(first, second) for first, second in zip(expanded, shape, strict=True)):
            return reshaped
        return self.node("Expand", [reshaped, self.shape_tensor(shape)])

    def _reshape(self, values, params, equation):
        if params.get("dimensions") is not None:
            raise NotImplementedError("reshape with a dimension permutation")
        dtype = equation.outvars[0].aval.dtype
        operand = self.materialized(values[0], dtype)
        return self.node("Reshape", [operand, self.constant(np.array(_onnx_shape(params["new_sizes"])))])

    def _squeeze(self, values, params, equation):
        out_shape = equation.outvars[0].aval.shape
        operand = self.materialized(values[0], equation.outvars[0].aval.dtype)
        return self.node("Reshape", [operand, self.constant(np.array(_onnx_shape(out_shape)))])

    def _convert_element_type(self, values, params, equation):
        operand = self.materialized(values[0], equation.invars[0].aval.dtype)
        if np.dtype(params["new_dtype"]) == np.dtype(equation.invars[0].aval.dtype):
            return operand
        onnx_type = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(params["new_dtype"]))
        return self.node("Cast", [operand], to=onnx_type)

    def _concatenate(self, values, params, equation):
        dtype = equation.outvars[0].aval.dtype
        return self.node(
            "Concat", [self.materialized(value, dtype) for value in values], axis=params["dimension"]
        )

    def _stack(self, values, params, equation):
        dtype = equation.outvars[0].aval.dtype
        axis = params["axis"]
        axes = self.constant(np.array([axis], np.int64))
        parts = [self.node("Unsqueeze", [self.materialized(value, dtype), axes]) for value in values]
        return self.node("Concat", parts, axis=axis)

    def _slice(self, values, params, equation):
        in_shape = equation.invars[0].aval.shape
        starts, limits = params["start_indices"], params["limit_indices"]
        strides = params["strides"] or (1,) * len(starts)
        ends = []
        for limit, size in zip(limits, in_shape, strict=True):
            if not isinstance(limit, int):
                if not _same_size(limit, size):
                    raise NotImplementedError("a slice ending inside a symbolic dimension")
                limit = _INT64_MAX
            ends.append(limit)
        if not all(isinstance(start, int) for start in starts):
            raise NotImplementedError("a slice starting at a symbolic index")
        operand = self.materialized(values[0], equation.invars[0].aval.dtype)
        inputs = [np.array(starts), np.array(ends), np.arange(len(starts)), np.array(strides)]
        return self.node("Slice", [operand] + [self.constant(array.astype(np.int64)) for array in inputs])

    def _reduce_sum(self, values, params, equation):
        operand = self.materialized(values[0], equation.invars[0].aval.dtype)
        axes = self.constant(np.array(params["axes"], np.int64))
        return self.node("ReduceSum", [operand, axes], keepdims=0)

    def _reduce_max(self, values, params, equation):
        operand = self.materialized(values[0], equation.invars[0].aval.dtype)
        return self.node("ReduceMax", [operand], axes=list(params["axes"]), keepdims=0)

    def _dot_general(self, values, params, equation):
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        lhs_rank, rhs_rank = (len(var.aval.shape) for var in equation.invars)
        dtype = equation.outvars[0].aval.dtype
        lhs, rhs = (self.materialized(value, dtype) for value in values)
        if not lhs_batch and (lhs_rank, rhs_rank, tuple(lhs_contract), tuple(rhs_contract)) == (
            2,
            2,
            (1,),
            (0,),
        ):
            return self.node("MatMul", [lhs, rhs])
        # Anything else as an Einsum: shared letters for contracted and batch axes, JAX's output order.
        lhs_letters = list("abcdefghijklm"[:lhs_rank])
        rhs_letters = list("nopqrstuvwxyz"[:rhs_rank])
        paired = list(zip(lhs_contract, rhs_contract, strict=True)) + list(
            zip(lhs_batch, rhs_batch, strict=True)
        )
        for lhs_axis, rhs_axis in paired:
            rhs_letters[rhs_axis] = lhs_letters[lhs_axis]
        batch = [lhs_letters[axis] for axis in lhs_batch]
        lhs_free = [lhs_letters[a] for a in range(lhs_rank) if a not in (*lhs_contract, *lhs_batch)]
        rhs_free = [rhs_letters[a] for a in range(rhs_rank) if a not in (*rhs_contract, *rhs_batch)]
        formula = f"{''.join(lhs_letters)},{''.join(rhs_letters)}->{''.join(batch + lhs_free + rhs_free)}"
        return self.node("Einsum", [lhs, rhs], equation=formula)

    def _conv_general_dilated(self, values, params, equation):
        if any(dilation != 1 for dilation in params["lhs_dilation"]) or params["batch_group_count"] != 1:
            raise NotImplementedError("a transposed (input-dilated) or batch-grouped convolution")
        padding = params["padding"]
        if any(low < 0 or high < 0 for low, high in padding):
            raise NotImplementedError("a convolution with negative padding")
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        dtype = equation.outvars[0].aval.dtype
        # ONNX convolves (N, C, spatial...) with (O, I, spatial...): the specs list exactly those axes.
        image = self.node("Transpose", [self.materialized(values[0], dtype)], perm=list(lhs_spec))
        kernel = values[1]
        if not isinstance(kernel, _Const):
            raise NotImplementedError("a convolution whose kernel is not a constant")
        attributes = dict(
            strides=list(params["window_strides"]),
            dilations=list(params["rhs_dilation"]),
            pads=[low for low, _ in padding] + [high for _, high in padding],
            group=params["feature_group_count"],
        )
        kernel = np.transpose(kernel.materialized(), rhs_spec).astype(dtype)
        return _PendingConv(image, kernel, attributes, out_spec, equation.outvars[0].aval.shape)

    def _reduce_window_max(self, values, params, equation):
        window, strides = params["window_dimensions"], params["window_strides"]
        padding = params["padding"]
        if any(dilation != 1 for dilation in params["base_dilation"]):
            raise NotImplementedError("max-pooling with base dilation")
        spatial = [axis for axis, size in enumerate(window) if size != 1 or strides[axis] != 1]
        other = [axis for axis in range(len(window)) if axis not in spatial]
        if len(other) != 2 or any(padding[axis] != (0, 0) for axis in other):
            raise NotImplementedError("max-pooling that is not over the spatial axes of an (N, C) layout")
        perm = other + spatial
        image = self.node(
            "Transpose", [self.materialized(values[0], equation.invars[0].aval.dtype)], perm=perm
        )
        pooled = self.node(
            "MaxPool",
            [image],
            kernel_shape=[window[axis] for axis in spatial],
            strides=[strides[axis] for axis in spatial],
            pads=[padding[axis][0] for axis in spatial] + [padding[axis][1] for axis in spatial],
            dilations=[params["window_dilation"][axis] for axis in spatial],
        )
        return self.node("Transpose", [pooled], perm=[int(axis) for axis in np.argsort(perm)])

    def _transpose(self, values, params, equation):
        operand = self.materialized(values[0], equation.invars[0].aval.dtype)
        return self.node("Transpose", [operand], perm=list(params["permutation"]))

    def _copy(self, values, params, equation):
        return self.materialized(values[0], equation.invars[0].aval.dtype)


def export_function(function, image_shape, graph_name: str = "rdunet"):
    """The ONNX model of `function` (NHWC float32 images -> logits), its batch size left free."""
    onnx = _onnx()
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(function)(images)
    builder = _GraphBuilder(batch)
    (logits,) = builder.run(closed.jaxpr, closed.consts, [INPUT_NAME])
    logits = builder.tensor(logits, np.float32)
    builder.node("Identity", [logits], OUTPUT_NAMES[0])
    builder.node("Sigmoid", [OUTPUT_NAMES[0]], OUTPUT_NAMES[1])
    out_shape = ["batch", *closed.out_avals[0].shape[1:]]
    graph = onnx.helper.make_graph(
        builder.nodes,
        graph_name,
        [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", *image_shape])],
        [
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, out_shape)
            for name in OUTPUT_NAMES
        ],
        builder.initializers,
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="rdunet_jax"
    )
    model.ir_version = 8  # the newest that every ONNX Runtime since 1.14 reads
    onnx.checker.check_model(model)
    return model


def export_model(model, variables, image_size: int):
    """The ONNX model of a trained `models.RDUNet` in evaluation mode (running BatchNorm statistics).

    Exported in float32 with the implementation options that do not change the function (stencil
    up-sampling, XLA's dilated convolution), whatever the training config chose for speed.
    """
    plain = model.clone(
        dtype=jnp.float32,
        upsample_impl="stencil",
        dilation_impl="xla",
        pool_impl="reduce_window",
        remat=False,
    )
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return export_function(
        lambda images: plain.apply(variables, images, train=False), (image_size, image_size, 1)
    )


def save(onnx_model, path) -> pathlib.Path:
    """Writes the model to `path` atomically (a temporary file renamed into place)."""
    files.write_bytes_atomic(path, onnx_model.SerializeToString())
    return pathlib.Path(path)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError(
            "eval.runtime='onnxruntime' needs the onnxruntime package: pip install -e '.[onnx]'"
        ) from error
    return onnxruntime


class OnnxRuntimeModel:
    """An exported model in an ONNX Runtime session, standing in for the train state in evaluation and
    prediction (`evaluate.dispatch_batch`, `evaluate.predict_batch`)."""

    def __init__(self, onnx_model, step: int, loss: str = "dice", threads: int = 0):
        onnxruntime = _onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per physical core
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only; ONNX Runtime warns about every unused initializer
        self.session = onnxruntime.InferenceSession(
            onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.step, self.loss = step, loss

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Lesion probabilities (N, H, W, 1) of float32 images (N, H, W, 1)."""
        return self.session.run([OUTPUT_NAMES[1]], {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]

    def predict_batch(self, batch: dict, test_time_flips: bool = False) -> dict:
        """`evaluate.predict_batch` for this session: per-image loss (of the unflipped logits, as there)
        and probabilities (N, H, W), optionally averaged over flips."""
        from rdunet_jax import losses

        images = np.ascontiguousarray(batch["image"], np.float32)
        logits, probabilities = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        loss = np.asarray(losses.LOSSES[self.loss](jnp.asarray(logits), jnp.asarray(batch["mask"])))
        if test_time_flips:
            probabilities = self._mirrored(images, probabilities)
        return {"loss": loss, "probabilities": probabilities[..., 0]}

    def dispatch_batch(self, images: np.ndarray, test_time_flips: bool = False) -> np.ndarray:
        """`evaluate.dispatch_batch` for this session: probabilities, optionally averaged over flips."""
        probabilities = self.probabilities(images)
        return self._mirrored(images, probabilities) if test_time_flips else probabilities

    def _mirrored(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """The mean of `probabilities` (the unflipped images') and those of the flipped images, flipped
        back (`evaluate.TEST_TIME_FLIPS`)."""
        from rdunet_jax.evaluate import TEST_TIME_FLIPS

        total = probabilities.copy()
        for axes in TEST_TIME_FLIPS[1:]:
            total += np.flip(self.probabilities(np.flip(images, axis=axes)), axis=axes)
        return total / len(TEST_TIME_FLIPS)


def _input_contract(image_size: int) -> str:
    return f"{INPUT_NAME} (batch, {image_size}, {image_size}, 1) float32 in [0, 1]"


def export_state(config, state):
    """The ONNX model of a restored train state, with what its input must be in its metadata."""
    from rdunet_jax import models

    model = models.build_model(config.model)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    onnx_model = export_model(model, variables, config.data.image_size)
    metadata = {
        "checkpoint_step": str(int(state.step)),
        "config_name": str(config.get("name", "")),
        "input": _input_contract(config.data.image_size),
        "hu_window": ",".join(str(float(value)) for value in config.data.hu_window),
        "threshold": str(float(config.eval.threshold)),
    }
    _onnx().helper.set_model_props(onnx_model, metadata)
    return onnx_model


def runtime_model(config, state) -> OnnxRuntimeModel:
    """`state` exported and loaded into ONNX Runtime (`eval.runtime='onnxruntime'`)."""
    return OnnxRuntimeModel(export_state(config, state), int(state.step), state.loss)


def export_workdir(config, workdir, output, overwrite: bool = False, checkpoint_step: int | None = None):
    """Writes the ONNX model of `workdir`'s checkpoint (the one `--mode evaluate` takes) to `output`."""
    from rdunet_jax import evaluate

    if not output:
        raise UserError("--mode=export needs --output, the .onnx file to write")
    output = pathlib.Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"--output: {output} is not a .onnx file name")
    if not output.parent.is_dir():
        raise UserError(f"--output: the folder {output.parent} does not exist")
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder, not a file")
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} exists; pass --overwrite to replace it")
    _onnx()
    state = evaluate.restore_for_evaluation(config, workdir, checkpoint_step)
    path = save(export_state(config, state), output)
    print(
        f"{path}: ONNX (opset {OPSET}) of checkpoint step {int(state.step)}; input "
        f"{_input_contract(config.data.image_size)}, outputs {', '.join(OUTPUT_NAMES)}",
        flush=True,
    )
    return path
