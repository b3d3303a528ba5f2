"""The Flax model against the independent numpy reference of tests/reference_model.py (issue 23).

Every comparison runs on random inputs and random, non-default variables (every BatchNorm scale, bias,
running mean and variance perturbed), so that a wrong wiring cannot hide behind an identity BatchNorm or a
constant image. The structure checks read the traced program (jaxpr) of the model.
"""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_model as reference
from helpers import assert_running_stats_as_the_reference, init_variables
from scipy import ndimage

from rdunet_jax import config_lib, config_validation, inference, layers, models

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
VARIANTS = sorted(config_lib.MODEL_VARIANTS)


def _model_config(variant: str, **overrides):
    """A paper variant at small widths (4 feature maps, the paper's depth and schedules), plus overrides."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    config.model.features = 4
    config.model.update(overrides)
    config_validation.validate(config)
    return config.model


# Non-paper schedules: another depth, widths, SE reduction, DC rates (one skip left plain) and encoder rates.
OTHER_SCHEDULES = {
    "rdunet_depth3": (
        "rdunet",
        dict(features=6, depth=3, se_reduction=2, skip_dilation_rates=((3, 1, 2), (), (1, 4))),
    ),
    "resdunet_depth3": (
        "resdunet",
        dict(features=8, depth=3, se_reduction=4, encoder_dilation_rates=(1, 3, 2, 2)),
    ),
    "unet_depth2": ("unet", dict(features=5, depth=2)),
}


def _perturbed(variables, seed: int):
    """`variables` with every bias, BatchNorm scale and running statistic replaced by random values."""
    rng = np.random.default_rng(seed)
    draws = {
        "kernel": lambda leaf: np.asarray(leaf),  # already random (LeCun normal)
        "bias": lambda leaf: rng.normal(0.0, 0.3, leaf.shape),
        "scale": lambda leaf: rng.uniform(0.5, 1.5, leaf.shape),
        "mean": lambda leaf: rng.normal(0.0, 0.5, leaf.shape),
        "var": lambda leaf: rng.uniform(0.25, 2.0, leaf.shape),
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(draws[path[-1].key](leaf), jnp.float32), variables
    )


def _images(size: int, seed: int = 0, channels: int = 1, batch: int = 2):
    """Random, spatially varying images: noise on a smooth gradient."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1.0, 1.0, size)[:, None] + np.linspace(0.0, 0.5, size)[None, :] ** 2
    return (rng.normal(size=(batch, size, size, channels)) + ramp[None, :, :, None]).astype(np.float32)


def _evaluation(model):
    """The model's evaluation forward pass, compiled once, at full float32 matmul precision."""
    apply = jax.jit(lambda variables, images: model.apply(variables, images, train=False))

    def logits(variables, images):
        with jax.default_matmul_precision("highest"):
            return np.asarray(apply(variables, images))

    return logits


def _assert_matches_reference(model_config, size: int, seed: int = 0):
    model = models.build_model(model_config)
    variables = _perturbed(models.initialize_variables(model, size, seed=seed), seed=seed + 1)
    images = _images(size, seed=seed + 2)
    want, reader = reference.forward(
        variables, images, reference.Architecture.from_config(model_config), return_reader=True
    )
    assert reader.unused() == []  # the Flax model holds no variable the paper's network lacks
    got = _evaluation(model)(variables, images)
    assert got.shape == want.shape == (2, size, size, 1)
    assert np.abs(want).max() > 0.1  # the logits carry signal, so the tolerance below is meaningful
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --- the whole network ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluation_forward_pass_equals_the_reference(variant):
    """Each paper variant with the config's default speed options, 32 px at the paper's depth."""
    _assert_matches_reference(_model_config(variant), size=32)


@pytest.mark.parametrize("name", sorted(OTHER_SCHEDULES))
def test_non_paper_schedules_equal_the_reference(name):
    variant, overrides = OTHER_SCHEDULES[name]
    _assert_matches_reference(_model_config(variant, **overrides), size=40, seed=3)


@pytest.mark.parametrize(
    "head, classes",
    [
        ("binary", ("lesion",)),
        ("exclusive", ("ggo", "consolidation")),
        ("multilabel", ("lungs", "infection", "vessel")),
    ],
)
def test_each_head_equals_the_reference_logits_and_probabilities(head, classes):
    """The model built for each `model.head` gives the reference network's logits with the head's number
    of channels, and `steps.eval_step` the reference's probabilities (logistic, or softmax over channels)."""
    model_config = _model_config("rdunet", head=head)
    model = models.build_model(model_config, classes)
    size = 32
    variables = _perturbed(models.initialize_variables(model, size, seed=5), seed=6)
    # Logits of a few units, so the probabilities spread over (0, 1) rather than sit near 0.5.
    variables["params"]["Conv_0"]["kernel"] = variables["params"]["Conv_0"]["kernel"] * 30.0
    images = _images(size, seed=7)
    outputs = reference.head_outputs(head, len(classes))
    want_logits = reference.forward(
        variables, images, reference.Architecture.from_config(model_config), outputs=outputs
    )
    want = reference.head_probabilities(want_logits, head)
    predictor = inference.JaxPredictor.from_variables(model, variables, head=head)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(predictor.probabilities(images))
    assert got.shape == want.shape == (2, size, size, outputs)
    assert want.std() > 0.1  # probabilities vary, so the comparison is meaningful
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("batch_norm_impl", config_lib.SPEED_OPTIONS["batch_norm_impl"].choices)
def test_training_forward_pass_normalises_by_the_batch_and_updates_running_averages(batch_norm_impl):
    """In training (dropout off), BatchNorm uses the batch's statistics and stores their running averages."""
    model_config = _model_config(
        "rdunet", dropout_rate=0.0, batch_norm_momentum=0.8, batch_norm_impl=batch_norm_impl
    )
    model = models.build_model(model_config)
    variables = _perturbed(models.initialize_variables(model, 32, seed=4), seed=5)
    images = _images(32, seed=6, batch=3)
    reader = reference.Variables(variables, training_momentum=0.8)
    want = reference.forward(reader, images, reference.Architecture.from_config(model_config))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    with jax.default_matmul_precision("highest"):
        got, updates = apply(variables, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert_running_stats_as_the_reference(updates["batch_stats"], reader)


@pytest.mark.parametrize("batch_norm_impl", config_lib.SPEED_OPTIONS["batch_norm_impl"].choices)
def test_a_frozen_batch_norm_trains_on_its_running_statistics_and_keeps_them(batch_norm_impl):
    """`model.batch_norm_frozen` (fine-tuning): in training, BatchNorm is its evaluation form, and dropout
    stays on."""
    model_config = _model_config("rdunet", dropout_rate=0.0, batch_norm_impl=batch_norm_impl)
    model_config.batch_norm_frozen = True
    variables = _perturbed(models.initialize_variables(models.build_model(model_config), 32, seed=4), seed=5)
    images = _images(32, seed=6, batch=3)
    want = reference.forward(variables, images, reference.Architecture.from_config(model_config))
    for dropout_rate in (0.0, 0.5):
        model_config.dropout_rate = dropout_rate
        model = models.build_model(model_config)
        apply = jax.jit(
            lambda v, x, model=model: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}
            )
        )
        with jax.default_matmul_precision("highest"):
            got, updates = apply(variables, images)
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"]
        )
        if dropout_rate:
            assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()  # dropout is not frozen
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# The speed options away from the config's defaults: each must compute the paper's network too.
OTHER_SPEED_FORMS = {
    "keyless": dict(config_lib.speed_options({}), dilation_impl="xla"),  # resize, reduce_window, nn.BatchNorm
    "space_to_batch": dict(dilation_impl="space_to_batch"),
    "remat": dict(remat=True, dilation_impl="space_to_batch", batch_norm_impl="flax"),
}


@pytest.mark.parametrize(
    "form, variant",
    [(form, variant) for form in ("keyless", "space_to_batch") for variant in ("rdunet", "resdunet")]
    + [("remat", "rdunet")],
)
def test_speed_options_equal_the_reference(form, variant):
    _assert_matches_reference(_model_config(variant, **OTHER_SPEED_FORMS[form]), size=32, seed=5)


def test_defaults_tested_above_are_the_fast_forms():
    """The variant tests run the config's defaults: stencil, reshape pooling, closed-form BatchNorm."""
    model_config = _model_config("rdunet")
    assert (model_config.upsample_impl, model_config.pool_impl, model_config.batch_norm_impl) == (
        "stencil",
        "reshape",
        "closed_form",
    )
    assert all(
        OTHER_SPEED_FORMS["keyless"][key] != model_config[key] for key in ("upsample_impl", "pool_impl")
    )


# --- blocks, on spatially varying inputs -------------------------------------------------------------


def _block_variables(module, x, seed: int, **kwargs):
    return _perturbed(init_variables(module, x, seed=seed, **kwargs), seed)


def _apply(module, variables, x, **kwargs):
    with jax.default_matmul_precision("highest"):
        return np.asarray(module.apply(variables, x, **kwargs))


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_squeeze_excitation_gates_by_the_channel_average():
    x = _images(12, seed=1, channels=16)
    x[..., :8] *= np.linspace(0.0, 3.0, 12)[None, :, None, None]  # means far from maxima
    module = models.SqueezeExcitation(reduction=4)
    variables = _block_variables(module, x, seed=2)
    got = _apply(module, variables, x)
    want = reference.squeeze_excitation(reference.Variables(variables), (), x, reduction=4)
    _assert_close(got, want)
    # The input separates average from max pooling: gates from the maxima give another output.
    by_max = reference.squeeze_excitation(reference.Variables(variables), (), x, reduction=4, pooling=np.max)
    assert np.abs(by_max - want).max() > 1e-2


@pytest.mark.parametrize("batch_norm_impl", config_lib.SPEED_OPTIONS["batch_norm_impl"].choices)
@pytest.mark.parametrize("in_channels, features, dilation", [(4, 4, 1), (3, 6, 2), (6, 6, 3)])
def test_residual_block_equals_the_reference(in_channels, features, dilation, batch_norm_impl):
    x = _images(14, seed=in_channels, channels=in_channels)
    module = models.ResidualBlock(
        features, models.make_layers(train=False, batch_norm_impl=batch_norm_impl), dilation_rate=dilation
    )
    variables = _block_variables(module, x, seed=features)
    want = reference.residual_block(reference.Variables(variables), (), x, features, dilation)
    _assert_close(_apply(module, variables, x), want)


@pytest.mark.parametrize("in_channels, features, dilation", [(3, 5, 1), (5, 5, 2)])
def test_plain_block_equals_the_reference(in_channels, features, dilation):
    x = _images(14, seed=7, channels=in_channels)
    module = models.ConvBlock(features, models.make_layers(train=False), dilation_rate=dilation)
    variables = _block_variables(module, x, seed=8)
    want = reference.plain_block(reference.Variables(variables), (), x, features, dilation)
    _assert_close(_apply(module, variables, x), want)


@pytest.mark.parametrize("dilation_impl", ["xla", "space_to_batch"])
@pytest.mark.parametrize("rates", [(1, 3, 2), (2, 4)])
def test_dilated_cascade_equals_the_reference(rates, dilation_impl):
    x = _images(17, seed=3, channels=4)
    module = models.DilatedCascade(rates, models.make_layers(train=False, dilation_impl=dilation_impl))
    variables = _block_variables(module, x, seed=4)
    want = reference.dilated_cascade(reference.Variables(variables), (), x, rates)
    _assert_close(_apply(module, variables, x), want)
    # The order of the rates matters for this input (a reversed cascade computes something else).
    reversed_order = reference.dilated_cascade(reference.Variables(variables), (), x, rates[::-1])
    assert np.abs(reversed_order - want).max() > 1e-2


@pytest.mark.parametrize("batch_norm_class", [layers.BatchNorm, nn.BatchNorm], ids=["closed_form", "flax"])
def test_batch_norm_evaluation_equals_the_reference(batch_norm_class):
    x = _images(6, seed=5, channels=3)
    module = batch_norm_class(use_running_average=True)
    variables = _block_variables(module, x, seed=6)
    stats, params = variables["batch_stats"], variables["params"]
    want = reference.batch_norm(x, params["scale"], params["bias"], stats["mean"], stats["var"])
    _assert_close(_apply(module, variables, x), want)


@pytest.mark.parametrize("upsample", [layers.upsample_bilinear, layers.upsample_bilinear_stencil])
def test_upsampling_equals_bilinear_with_half_pixel_centres(upsample):
    x = _images(5, seed=9, channels=3)[:, :, :4]  # 5x4: both axes, one odd
    _assert_close(np.asarray(upsample(x)), reference.upsample_bilinear_2x(x.astype(np.float64)))


def test_reference_upsampling_is_scipys_half_pixel_zoom_and_not_align_corners():
    line = np.array([0.0, 4.0, 8.0, 2.0])
    # By hand: centres at (o + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, ...; outside the image the edge repeats.
    np.testing.assert_allclose(reference.upsample_axis_weights(4) @ line, [0, 1, 3, 5, 7, 6.5, 3.5, 2])
    x = _images(6, seed=10, channels=2)[:1, :, :5].astype(np.float64)
    want = ndimage.zoom(x, (1, 2, 2, 1), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(reference.upsample_bilinear_2x(x), want, atol=1e-12)
    align_corners = ndimage.zoom(x, (1, 2, 2, 1), order=1, grid_mode=False, mode="nearest")
    assert np.abs(align_corners - want).max() > 0.1


@pytest.mark.parametrize(
    "pool",
    [layers.max_pool_reshape, lambda x: nn.max_pool(x, (2, 2), (2, 2))],
    ids=["reshape", "reduce_window"],
)
def test_max_pooling_equals_the_reference(pool):
    x = _images(8, seed=11, channels=3)
    np.testing.assert_array_equal(np.asarray(pool(x)), reference.max_pool_2x2(x))


# --- parameter counts by hand ------------------------------------------------------------------------


def _readme_parameter_counts() -> dict:
    """The README's table: variant -> 'parameters (ours)'."""
    rows = re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) \| [^|]+ \|$", README.read_text(), re.MULTILINE)
    return {variant: int(count.replace(",", "")) for variant, count in rows}


def _paper_architecture(variant: str, **overrides) -> reference.Architecture:
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    config.model.update(overrides)
    return reference.Architecture.from_config(config.model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_parameter_counts_follow_from_the_widths(variant):
    """The README's counts follow from the paper's widths layer by layer (test_models.py checks that the
    model has them)."""
    readme = _readme_parameter_counts()
    assert sorted(readme) == VARIANTS
    architecture = _paper_architecture(variant)
    assert (architecture.features, architecture.depth) == (16, 4)
    assert reference.parameter_count(architecture) == readme[variant]


def test_parameter_formula_by_hand_for_one_block():
    """The formula's pieces at a size small enough to add up in one's head."""
    architecture = reference.Architecture(2, 1, "residual", True, 2, ((1,),), ())
    # encoder 1->2: 3*3*1*2 + 4 + 3*3*2*2 + 4 + shortcut (2 + 4) + SE (2*1 + 1 + 1*2 + 2) = 18+4+36+4+6+7
    # encoder 2->4: 72 + 8 + 144 + 8 + (8 + 8) + SE (4*2 + 2 + 2*4 + 4) = 248 + 22
    # DC at width 2: 36 + 4; decoder 6->2: 108 + 4 + 36 + 4 + (12 + 4) + 7; output 2 + 1
    assert reference.parameter_count(architecture) == 75 + 270 + 40 + 175 + 3


def test_readme_other_readings_of_the_widths():
    """The README's counts for the readings the paper's 4.1M/4.5M might come from."""
    deeper = reference.parameter_count(
        _paper_architecture(
            "rdunet", depth=5, skip_dilation_rates=((1, 2, 3, 3, 2, 1),) * 2 + ((1, 2, 2, 1),) * 3
        )
    )
    assert round(deeper / 1e6, 2) == 11.59
    assert round(reference.parameter_count(_paper_architecture("rdunet", features=20)) / 1e6, 2) == 4.55
    assert round(reference.parameter_count(_paper_architecture("unet", features=20)) / 1e6, 2) == 3.07
    text = README.read_text()
    assert "gives\n11.59M" in text or "gives 11.59M" in text.replace("\n", " ")
    assert "4.55M for RDU-net but then\n3.07M for the U-net" in text


# --- structure read from the traced program ------------------------------------------------------


def _convolutions_by_kernel(model, variables, images) -> list[tuple[str, tuple]]:
    """(kernel parameter path, rhs_dilation) of every convolution in the traced evaluation pass, in
    program order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables["params"])

    def forward(params):
        return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=False)

    closed = jax.make_jaxpr(forward)(variables["params"])
    names = {
        var: "/".join(key.key for key in path)
        for var, (path, _) in zip(closed.jaxpr.invars, leaves, strict=True)
    }
    found = []

    def walk(jaxpr, names):
        for equation in jaxpr.eqns:
            if equation.primitive.name == "conv_general_dilated":
                kernel = equation.invars[1]
                found.append((names.get(kernel, "?"), tuple(equation.params["rhs_dilation"])))
            for value in equation.params.values():
                inner = getattr(value, "jaxpr", value)
                # A nested program (pjit, custom_jvp, remat) whose inputs are this equation's operands.
                if hasattr(inner, "eqns") and len(inner.invars) == len(equation.invars):
                    operands = zip(inner.invars, equation.invars, strict=True)
                    walk(inner, {inner_var: names.get(outer, "?") for inner_var, outer in operands})

    walk(closed.jaxpr, names)
    return found


def _expected_dilation(architecture: reference.Architecture, kernel_path: str, kernel_shape) -> int:
    """The dilation the paper's configuration gives the convolution whose kernel is at `kernel_path`."""
    if kernel_shape[:2] == (1, 1):
        return 1
    top = kernel_path.split("/")[0]
    if top.startswith("DilatedCascade_"):
        level = int(np.log2(kernel_shape[2] // architecture.features))
        index = int(re.search(r"/Conv_(\d+)/", kernel_path).group(1))
        return architecture.skip_schedule(level)[index]
    block_index = int(top.split("_")[1])
    return architecture.encoder_rate(block_index) if block_index <= architecture.depth else 1


DILATED_SCHEDULES = {"rdunet": ("rdunet", {}), "resdunet": ("resdunet", {}), **OTHER_SCHEDULES}


@pytest.mark.parametrize("name", sorted(DILATED_SCHEDULES))
def test_every_configured_dilation_is_in_its_convolution(name):
    variant, overrides = DILATED_SCHEDULES[name]
    model_config = _model_config(variant, dilation_impl="xla", **overrides)
    architecture = reference.Architecture.from_config(model_config)
    model = models.build_model(model_config)
    variables = models.initialize_variables(model, 16, seed=0)
    kernels = {
        "/".join(key.key for key in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        if path[-1].key == "kernel" and len(leaf.shape) == 4
    }
    convolutions = _convolutions_by_kernel(model, variables, jnp.zeros((1, 16, 16, 1)))
    assert sorted(path for path, _ in convolutions) == sorted(kernels)  # each kernel used once
    for path, dilation in convolutions:
        rate = _expected_dilation(architecture, path, kernels[path])
        assert dilation == (rate, rate), path
    # Each DC module runs its schedule in program order, and the encoder levels have their rates.
    for level in range(architecture.depth):
        schedule = architecture.skip_schedule(level)
        width = architecture.width(level)
        in_cascade = [
            dilation[0]
            for path, dilation in convolutions
            if path.startswith("DilatedCascade_") and kernels[path][2] == width
        ]
        assert tuple(in_cascade) == schedule
    encoder_rates = [
        {
            dilation[0]
            for path, dilation in convolutions
            if path.startswith(f"EncoderDecoderBlock_{level}/") and kernels[path][0] == 3
        }
        for level in range(architecture.depth + 1)
    ]
    assert encoder_rates == [{architecture.encoder_rate(level)} for level in range(architecture.depth + 1)]


def test_paper_dilation_schedules_are_the_configured_ones():
    """The schedules the structure test reads come from the paper's variants: RDU-net's DC modules and
    ResDUNet's decremental encoder."""
    rdunet = _paper_architecture("rdunet")
    assert rdunet.skip_dilation_rates == ((1, 2, 3, 3, 2, 1),) * 2 + ((1, 2, 2, 1),) * 2
    resdunet = _paper_architecture("resdunet")
    assert resdunet.encoder_dilation_rates == (4, 3, 2, 1, 1)
    assert resdunet.skip_dilation_rates == ()


@pytest.mark.parametrize("name", ["rdunet", "rdunet_depth3"])
def test_every_dc_module_output_reaches_the_decoder(name):
    variant, overrides = DILATED_SCHEDULES[name]
    model_config = _model_config(variant, **overrides)
    model = models.build_model(model_config)
    size = 32
    variables = _perturbed(models.initialize_variables(model, size, seed=0), seed=1)
    images = _images(size)
    evaluation = _evaluation(model)
    baseline = evaluation(variables, images)
    cascades = [name for name in variables["params"] if name.startswith("DilatedCascade_")]
    schedules = [rates for rates in model_config.skip_dilation_rates if rates]
    assert len(cascades) == len(schedules)
    for name in cascades:
        last = max(
            int(key.split("_")[1]) for key in variables["params"][name] if key.startswith("BatchNorm_")
        )
        shifted = jax.tree_util.tree_map(lambda leaf: leaf, variables)
        norm = dict(shifted["params"][name][f"BatchNorm_{last}"])
        norm["bias"] = norm["bias"] + 2.0  # past the ReLU: the DC module's output rises everywhere
        shifted["params"][name] = {**shifted["params"][name], f"BatchNorm_{last}": norm}
        changed = evaluation(shifted, images)
        assert np.abs(changed - baseline).max() > 1e-3 * np.abs(baseline).max(), name
