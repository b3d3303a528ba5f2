"""ONNX export of a trained model: the forward pass as an ONNX graph, for ONNX Runtime (the fastest CPU
inference we measured) and other tools that read ONNX.

The graph is translated from the model's traced program (its jaxpr), primitive by primitive, so every
configuration of `models.RDUNet` (the paper's baselines included) exports without a second copy of the
architecture; the parameters and BatchNorm statistics are folded into constants. The input is NHWC like the
model's (`images`, float32 in [0, 1], any batch size); the outputs are `logits` and `probabilities`.
The translator is onnx_graph.py; onnx_runtime.py runs the export as a Predictor.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import config_lib, files, inference, orientation, steps
from rdunet_jax.errors import UserError
from rdunet_jax.onnx_graph import INPUT_NAME, OPSET, OUTPUT_NAMES, GraphBuilder, import_onnx

# The ONNX node that turns each head's logits into its probabilities (heads.activate).
ACTIVATION_NODES = {
    "binary": ("Sigmoid", {}),
    "multilabel": ("Sigmoid", {}),
    "exclusive": ("Softmax", {"axis": -1}),
}


def export_function(function, image_shape, graph_name: str = "rdunet", head: str = "binary"):
    """The ONNX model of `function` (NHWC float32 images -> logits), its batch size left free; the
    probabilities are the logits through the `head`'s activation."""
    onnx = import_onnx()
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(function)(images)
    builder = GraphBuilder(batch)
    (logits,) = builder.run(closed.jaxpr, closed.consts, [INPUT_NAME])
    logits = builder.tensor(logits, np.float32)
    builder.node("Identity", [logits], OUTPUT_NAMES[0])
    operator, attributes = ACTIVATION_NODES[head]
    builder.node(operator, [OUTPUT_NAMES[0]], OUTPUT_NAMES[1], **attributes)
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


def export_model(model, variables, image_size: int, head: str = "binary"):
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
        lambda images: plain.apply(variables, images, train=False), (image_size, image_size, 1), head=head
    )


def save(onnx_model, path) -> pathlib.Path:
    """Writes the model to `path` atomically (a temporary file renamed into place)."""
    files.write_bytes_atomic(path, onnx_model.SerializeToString())
    return pathlib.Path(path)


def note_float32_export(config, advice: str = "") -> None:
    """Says on stderr, for a `model.dtype=bfloat16` config, that its export computes in float32."""
    if config.model.get("dtype", "float32") == "bfloat16":
        print(
            "note: model.dtype=bfloat16, but the ONNX export computes in float32: its probabilities differ "
            "from JAX's bfloat16 ones by bfloat16's rounding, enough to flip pixels near the threshold"
            + advice,
            file=sys.stderr,
            flush=True,
        )


def _input_contract(image_size: int) -> str:
    return f"{INPUT_NAME} (batch, {image_size}, {image_size}, 1) float32 in [0, 1]"


def export_state(config, model, state):
    """The ONNX model of a restored train state of `model` (built from `config.model`), with what its input
    must be in its metadata."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    head = config.model.get("head", "binary")
    onnx_model = export_model(model, variables, config.data.image_size, head)
    metadata = {
        "checkpoint_step": str(int(state.step)),
        "config_name": str(config.get("name", "")),
        "input": _input_contract(config.data.image_size),
        "hu_window": ",".join(str(float(value)) for value in config.data.hu_window),
        "threshold": str(float(config.eval.threshold)),
        "head": head,
        "classes": ",".join(config.data.get("classes", ("lesion",))),
        # What each channel of `probabilities` is: an exclusive head's softmax puts the background first.
        "probability_channels": ",".join(
            (("background",) if head == "exclusive" else ()) + tuple(config.data.get("classes", ("lesion",)))
        ),
        # How a volume's slices are turned before the model sees them (prediction does it; see the docs).
        "slice_orientation": orientation.model_orientation(config.data),
    }
    import_onnx().helper.set_model_props(onnx_model, metadata)
    return onnx_model


def export_workdir(config, workdir, output, overwrite: bool = False, checkpoint_step: int | None = None):
    """Writes the ONNX model of `workdir`'s checkpoint to `output` (`--mode export`) and returns its path.

    Args: `config`, the run's config; `workdir`, the run folder; `output`, the `.onnx` file to write (its
    folder must exist); `overwrite`, replace an existing `output` (refused otherwise); `checkpoint_step`,
    that step instead of the `eval.checkpoint` (best or last) that `--mode evaluate` takes. Every check on
    `output` comes before the checkpoint is restored.
    """
    if not output:
        raise UserError("--mode=export needs --output, the .onnx file to write")
    output = pathlib.Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"--output: {output} is not a .onnx file name")
    if files.existing_folder(output.parent, "--output") != output.parent:
        raise UserError(f"--output: the folder {output.parent} does not exist")
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder, not a file")
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} exists; pass --overwrite to replace it")
    files.check_writable(output.parent, "--output")
    import_onnx()
    config_lib.check_run_data(config, workdir, "export")
    model = inference.build_model(config)
    state = steps.restore_state(config, workdir, checkpoint_step, model=model)
    path = save(export_state(config, model, state), output)
    print(
        f"{path}: ONNX (opset {OPSET}) of checkpoint step {int(state.step)}; input "
        f"{_input_contract(config.data.image_size)}, outputs {', '.join(OUTPUT_NAMES)}",
        flush=True,
    )
    note_float32_export(config)
    return path
