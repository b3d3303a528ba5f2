"""ONNX export: the exported graph computes the model's function (every paper variant, any batch size),
BatchNorm and ReLU fold into the convolutions, and the export command and runtime option work end to end."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import linen as nn
from helpers import make_tiny_config
from PIL import Image

from rdunet_jax import (
    checkpoints,
    config_lib,
    config_validation,
    evaluate,
    inference,
    models,
    onnx_export,
    onnx_runtime,
    predict,
    predictors,
    steps,
)
from rdunet_jax.errors import UserError

SIZE = 32
# Tiny-model stand-ins for the paper's schedules (the tiny config has 3 levels, 2 skips).
TINY_SCHEDULES = {"skip_dilation_rates": ((1, 2, 1), (2, 3)), "encoder_dilation_rates": (3, 2, 1)}


def _variant_model(variant: str, **overrides) -> models.RDUNet:
    config = config_lib.apply_model_variant(make_tiny_config(), variant)
    for key, value in TINY_SCHEDULES.items():
        if config.model[key]:
            config.model[key] = value
    config.model.update(overrides)
    return models.build_model(config.model)


def _trained_looking_variables(model, seed=0):
    """Initial variables with BatchNorm scales, biases and running statistics moved off their initial
    values, so that folding them into the convolutions is exercised."""
    rng = np.random.default_rng(seed)
    shifts = {
        "mean": lambda x: x + 0.05 * rng.standard_normal(x.shape),
        "var": lambda x: x * rng.uniform(0.5, 2.0, x.shape),
        "scale": lambda x: x * rng.uniform(0.5, 1.5, x.shape),
        "bias": lambda x: x + 0.05 * rng.standard_normal(x.shape),
    }

    def shift(path, leaf):
        change = shifts.get(path[-1].key)
        return leaf if change is None else np.asarray(change(np.asarray(leaf)), np.float32)

    return jax.tree_util.tree_map_with_path(shift, models.initialize_variables(model, SIZE, seed))


def _session(onnx_model):
    return onnx_runtime.OnnxRuntimePredictor(onnx_model, step=0).session


def _images(batch, seed=1):
    return np.random.default_rng(seed).random((batch, SIZE, SIZE, 1), np.float32)


def _assert_close(ours, reference):
    scale = float(np.abs(reference).max())
    assert scale > 1e-3  # a network that outputs zeros would match anything
    np.testing.assert_allclose(ours, reference, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("variant", sorted(config_lib.MODEL_VARIANTS))
def test_every_variant_exports_its_function_at_any_batch_size(variant):
    model = _variant_model(variant)
    variables = _trained_looking_variables(model)
    session = _session(onnx_export.export_model(model, variables, SIZE))
    for batch in (1, 3):
        images = _images(batch)
        logits, probabilities = session.run(None, {"images": images})
        reference = np.asarray(model.apply(variables, images, train=False))
        assert logits.shape == probabilities.shape == (batch, SIZE, SIZE, 1)
        _assert_close(logits, reference)
        np.testing.assert_allclose(probabilities, jax.nn.sigmoid(reference), atol=1e-6)


def test_the_paper_width_model_exports_its_function_at_256_px():
    """The full default config (RDU-net, 16 feature maps, 4 levels, the paper's DC schedules) at 256x256,
    batch 1, BatchNorm statistics perturbed and the 1x1 head rescaled so that the logits spread over about
    +-6, as after training: a fresh head's logits sit within 0.1 of 0, where sigmoid hides any error."""
    config = config_lib.base_config()
    model = models.build_model(config.model)
    variables = _trained_looking_variables(model)  # the parameters' shapes do not depend on the image size
    images = np.random.default_rng(1).random((1, 256, 256, 1), np.float32)
    forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    fresh = np.asarray(forward(variables, images))
    head = variables["params"]["Conv_0"]
    gain = 12.0 / float(fresh.max() - fresh.min())
    head = {"kernel": head["kernel"] * gain, "bias": (head["bias"] - float(fresh.mean())) * gain}
    variables = {**variables, "params": {**variables["params"], "Conv_0": head}}
    reference = np.asarray(forward(variables, images))
    assert reference.min() < -4 and reference.max() > 4
    logits, probabilities = _session(onnx_export.export_model(model, variables, 256)).run(
        None, {"images": images}
    )
    _assert_close(logits, reference)
    # Observed 3.3e-6 to 3.5e-6 (logits 1.6e-5): float32 rounding through 4 levels of folded convolutions.
    np.testing.assert_allclose(probabilities, jax.nn.sigmoid(reference), atol=1e-5, rtol=0)


def test_batchnorm_and_relu_fold_into_the_convolutions():
    model = _variant_model("rdunet")
    graph = onnx_export.export_model(model, _trained_looking_variables(model), SIZE).graph
    op_types = [node.op_type for node in graph.node]
    # 5 residual blocks (3 encoder, 2 decoder) of two 3x3 convs and a 1x1 shortcut (every block changes
    # the width), 5 DC-module convs, the 1x1 head: one Conv each, BatchNorm's subtraction and scaling
    # folded into it, and no Max (ReLU) left beside it.
    assert op_types.count("Conv") == 5 * 3 + 5 + 1
    assert "Sub" not in op_types and "Max" not in op_types and "Expand" not in op_types
    assert op_types.count("Resize") == 2 and op_types.count("MaxPool") == 2
    # Each residual block's SE unit: two dense layers, as MatMul, which every ONNX runtime has (not Einsum).
    assert op_types.count("MatMul") == 5 * 2 and "Einsum" not in op_types


def test_training_speed_options_export_the_same_function():
    """bfloat16, jax.image.resize, space-to-batch dilation and reshape pooling export in float32 with the
    plain forms; the parameter tree is the same, so the graph matches the plain float32 model."""
    plain = _variant_model("rdunet")
    variables = _trained_looking_variables(plain)
    fast = _variant_model(
        "rdunet",
        dtype="bfloat16",
        upsample_impl="resize",
        dilation_impl="space_to_batch",
        pool_impl="reshape",
        remat=True,
    )
    images = _images(2)
    exported = onnx_export.export_model(fast, variables, SIZE)
    logits, _ = _session(exported).run(None, {"images": images})
    _assert_close(logits, np.asarray(plain.apply(variables, images, train=False)))
    # jax.image.resize would export as constant weights and Einsum, which not every ONNX runtime has.
    op_types = [node.op_type for node in exported.graph.node]
    assert op_types.count("Resize") == 2 and "Einsum" not in op_types


def _export(function, shape=(8, 8, 3)):
    return _session(onnx_export.export_function(function, shape))


def test_a_folded_convolution_keeps_its_plain_output_for_other_consumers():
    kernel = np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32)
    scale = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 1, 4)
    spatial = np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(1, 8, 1, 1)

    def function(images):
        convolved = jax.lax.conv_general_dilated(
            images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        per_channel = nn.relu(convolved * scale - 0.5)  # folds into the Conv
        per_row = convolved * spatial  # varies along height: must not fold
        return jax.lax.slice_in_dim(per_channel + per_row + convolved, 0, 1, axis=3)

    images = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    logits, _ = _export(function).run(None, {"images": images})
    _assert_close(logits, np.asarray(function(images)))


def test_batched_matrix_products_and_transposes_translate():
    weights = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)

    def function(images):  # (N, 2, 4, 3) x (2, 3, 5), batched over the 2 -> (2, N, 4, 5) -> (N, 2, 4, 1)
        product = jax.lax.dot_general(images, weights, (((3,), (1,)), ((1,), (0,))))
        return jax.lax.slice_in_dim(jnp.transpose(product, (1, 0, 2, 3)), 0, 1, axis=3)

    images = np.random.default_rng(1).standard_normal((3, 2, 4, 3)).astype(np.float32)
    session = _export(function, (2, 4, 3))
    _assert_close(session.run(None, {"images": images})[0], np.asarray(function(images)))


def _conv(images, kernel):
    return jax.lax.conv_general_dilated(
        images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


ONE_CHANNEL_KERNEL = np.random.default_rng(2).standard_normal((3, 3, 3, 1)).astype(np.float32)
FOUR = np.arange(1, 5, dtype=np.float32)
FOUR_CHANNEL_KERNEL = np.random.default_rng(3).standard_normal((3, 3, 3, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "function",
    [
        # JAX broadcasts size-1 axes itself: the result is larger than the tensor operand.
        lambda x: x.sum(axis=1, keepdims=True) * jnp.ones_like(x),
        lambda x: jnp.zeros(x.shape) + x.sum(axis=2, keepdims=True),
        # Into the batch axis, whose size is only known at run time.
        lambda x: jnp.broadcast_to(x.sum(axis=0), x.shape),
        # A constant with more channels than the convolution: not a bias or scale of it.
        lambda x: _conv(x, ONE_CHANNEL_KERNEL) * FOUR,
        lambda x: _conv(x, ONE_CHANNEL_KERNEL) + jnp.broadcast_to(FOUR, (8, 8, 4)),
        lambda x: jnp.broadcast_to(_conv(x, ONE_CHANNEL_KERNEL), x.shape[:3] + (4,)),
        # A slice to the end of the batch axis, its limit computed anew.
        lambda x: jax.lax.slice(x, (0, 0, 0, 0), (x.shape[0] + 1 - 1, 8, 8, 2)),
    ],
    ids=[
        "sum_times_ones",
        "zeros_plus_sum",
        "batch_broadcast",
        "conv_times_wider",
        "conv_plus_wider",
        "conv_broadcast",
        "recomputed_limit",
    ],
)
def test_broadcasting_results_come_out_at_their_full_shape(function):
    images = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    reference = np.asarray(function(images))
    logits, _ = _export(function).run(None, {"images": images})
    assert logits.shape == reference.shape
    _assert_close(logits, reference)


@pytest.mark.parametrize(
    "function",
    [
        lambda x: jnp.reshape(x, (x.shape[0], 8, 4, 6)),
        lambda x: jnp.squeeze(jax.lax.slice_in_dim(x, 1, 2, axis=3), axis=3)[..., None],
        lambda x: x.astype(jnp.float16).astype(jnp.float32),
        lambda x: jnp.stack([x, 2 * x], axis=3).reshape(x.shape[0], 8, 8, 6),
        lambda x: jnp.max(x, axis=(2, 3), keepdims=True) * jnp.ones_like(x),
        lambda x: jnp.copy(x) - 2 * x,
        # To a shape without the batch axis: a static shape tensor.
        lambda x: x + jnp.broadcast_to(x.sum(axis=(0, 3))[:, :, None], (8, 8, 3)),
        # Reductions whose result is the output itself, without JAX's keepdims reshape after them.
        lambda x: jnp.sum(x, axis=3),
        lambda x: jnp.max(x, axis=3),
        # Max-pooling with a 3x3 window at stride 1: its spatial axes are those of the window.
        lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"),
        # A 2x2 window at stride 1: padded after, not before; and a dilated window.
        lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME"),
        lambda x: jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID", window_dilation=(1, 2, 2, 1)
        ),
        # A maximum with a constant other than ReLU's 0, and a convolution scaled and shifted by scalars.
        lambda x: jnp.maximum(x, 0.5),
        lambda x: _conv(x, ONE_CHANNEL_KERNEL) * 2.5 + 0.5,
        # Per-channel division and subtraction folded into a convolution, then ReLU: no model divides.
        lambda x: jax.nn.relu(_conv(x, FOUR_CHANNEL_KERNEL) / FOUR - FOUR / 8),
        # The reciprocal square root of a tensor: BatchNorm in evaluation mode takes it of constants only.
        lambda x: jax.lax.rsqrt(x * x + 0.5),
        # A constant too large to fold (over 65,536 elements) kept at size-1 axes, then concatenated, which
        # does not broadcast: it must be materialized at its full shape.
        lambda x: jnp.concatenate([x, jnp.ones((350, 8, 8, 3)) * 2.0], axis=0),
    ],
    ids=[
        "reshape",
        "squeeze",
        "convert_element_type",
        "stack",
        "reduce_max",
        "copy",
        "static_shape",
        "reduce_sum_output",
        "reduce_max_output",
        "max_pool_stride_1",
        "max_pool_padded_after",
        "max_pool_dilated",
        "maximum_not_relu",
        "conv_scalar_affine",
        "conv_divided_minus_relu",
        "rsqrt_of_a_tensor",
        "large_constant_concatenated",
    ],
)
def test_primitives_no_model_variant_emits_translate_too(function):
    """Translations the models of this JAX version never exercise (primitives, each named by its id, static
    shape tensors, pooling forms, folding by division), so that a model that does is exported right."""
    images = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    reference = np.asarray(function(images))
    logits, _ = _export(function).run(None, {"images": images})
    assert logits.shape == reference.shape
    _assert_close(logits, reference)


def test_an_unsupported_primitive_is_named():
    with pytest.raises(NotImplementedError, match="'cumsum'"):
        onnx_export.export_function(lambda images: jnp.cumsum(images, axis=1), (8, 8, 1))


@pytest.mark.parametrize(
    "function, message",
    [
        (lambda x: jax.lax.slice(x, (0, 0, 0, 0), (x.shape[0] - 1, 8, 8, 1)), "ending inside a symbolic"),
        (
            lambda x: jax.lax.slice(x, (x.shape[0] - 1, 0, 0, 0), (x.shape[0], 8, 8, 1)),
            "starting at a symbolic",
        ),
    ],
    ids=["end", "start"],
)
def test_a_slice_of_the_batch_axis_by_its_size_is_refused_by_name(function, message):
    with pytest.raises(NotImplementedError, match=f"^a slice {message} (dimension|index)$"):
        onnx_export.export_function(function, (8, 8, 1))


@pytest.mark.parametrize(
    "function, message",
    [
        (
            lambda x: jnp.reshape(x[:, None] * x[None, :], (x.shape[0], x.shape[0], 64)).sum(1)[
                ..., None, None
            ],
            r"a shape with more than one symbolic dimension: \(batch, batch, 64\)",
        ),
        (
            lambda x: jax.lax.reduce_window(
                x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID", base_dilation=(1, 2, 2, 1)
            ),
            "max-pooling with base dilation",
        ),
        (
            lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 2), (1, 2, 2, 2), "VALID"),
            r"max-pooling that is not over the spatial axes of an \(N, C\) layout",
        ),
    ],
    ids=["two_symbolic_dimensions", "base_dilation", "pooling_three_axes"],
)
def test_what_onnx_cannot_express_is_refused_by_name(function, message):
    with pytest.raises(NotImplementedError, match=f"^{message}$"):
        onnx_export.export_function(function, (8, 8, 1))


def _runtime(config, state):
    return onnx_runtime.OnnxRuntimePredictor.from_state(config, models.build_model(config.model), state)


def test_onnxruntime_flips_match_the_jax_evaluation(tiny_state):
    config = make_tiny_config()
    runtime = _runtime(config, tiny_state)
    images = _images(4)
    for flips in (False, True):
        reference = np.asarray(inference.JaxPredictor(tiny_state).probabilities(images, flips))
        np.testing.assert_allclose(runtime.probabilities(images, flips), reference, atol=1e-5)
    assert runtime.step == int(tiny_state.step)


def test_onnxruntime_batches_give_the_jax_losses_and_probabilities(tiny_state):
    config = make_tiny_config()
    runtime = _runtime(config, tiny_state.replace(loss="dice_bce"))
    jax_predictor = inference.JaxPredictor(tiny_state.replace(loss="dice_bce"))
    images = _images(4)
    masks = (images > 0.7).astype(np.float32)
    batch = {"image": images, "mask": masks}
    for flips in (False, True):
        loss, probabilities = runtime.loss_and_probabilities(batch, flips)
        expected_loss, expected_probabilities = jax_predictor.loss_and_probabilities(batch, flips)
        assert loss.shape == (4,) and probabilities.shape == (4, SIZE, SIZE, 1)
        np.testing.assert_allclose(loss, expected_loss, atol=1e-5)
        np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    plain_loss, _ = _runtime(config, tiny_state).loss_and_probabilities(batch)
    assert np.all(plain_loss != loss)  # the state's loss, not a default one
    np.testing.assert_allclose(runtime.logits(images), jax_predictor.logits(images), atol=1e-5)


def test_eval_runtime_picks_the_predictor(tiny_state, capfd):
    config = make_tiny_config()
    model = models.build_model(config.model)
    assert type(predictors.for_config(config, model, tiny_state)) is inference.JaxPredictor
    config.eval.runtime = "onnxruntime"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown provider is only a warning, and a fall-back
        runtime = predictors.for_config(config, model, tiny_state)
    assert type(runtime) is onnx_runtime.OnnxRuntimePredictor
    # ONNX Runtime's own log goes to file descriptor 2: errors only, not a warning per unused initializer.
    assert capfd.readouterr() == ("", "")
    # On the CPU (an onnxruntime-gpu install would otherwise pick its GPU), one thread per physical core.
    assert runtime.session.get_providers() == ["CPUExecutionProvider"]
    options = runtime.session.get_session_options()
    assert (options.intra_op_num_threads, options.log_severity_level) == (0, 3)
    # A bfloat16 model is told that ONNX Runtime scores its float32 version, not what training validated.
    config.model.dtype = "bfloat16"
    predictors.for_config(config, models.build_model(config.model), tiny_state)
    assert capfd.readouterr().err.startswith(
        "note: model.dtype=bfloat16, but the ONNX export computes in float32"
    )


def test_evaluation_with_onnxruntime_writes_the_jax_metrics(tiny_state, tmp_path):
    config = make_tiny_config()
    expected = evaluate.evaluate_state(inference.JaxPredictor(tiny_state), config, tmp_path / "jax", "test")
    summary = evaluate.evaluate_state(_runtime(config, tiny_state), config, tmp_path / "onnx", "test")
    assert summary["step"] == expected["step"] and summary["num_slices"] == expected["num_slices"]
    for key in ("dice", "jaccard", "precision", "recall", "global_dice", "loss"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-4), key


def test_evaluate_workdir_with_onnxruntime_scores_the_checkpoint_as_jax_does(tiny_state, tmp_path):
    # The command-line path: the restored model and state are exported, not only handed to JAX.
    config = make_tiny_config()
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    run_checkpoints.save("best", 1, tiny_state, {"epoch": 1, "model": checkpoints.architecture(config.model)})
    run_checkpoints.close()
    expected = evaluate.evaluate_state(inference.JaxPredictor(tiny_state), config, tmp_path / "jax", "test")
    config.eval.runtime = "onnxruntime"
    summary = evaluate.evaluate_workdir(config, tmp_path)
    assert summary["step"] == expected["step"] and summary["num_slices"] == expected["num_slices"]
    for key in ("dice", "jaccard", "global_dice", "loss"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-4), key


def test_predict_with_onnxruntime_writes_the_masks_jax_writes(tiny_state, tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for name, size in {"a.png": (40, 60), "b.png": (32, 32)}.items():
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(tmp_path / "in" / name)
    config = make_tiny_config()
    config.eval.threshold = 0.49  # untrained: probabilities sit near 0.5; keep the masks non-trivial
    jax_predictor = inference.JaxPredictor(tiny_state)
    predict.predict_path(config, None, tmp_path / "in", tmp_path / "jax", predictor=jax_predictor)
    runtime = _runtime(config, tiny_state)
    predict.predict_path(config, None, tmp_path / "in", tmp_path / "onnx", predictor=runtime)
    for stem in ("a", "b"):
        ours = np.asarray(Image.open(tmp_path / "onnx" / f"{stem}_mask.png"))
        theirs = np.asarray(Image.open(tmp_path / "jax" / f"{stem}_mask.png"))
        assert ours.shape == theirs.shape
        assert np.mean(ours == theirs) > 0.99


def test_onnxruntime_without_the_extra_is_refused_before_training(monkeypatch):
    config = make_tiny_config()
    config.eval.runtime = "onnxruntime"
    config_validation.validate(config)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name)
    )
    with pytest.raises(UserError, match=r"eval.runtime: 'onnxruntime' needs onnxruntime, not installed"):
        config_validation.validate(config)


def test_export_without_the_onnx_extra_is_refused_before_restoring_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # `import onnx` raises ImportError
    monkeypatch.setattr(steps, "restore_state", pytest.fail)
    with pytest.raises(UserError) as refused:
        onnx_export.export_workdir(make_tiny_config(), tmp_path, tmp_path / "model.onnx")
    assert str(refused.value) == "ONNX export needs the onnx package: pip install -e '.[onnx]'"
    assert not (tmp_path / "model.onnx").exists()


def test_a_bad_runtime_is_a_config_error():
    config = make_tiny_config()
    config.eval.runtime = "tensorrt"
    with pytest.raises(UserError, match="eval.runtime: must be 'jax' or 'onnxruntime', got 'tensorrt'"):
        config_validation.validate(config)


@pytest.mark.parametrize(
    "output, message",
    [
        ("model.txt", "is not a .onnx file name"),
        ("missing/model.onnx", "does not exist"),
        ("existing.onnx", "exists; pass --overwrite"),
        ("folder.onnx", "is a folder, not a file"),
    ],
)
def test_bad_export_outputs_are_refused_before_restoring(tmp_path, monkeypatch, output, message):
    (tmp_path / "existing.onnx").write_bytes(b"kept")
    (tmp_path / "folder.onnx").mkdir()
    monkeypatch.setattr(steps, "restore_state", pytest.fail)
    with pytest.raises(UserError, match=message):
        onnx_export.export_workdir(
            make_tiny_config(), tmp_path, tmp_path / output, overwrite="folder" in output
        )
    assert (tmp_path / "existing.onnx").read_bytes() == b"kept"


def test_export_writes_metadata_and_replaces_only_with_overwrite(tiny_state, tmp_path, monkeypatch, capfd):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    architecture = {"model": checkpoints.architecture(make_tiny_config().model)}
    run_checkpoints.save("best", 1, tiny_state, architecture)
    run_checkpoints.save("latest", 3, tiny_state.replace(step=tiny_state.step + 3), architecture)
    run_checkpoints.close()
    built = []
    build_model = models.build_model
    monkeypatch.setattr(
        models,
        "build_model",
        lambda config, *classes: built.append(1) or build_model(config, *classes),
    )
    config = make_tiny_config()
    path = onnx_export.export_workdir(config, tmp_path, tmp_path / "model.onnx")
    assert len(built) == 1  # one model, restored into and exported
    model = onnx.load(path)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["checkpoint_step"] == str(int(tiny_state.step))  # the best checkpoint, as evaluation
    assert metadata["input"] == "images (batch, 32, 32, 1) float32 in [0, 1]"
    # What a deployment must do to its input and output, from the run's config.
    assert (metadata["config_name"], metadata["hu_window"]) == ("demo_tiny", "-1350.0,150.0")
    assert (metadata["threshold"], metadata["head"]) == ("0.5", "binary")
    # IR 8, which every ONNX Runtime since 1.14 reads; the batch one free dimension of input and outputs.
    assert model.ir_version == 8
    declared = {
        entry.name: [dim.dim_param or dim.dim_value for dim in entry.type.tensor_type.shape.dim]
        for entry in (*model.graph.input, *model.graph.output)
    }
    assert declared == {name: ["batch", 32, 32, 1] for name in ("images", "logits", "probabilities")}
    chosen = onnx_export.export_workdir(config, tmp_path, tmp_path / "step3.onnx", checkpoint_step=3)
    chosen_metadata = {prop.key: prop.value for prop in onnx.load(chosen).metadata_props}
    assert chosen_metadata["checkpoint_step"] == str(int(tiny_state.step) + 3)
    chosen.unlink()
    assert capfd.readouterr().err == ""  # float32: nothing to note
    bfloat16 = make_tiny_config()
    bfloat16.model.dtype = "bfloat16"
    onnx_export.export_workdir(bfloat16, tmp_path, tmp_path / "bf16.onnx")
    assert capfd.readouterr().err == (
        "note: model.dtype=bfloat16, but the ONNX export computes in float32: its probabilities differ from "
        "JAX's bfloat16 ones by bfloat16's rounding, enough to flip pixels near the threshold\n"
    )
    (tmp_path / "bf16.onnx").unlink()
    assert metadata["probability_channels"] == "lesion" and metadata["slice_orientation"] == "PL"  # phantom
    # An exclusive head's softmax channels start with the background; the orientation is the data's.
    config.model.head, config.data.classes, config.data.orientation = (
        "exclusive",
        ("ggo", "consolidation"),
        "AR",
    )
    exclusive_model = models.build_model(config.model, config.data.classes)
    exclusive_state = steps.create_train_state(config, exclusive_model, steps_per_epoch=1)
    exclusive = onnx_export.export_state(config, exclusive_model, exclusive_state)
    metadata = {prop.key: prop.value for prop in exclusive.metadata_props}
    assert metadata["classes"] == "ggo,consolidation"
    assert metadata["probability_channels"] == "background,ggo,consolidation"
    assert metadata["slice_orientation"] == "AR"
    config = make_tiny_config()
    assert [entry.name for entry in model.graph.output] == ["logits", "probabilities"]
    with pytest.raises(UserError, match="exists"):
        onnx_export.export_workdir(config, tmp_path, path)
    onnx_export.export_workdir(config, tmp_path, path, overwrite=True)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoints", "model.onnx"]  # no temporary


@pytest.mark.parametrize(
    "head, classes, loss",
    [("exclusive", ("ggo", "consolidation"), "dice_ce"), ("multilabel", ("lungs", "infection"), "dice_bce")],
)
def test_onnxruntime_gives_the_jax_probabilities_and_losses_of_each_head(head, classes, loss):
    """The export's `probabilities` output is the head's activation (softmax over channels for
    'exclusive'), and the evaluation loss reads the class labels."""
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = head, classes, loss
    model = models.build_model(config.model, classes)
    state = steps.create_train_state(config, model, steps_per_epoch=1)
    # Logits of a few units, so the probabilities spread over (0, 1) and a wrong activation shows.
    params = jax.tree_util.tree_map(np.asarray, state.params)
    params["Conv_0"]["kernel"] = params["Conv_0"]["kernel"] * 300.0
    state = state.replace(params=params)
    runtime = onnx_runtime.OnnxRuntimePredictor.from_state(config, model, state)
    jax_predictor = inference.JaxPredictor(state)
    images = _images(4)
    if head == "exclusive":
        labels = np.minimum((images * 3).astype(np.int32), 2)  # (N, S, S, 1) label map 0..2
    else:
        labels = np.concatenate([images > 0.3, images > 0.7], axis=-1).astype(np.int32)
    batch = {"image": images, "mask": np.zeros_like(images), "labels": labels}
    loss, probabilities = runtime.loss_and_probabilities(batch)
    expected_loss, expected_probabilities = jax_predictor.loss_and_probabilities(batch)
    channels = len(classes) + (head == "exclusive")
    assert probabilities.shape == (4, SIZE, SIZE, channels)
    assert np.std(expected_probabilities) > 0.05
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, atol=1e-5)
    if head == "exclusive":
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
