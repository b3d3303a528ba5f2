"""The model blocks and the paper's configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_model as reference
from helpers import init_variables

from rdunet_jax import config_lib, config_validation, layers, models

# Parameter counts at the paper's widths (16 feature maps doubling to 256, depth 4): the README's table,
# which tests/test_reference_forward.py derives by hand from the widths.
PINNED_PARAMETER_COUNTS = {
    "unet": 1_963_809,
    "residual": 2_074_097,
    "residual_se": 2_102_189,
    "rdunet": 2_910_701,
    "resdunet": 2_102_189,
}


def test_squeeze_excitation_shape_and_gates_in_unit_interval():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 16))
    se = models.SqueezeExcitation(reduction=8)
    variables = init_variables(se, x)
    assert variables["params"]["Dense_0"]["kernel"].shape == (16, 2)
    y = se.apply(variables, x)
    assert y.shape == x.shape
    gates = y / x
    assert np.all((gates > 0) & (gates < 1))


def test_squeeze_excitation_gates_each_channel_by_its_spatial_mean():
    # Spatially varying channels whose maxima are far from their means, so max pooling would differ; small
    # enough (means of -0.2 to 0.6) that the gates stay off the sigmoid's flat ends.
    ramp = jnp.linspace(0.0, 0.4, 6)[None, :, None, None] * jnp.linspace(-1.0, 2.0, 5)[None, None, :, None]
    x = ramp * jnp.arange(1.0, 9.0) + 0.1 * jax.random.normal(jax.random.PRNGKey(2), (2, 6, 5, 8))
    se = models.SqueezeExcitation(reduction=4)
    variables = init_variables(se, x)
    params = jax.tree_util.tree_map(  # non-zero biases, so that each Dense's bias is exercised
        lambda leaf: leaf + 0.3 * jax.random.normal(jax.random.PRNGKey(3), leaf.shape), variables["params"]
    )
    # Positive hidden biases keep both hidden units above the ReLU's zero, so the gates follow the pooling.
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"] + 1.0
    y = np.asarray(se.apply({"params": params}, x))

    def gated(pooled):
        dense_0, dense_1 = params["Dense_0"], params["Dense_1"]
        hidden = np.maximum(pooled @ np.asarray(dense_0["kernel"]) + np.asarray(dense_0["bias"]), 0)
        gates = 1 / (1 + np.exp(-(hidden @ np.asarray(dense_1["kernel"]) + np.asarray(dense_1["bias"]))))
        return np.asarray(x) * gates[:, None, None, :]

    expected = gated(np.asarray(x).mean(axis=(1, 2)))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(gated(np.asarray(x).max(axis=(1, 2))) - expected).max() > 1e-2


@pytest.mark.parametrize("rates", [(1, 2, 3, 3, 2, 1), (1, 2, 2, 1), (2, 2), (3,)])
def test_dilated_cascade_receptive_field_matches_the_rates(rates):
    size = 41
    impulse = jnp.zeros((1, size, size, 1)).at[0, size // 2, size // 2, 0].set(1.0)
    cascade = models.DilatedCascade(rates, models.make_layers(train=False))
    variables = init_variables(cascade, impulse)
    # Positive kernels and identity BatchNorm: a pixel is non-zero iff the impulse reaches it.
    variables = jax.tree_util.tree_map(jnp.abs, variables)
    response = np.asarray(cascade.apply(variables, impulse))[0, :, :, 0]
    assert response.shape == (size, size)
    offsets = {0}
    for rate in rates:
        offsets = {offset + step for offset in offsets for step in (-rate, 0, rate)}
    expected_1d = np.zeros(size, bool)
    expected_1d[[size // 2 + offset for offset in offsets]] = True
    np.testing.assert_array_equal(response > 0, np.outer(expected_1d, expected_1d))
    assert (response > 0).sum() == len(offsets) ** 2


def test_residual_block_uses_projection_only_when_channels_change():
    x = jnp.ones((1, 8, 8, 4))
    same = init_variables(models.ResidualBlock(4, models.make_layers(train=False)), x)["params"]
    projected = init_variables(models.ResidualBlock(8, models.make_layers(train=False)), x)["params"]
    assert "Conv_0" not in same
    assert projected["Conv_0"]["kernel"].shape == (1, 1, 4, 8)


@pytest.mark.parametrize("variant", sorted(PINNED_PARAMETER_COUNTS))
def test_variant_parameter_count_is_pinned(variant):
    """The model's count equals the layer-by-layer count from the paper's widths (and the README's)."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    variables = models.abstract_variables(models.build_model(config.model), 64)
    by_hand = reference.parameter_count(reference.Architecture.from_config(config.model))
    assert models.count_parameters(variables["params"]) == by_hand == PINNED_PARAMETER_COUNTS[variant]


def test_other_reading_of_the_widths_is_one_flag_away():
    config = config_lib.base_config()
    config.model.depth = 5
    config.model.skip_dilation_rates = ((1, 2, 3, 3, 2, 1),) * 2 + ((1, 2, 2, 1),) * 3
    variables = models.abstract_variables(models.build_model(config.model), 64)
    by_hand = reference.parameter_count(reference.Architecture.from_config(config.model))
    assert models.count_parameters(variables["params"]) == by_hand == 11_585_357


@pytest.mark.parametrize("variant", sorted(config_lib.MODEL_VARIANTS))
def test_variant_forward_pass_gives_logits_of_input_shape(variant):
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    config.model.features, config.model.depth = 4, 2
    if config.model.skip_dilation_rates:
        config.model.skip_dilation_rates = ((1, 2, 1), (1, 2))
    if config.model.encoder_dilation_rates:
        config.model.encoder_dilation_rates = (2, 1, 1)
    model = models.build_model(config.model)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
    variables = init_variables(model, images, train=False)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 16, 16, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    has_dc = any(name.startswith("DilatedCascade") for name in variables["params"])
    assert has_dc == (variant == "rdunet")


def test_resdunet_dilates_the_encoder():
    config = config_lib.apply_model_variant(config_lib.base_config(), "resdunet")
    config.model.update(features=4, dilation_impl="xla")
    model = models.build_model(config.model)
    assert model.encoder_dilation_rates == config_lib.RESDUNET_ENCODER_DILATION_RATES
    assert list(model.encoder_dilation_rates) == sorted(model.encoder_dilation_rates, reverse=True)
    # The traced program runs them: both 3x3 convolutions of encoder levels 0-2 at rates 4, 3, 2.
    images = jnp.zeros((1, 32, 32, 1))
    variables = models.initialize_variables(model, 32, seed=0)
    jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(images)
    dilated = [rates for rates in _convolution_dilations(jaxpr.jaxpr) if rates != (1, 1)]
    assert dilated == [(4, 4)] * 2 + [(3, 3)] * 2 + [(2, 2)] * 2


def test_numpy_initialisation_matches_flax_structure_and_distributions():
    config = config_lib.base_config()
    model = models.build_model(config.model)
    variables = models.initialize_variables(model, 64, seed=3)
    reference = models.abstract_variables(model, 64)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(reference)
    for got, want in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(reference), strict=True
    ):
        assert got.shape == want.shape and got.dtype == want.dtype
    kernel = np.asarray(
        variables["params"]["EncoderDecoderBlock_4"]["ResidualBlock_0"]["DoubleConv_0"]["Conv_1"]["kernel"]
    )  # 3x3x256x256: LeCun normal, std 1/sqrt(fan_in)
    assert kernel.std() == pytest.approx(1 / np.sqrt(3 * 3 * 256), rel=0.01)
    assert np.abs(kernel).max() <= 2 / np.sqrt(3 * 3 * 256) / 0.8796 + 1e-6
    norm = variables["batch_stats"]["DilatedCascade_0"]["BatchNorm_0"]
    np.testing.assert_array_equal(norm["mean"], 0.0)
    np.testing.assert_array_equal(norm["var"], 1.0)
    first = variables["params"]["Conv_0"]["kernel"]
    again = models.initialize_variables(model, 64, seed=3)["params"]["Conv_0"]["kernel"]
    other = models.initialize_variables(model, 64, seed=4)["params"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(other, first)


# --- speed options (issue 6): same parameters, same function ----------------------------------------

SPEED_OPTIONS = {
    "stencil": dict(upsample_impl="stencil"),
    "bits": dict(dropout_impl="bits"),
    "remat": dict(remat=True),
    "reshape_pool": dict(pool_impl="reshape"),
    "space_to_batch": dict(dilation_impl="space_to_batch"),
    "closed_form_norm": dict(batch_norm_impl="closed_form"),
    "all": dict(
        upsample_impl="stencil",
        dropout_impl="bits",
        remat=True,
        pool_impl="reshape",
        dilation_impl="space_to_batch",
        batch_norm_impl="closed_form",
    ),
}


def _tiny_model_config(**options):
    """The reference model (every speed option off) at 4 feature maps and 2 levels, plus `options`."""
    config = config_lib.base_config()
    config.model.features, config.model.depth = 4, 2
    config.model.skip_dilation_rates = ((1, 2, 1), (1, 2))
    config.model.update(
        upsample_impl="resize",
        dropout_impl="flax",
        remat=False,
        pool_impl="reduce_window",
        dilation_impl="xla",
        batch_norm_impl="flax",
    )
    config.model.update(options)
    config_validation.validate(config)
    return config.model


def test_defaults_are_the_fast_forms_and_older_configs_keep_theirs():
    keys = ("dropout_impl", "pool_impl", "upsample_impl", "batch_norm_impl")
    model = models.build_model(config_lib.base_config().model)
    assert tuple(getattr(model, key) for key in keys) == ("bits", "reshape", "stencil", "closed_form")
    older = config_lib.base_config().model  # a config saved before these keys existed
    for key in keys:
        del older[key]
    model = models.build_model(older)
    assert tuple(getattr(model, key) for key in keys) == ("flax", "reduce_window", "resize", "flax")


def _training_logits(model, variables, params, images, dropout_seed: int = 2):
    """The model's logits in training mode (batch statistics of `variables`, dropout on)."""
    logits, _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        images,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(dropout_seed)},
        mutable=["batch_stats"],
    )
    return logits


def _convolution_dilations(jaxpr) -> list[tuple[int, ...]]:
    """The kernel dilation of every convolution in a (closed) jaxpr, nested ones included."""
    found = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            found.append(tuple(equation.params["rhs_dilation"]))
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(inner, "eqns"):
                    found += _convolution_dilations(inner)
                elif hasattr(inner, "jaxpr"):
                    found += _convolution_dilations(inner.jaxpr)
    return found


@pytest.mark.parametrize("dilation_impl", ["xla", "space_to_batch"])
def test_space_to_batch_model_runs_no_dilated_convolution_in_training(dilation_impl):
    model = models.build_model(_tiny_model_config(dilation_impl=dilation_impl))
    variables = models.initialize_variables(model, 16, seed=0)
    images = jnp.zeros((2, 16, 16, 1))

    def loss(params):
        return jnp.mean(_training_logits(model, variables, params, images))

    dilations = _convolution_dilations(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr)
    assert len(dilations) > 20  # forward and both gradients of every convolution
    dilated = [rates for rates in dilations if rates != (1, 1)]
    assert bool(dilated) == (dilation_impl == "xla")


def test_auto_dilation_form_is_space_to_batch_on_gpus_only(monkeypatch):
    assert layers.resolve_dilation_impl("space_to_batch") == "space_to_batch"
    for backend, want in (("cpu", "xla"), ("gpu", "space_to_batch"), ("tpu", "xla")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert layers.resolve_dilation_impl("auto") == want
        assert models.build_model(_tiny_model_config(dilation_impl="auto")).dilation_impl == want
    assert layers.resolve_dilation_impl("xla") == "xla"


@pytest.mark.parametrize("option", sorted(SPEED_OPTIONS))
def test_speed_option_keeps_parameter_tree_and_eval_forward_pass(option):
    reference = models.build_model(_tiny_model_config())
    fast = models.build_model(_tiny_model_config(**SPEED_OPTIONS[option]))
    variables = models.initialize_variables(reference, 16, seed=0)
    fast_shapes = models.abstract_variables(fast, 16)
    assert jax.tree_util.tree_structure(fast_shapes) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_map(jnp.shape, fast_shapes) == jax.tree_util.tree_map(jnp.shape, variables)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))
    np.testing.assert_allclose(
        fast.apply(variables, images, train=False),
        reference.apply(variables, images, train=False),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("option", ["stencil", "remat", "reshape_pool", "space_to_batch", "closed_form_norm"])
def test_speed_option_keeps_training_gradients(option):
    """Options that draw the same dropout masks give the same loss gradient in training mode."""
    reference = models.build_model(_tiny_model_config())
    fast = models.build_model(_tiny_model_config(**SPEED_OPTIONS[option]))
    variables = models.initialize_variables(reference, 16, seed=0)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))

    def gradient(model):
        def loss(params):
            return jnp.mean(_training_logits(model, variables, params, images) ** 2)

        return jax.grad(loss)(variables["params"])

    for got, want in zip(
        jax.tree_util.tree_leaves(gradient(fast)), jax.tree_util.tree_leaves(gradient(reference)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(PINNED_PARAMETER_COUNTS))
def test_speed_options_keep_pinned_parameter_counts(variant):
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    config.model.update(SPEED_OPTIONS["all"], dtype="bfloat16")
    variables = models.abstract_variables(models.build_model(config.model), 64)
    assert models.count_parameters(variables["params"]) == PINNED_PARAMETER_COUNTS[variant]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_bfloat16_forward_pass_stays_close_to_float32():
    reference = models.build_model(_tiny_model_config())
    half = models.build_model(_tiny_model_config(dtype="bfloat16"))
    variables = models.initialize_variables(reference, 16, seed=0)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))
    want = reference.apply(variables, images, train=False)
    got = half.apply(variables, images, train=False)
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) <= 0.05 * float(jnp.max(jnp.abs(want))) + 0.05


def test_bfloat16_squeeze_excitation_computes_its_dense_layers_in_bfloat16():
    """dtype=bfloat16 promises bfloat16 compute: both of the unit's matrix products take bfloat16 operands."""
    unit = models.SqueezeExcitation(reduction=2, dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 8), jnp.bfloat16)
    variables = init_variables(unit, x)
    program = jax.make_jaxpr(unit.apply)(variables, x)
    products = [equation for equation in program.jaxpr.eqns if equation.primitive.name == "dot_general"]
    assert len(products) == 2
    for product in products:
        assert [operand.aval.dtype for operand in product.invars] == [jnp.bfloat16, jnp.bfloat16]


def _equations(jaxpr):
    """Every equation of a program, nested programs (jit, custom VJP, remat) included."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a closed program's program
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_closed_form_batch_norm_reaches_every_batch_norm_layer():
    """batch_norm_impl="closed_form" reaches every block's, shortcut's and DC module's BatchNorm: the training
    program holds one custom-VJP normalisation per BatchNorm layer of the variable tree."""
    model = models.RDUNet(features=4, depth=1, skip_dilation_rates=((1, 2),), batch_norm_impl="closed_form")
    x = jnp.ones((2, 8, 8, 1))
    variables = init_variables(model, x)
    norm_layers = len(jax.tree_util.tree_leaves(variables["batch_stats"])) // 2
    program = jax.make_jaxpr(
        lambda v: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}
        )
    )(variables)
    names = [equation.primitive.name for equation in _equations(program.jaxpr)]
    custom_vjps = [name for name in names if "custom_vjp" in name]
    assert norm_layers == 11 and len(custom_vjps) == norm_layers


@pytest.mark.parametrize("batch_norm_impl", config_lib.SPEED_OPTIONS["batch_norm_impl"].choices)
def test_bfloat16_double_conv_convolves_and_normalises_in_bfloat16(batch_norm_impl):
    """dtype=bfloat16: both 3x3 convolutions take bfloat16 operands and the BatchNorm hands on bfloat16."""
    x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
    for train in (False, True):
        block_layers = models.make_layers(train, jnp.bfloat16, batch_norm_impl=batch_norm_impl)
        block = models.DoubleConv(4, block_layers)
        variables = init_variables(block, x)

        def apply(v, block=block):
            return block.apply(v, x, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})

        program = jax.make_jaxpr(apply)(variables)
        assert program.out_avals[0].dtype == jnp.bfloat16
        convolutions = [e for e in program.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        assert len(convolutions) == 2
        for convolution in convolutions:
            assert [operand.aval.dtype for operand in convolution.invars] == [jnp.bfloat16, jnp.bfloat16]


def test_bfloat16_model_multiplies_and_rectifies_in_bfloat16_everywhere():
    """dtype=bfloat16 reaches every block, shortcut, SE unit and DC module: each convolution and matrix
    product takes bfloat16 operands, and each full-size ReLU (a max over an 8x8 map) runs on bfloat16."""
    model = models.RDUNet(features=4, depth=1, skip_dilation_rates=((1, 2),), dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1))
    variables = init_variables(model, x)
    program = jax.make_jaxpr(
        lambda v: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}
        )
    )(variables)
    checked = 0
    for equation in _equations(program.jaxpr):
        name, operands = equation.primitive.name, [operand.aval for operand in equation.invars]
        if name in ("conv_general_dilated", "dot_general") or (
            name == "max" and operands[0].shape[1:3] == (8, 8)
        ):
            assert [operand.dtype for operand in operands] == [jnp.bfloat16] * len(operands), name
            checked += 1
    assert checked > 20


def test_space_to_batch_reaches_resdunet_encoder_blocks():
    model = models.RDUNet(
        features=4,
        depth=1,
        skip_dilation_rates=(),
        encoder_dilation_rates=(2, 3),
        dilation_impl="space_to_batch",
    )
    x = jnp.ones((1, 12, 12, 1))
    variables = init_variables(model, x)
    program = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
    assert all(dilation == (1, 1) for dilation in _convolution_dilations(program.jaxpr))


def test_bits_dropout_option_draws_the_models_masks_with_bits_dropout():
    """`dropout_impl='bits'` really puts BitsDropout in the blocks: its masks, unlike every other speed
    option's, differ from nn.Dropout's for the same key, so the training logits differ (and match when the
    same form is asked for twice). A survivor of mutation testing (the option silently falling back)."""
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))
    flax_dropout = models.build_model(_tiny_model_config(dropout_impl="flax"))
    variables = models.initialize_variables(flax_dropout, 16, seed=0)

    def logits(impl):
        model = models.build_model(_tiny_model_config(dropout_impl=impl))
        return np.asarray(_training_logits(model, variables, variables["params"], images))

    np.testing.assert_array_equal(logits("bits"), logits("bits"))
    assert np.max(np.abs(logits("bits") - logits("flax"))) > 1e-3


def test_remat_wraps_each_encoder_decoder_block_in_a_checkpoint_and_only_when_asked():
    """`model.remat` trades compute for memory (recomputed in the backward pass); the traced program
    shows it as one checkpoint per encoder/decoder block, none without the option."""
    images = jnp.ones((2, 16, 16, 1))
    counts = {}
    for remat in (False, True):
        model = models.build_model(_tiny_model_config(remat=remat))
        variables = models.initialize_variables(model, 16, seed=0)

        def forward(params, model=model, variables=variables):
            return _training_logits(model, variables, params, images)

        program = jax.make_jaxpr(forward)(variables["params"])
        counts[remat] = sum(
            equation.primitive.name in ("checkpoint", "remat", "remat2")
            for equation in _equations(program.jaxpr)
        )
    # depth 2: 2 encoder blocks, the bottom one, 2 decoder blocks.
    assert counts == {False: 0, True: 5}


def test_a_model_config_saved_before_batch_norm_frozen_trains_its_statistics():
    config = _tiny_model_config()
    del config["batch_norm_frozen"]
    assert models.build_model(config).batch_norm_frozen is False


def test_rdunet_built_without_arguments_is_the_papers_network():
    """The class's own defaults, for a user who builds it directly: the paper's widths, depth, SE
    reduction, dilation schedules, dropout and binary output, as `configs/rdunet.py` builds it."""
    paper = {
        "features": 16,
        "depth": 4,
        "block": "residual",
        "use_se": True,
        "se_reduction": 8,
        "skip_dilation_rates": ((1, 2, 3, 3, 2, 1), (1, 2, 3, 3, 2, 1), (1, 2, 2, 1), (1, 2, 2, 1)),
        "encoder_dilation_rates": (),
        "dropout_rate": 0.5,
        "batch_norm_momentum": 0.9,
        "batch_norm_frozen": False,
        "num_classes": 1,
    }
    default = models.RDUNet()
    configured = models.build_model(config_lib.base_config().model)
    for name, value in paper.items():
        assert (getattr(default, name), getattr(configured, name)) == (value, value), name
