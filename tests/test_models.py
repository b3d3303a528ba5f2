"""The model blocks and the paper's configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdunet_jax import config_lib, models

# Parameter counts at the paper's widths (16 feature maps doubling to 256, depth 4). Changing the
# architecture changes these: update the README's table with them.
PINNED_PARAMETER_COUNTS = {
    "unet": 1_963_809,
    "residual": 2_074_097,
    "residual_se": 2_102_189,
    "rdunet": 2_910_701,
    "resdunet": 2_102_189,
}


def _init(module, x, **kwargs):
    return module.init(jax.random.PRNGKey(0), x, **kwargs)


def test_squeeze_excitation_shape_and_gates_in_unit_interval():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 16))
    se = models.SqueezeExcitation(reduction=8)
    variables = _init(se, x)
    assert variables["params"]["Dense_0"]["kernel"].shape == (16, 2)
    y = se.apply(variables, x)
    assert y.shape == x.shape
    gates = y / x
    assert np.all((gates > 0) & (gates < 1))


def test_squeeze_excitation_rescales_channel_constant_input_per_channel():
    levels = jnp.arange(1.0, 9.0)  # channel k is the constant k + 1 everywhere
    x = jnp.broadcast_to(levels, (1, 4, 4, 8))
    se = models.SqueezeExcitation(reduction=4)
    variables = _init(se, x)
    y = np.asarray(se.apply(variables, x))
    params = variables["params"]
    hidden = np.maximum(np.asarray(levels) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], 0)
    expected_gates = 1 / (1 + np.exp(-(hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"])))
    # Every pixel of channel k is scaled by the same gate, the one computed by hand.
    np.testing.assert_allclose(
        y[0], np.broadcast_to(np.asarray(levels) * expected_gates, (4, 4, 8)), rtol=1e-5
    )
    assert len(np.unique(np.round(expected_gates, 6))) > 1


@pytest.mark.parametrize("rates", [(1, 2, 3, 3, 2, 1), (1, 2, 2, 1), (2, 2), (3,)])
def test_dilated_cascade_receptive_field_matches_the_rates(rates):
    size = 41
    impulse = jnp.zeros((1, size, size, 1)).at[0, size // 2, size // 2, 0].set(1.0)
    cascade = models.DilatedCascade(rates)
    variables = _init(cascade, impulse, train=False)
    # Positive kernels and identity BatchNorm: a pixel is non-zero iff the impulse reaches it.
    variables = jax.tree_util.tree_map(jnp.abs, variables)
    response = np.asarray(cascade.apply(variables, impulse, train=False))[0, :, :, 0]
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
    same = _init(models.ResidualBlock(4), x, train=False)["params"]
    projected = _init(models.ResidualBlock(8), x, train=False)["params"]
    assert "Conv_0" not in same
    assert projected["Conv_0"]["kernel"].shape == (1, 1, 4, 8)


@pytest.mark.parametrize("variant", sorted(PINNED_PARAMETER_COUNTS))
def test_variant_parameter_count_is_pinned(variant):
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    variables = models.abstract_variables(models.build_model(config.model), 64)
    assert models.count_parameters(variables["params"]) == PINNED_PARAMETER_COUNTS[variant]


def test_other_reading_of_the_widths_is_one_flag_away():
    config = config_lib.base_config()
    config.model.depth = 5
    config.model.skip_dilation_rates = ((1, 2, 3, 3, 2, 1),) * 2 + ((1, 2, 2, 1),) * 3
    variables = models.abstract_variables(models.build_model(config.model), 64)
    assert models.count_parameters(variables["params"]) == 11_585_357


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
    variables = _init(model, images, train=False)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 16, 16, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    has_dc = any(name.startswith("DilatedCascade") for name in variables["params"])
    assert has_dc == (variant == "rdunet")


def test_resdunet_dilates_the_encoder():
    config = config_lib.apply_model_variant(config_lib.base_config(), "resdunet")
    model = models.build_model(config.model)
    assert model.encoder_dilation_rates == models.RESDUNET_ENCODER_DILATION_RATES
    assert list(model.encoder_dilation_rates) == sorted(model.encoder_dilation_rates, reverse=True)


def test_upsample_bilinear_doubles_and_preserves_constants():
    x = jnp.full((1, 3, 5, 2), 7.0)
    y = models.upsample_bilinear(x)
    assert y.shape == (1, 6, 10, 2)
    np.testing.assert_allclose(y, 7.0)


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
