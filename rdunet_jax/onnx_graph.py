"""The translator behind the ONNX export: a jaxpr walked primitive by primitive into ONNX nodes, with the
per-channel affine maps (BatchNorm in evaluation mode) and ReLUs folded into the convolutions before them.
"""

import copy

import jax.numpy as jnp
import numpy as np

from rdunet_jax.errors import UserError

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
# Constants up to this many elements are materialised when folded; larger broadcasts stay rank-expanded
# and rely on ONNX broadcasting (a BatchNorm scale must not become an activation-sized initializer).
_MAX_FOLDED_ELEMENTS = 1 << 16
_INT64_MAX = np.iinfo(np.int64).max


def import_onnx():
    """The onnx package, or a UserError naming the extra that installs it."""
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


class GraphBuilder:
    """Accumulates ONNX nodes and initializers while walking a jaxpr."""

    def __init__(self, batch_size=None):
        self.onnx = import_onnx()
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
            return [self.upsample(values[0])]
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

    def upsample(self, value) -> str:
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
