"""The XLA rewrites of rdunet_jax/layers.py against the layers they replace (Flax, JAX, by hand)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdunet_jax import layers


@pytest.mark.parametrize("upsample", [layers.upsample_bilinear, layers.upsample_bilinear_stencil])
def test_upsample_bilinear_interpolates_with_half_pixel_centres(upsample):
    # x[h, w] = rows[h] + columns[w]; bilinear weights sum to one, so the output is separable too.
    rows, columns = jnp.array([0.0, 4.0, 8.0]), jnp.array([0.0, 2.0, -6.0, 10.0, 1.0])
    x = jnp.stack([rows[:, None] + columns[None, :], 2 * rows[:, None] - columns[None, :]], axis=-1)[None]
    y = np.asarray(upsample(x))
    assert y.shape == (1, 6, 10, 2)
    # By hand: output o samples input coordinate (o + 0.5) / 2 - 0.5, the edge pixel repeated outside.
    rows_up = np.array([0.0, 1.0, 3.0, 5.0, 7.0, 8.0])
    columns_up = np.array([0.0, 0.5, 1.5, 0.0, -4.0, -2.0, 6.0, 7.75, 3.25, 1.0])
    np.testing.assert_allclose(y[0, :, :, 0], rows_up[:, None] + columns_up[None, :], atol=1e-5)
    np.testing.assert_allclose(y[0, :, :, 1], 2 * rows_up[:, None] - columns_up[None, :], atol=1e-5)
    np.testing.assert_allclose(upsample(jnp.full((1, 3, 5, 2), 7.0)), 7.0, rtol=1e-6)


def _both_batch_norms(x, train, **kwargs):
    """(ours, nn.BatchNorm) applied to x with the same random scale, bias and running statistics."""
    ours = layers.BatchNorm(use_running_average=not train, momentum=0.9, **kwargs)
    theirs = nn.BatchNorm(use_running_average=not train, momentum=0.9, **kwargs)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(
        variables
    )
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 4))
    variables = jax.tree_util.tree_map(
        lambda leaf: leaf + 0.5 * jax.random.uniform(next(keys), leaf.shape), variables
    )
    return ours, theirs, variables


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_closed_form_batch_norm_matches_flax_in_evaluation_to_the_bit(dtype):
    x = (3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 4))).astype(dtype)
    ours, theirs, variables = _both_batch_norms(x, train=False, dtype=dtype)
    got, want = ours.apply(variables, x), theirs.apply(variables, x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_closed_form_batch_norm_matches_flax_in_training_values_statistics_and_gradients(dtype):
    x = (3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 4))).astype(dtype)
    weights = jax.random.normal(jax.random.PRNGKey(2), x.shape)  # a loss that weighs every output
    ours, theirs, variables = _both_batch_norms(x, train=True, dtype=dtype)

    def run(module):
        def loss(params, x):
            y, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y.astype(jnp.float32) * weights), (y, updates)

        (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
        return y, updates, grads

    (y, updates, grads), (want_y, want_updates, want_grads) = run(ours), run(theirs)
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32), atol=tolerance)
    for got, want in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(want_updates), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads), strict=True
    ):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=tolerance * np.abs(want).max())
    # The input gradient of a batch-normalised output is orthogonal to constants and to x: a version
    # that dropped either statistic's term would fail here as well.
    grad_x = np.asarray(grads[1], np.float32)
    assert np.abs(grad_x.sum(axis=(0, 1, 2))).max() <= 100 * tolerance


def test_reshape_max_pool_matches_max_pool_and_its_gradient_without_ties():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 3))
    np.testing.assert_array_equal(layers.max_pool_reshape(x), nn.max_pool(x, (2, 2), (2, 2)))
    weights = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 3))
    want = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), (2, 2)) * weights))(x)
    got = jax.grad(lambda v: jnp.sum(layers.max_pool_reshape(v) * weights))(x)
    np.testing.assert_array_equal(got, want)
    # A window of tied maxima: the reshape form shares the gradient, select-and-scatter gives it to one.
    tied = jax.grad(lambda v: jnp.sum(layers.max_pool_reshape(v)))(jnp.zeros((1, 2, 2, 1)))
    assert float(jnp.sum(tied)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "height, width, rates, padding",
    [
        (16, 16, (3, 3), "SAME"),  # 16 + 2 * 3 is not a multiple of 3: the phases need an extra row
        (15, 10, (2, 2), "SAME"),
        (13, 9, (3, 2), "VALID"),
        (12, 11, (2, 3), ((2, 1), (0, 3))),
        (9, 9, (1, 1), "SAME"),  # no dilation: plain lax.conv_general_dilated
    ],
)
def test_space_to_batch_convolution_matches_the_dilated_convolution_and_its_gradients(
    height, width, rates, padding
):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, height, width, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
    numbers = ("NHWC", "HWIO", "NHWC")

    def convolve(conv):
        return lambda v, k: conv(v, k, (1, 1), padding, rhs_dilation=rates, dimension_numbers=numbers)

    reference, phases = convolve(jax.lax.conv_general_dilated), convolve(layers.conv_space_to_batch)
    with jax.default_matmul_precision("highest"):
        want, got = reference(x, kernel), phases(x, kernel)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        weights = jax.random.normal(jax.random.PRNGKey(2), want.shape)
        want_grads = jax.grad(lambda v, k: jnp.sum(reference(v, k) * weights), argnums=(0, 1))(x, kernel)
        got_grads = jax.grad(lambda v, k: jnp.sum(phases(v, k) * weights), argnums=(0, 1))(x, kernel)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


def test_space_to_batch_leaves_other_convolutions_to_xla_and_keeps_bfloat16():
    nchw = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 12, 10))
    nhwc = nchw.transpose(0, 2, 3, 1)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    numbers = ("NHWC", "HWIO", "NHWC")
    cases = [  # another layout, a stride, negative padding: each left to lax as it is
        (nchw, kernel.transpose(3, 2, 0, 1), (1, 1), "SAME", {}),
        (nhwc, kernel, (2, 1), "SAME", {"dimension_numbers": numbers}),
        (nhwc, kernel, (1, 1), ((-1, 0), (2, 2)), {"dimension_numbers": numbers}),
    ]
    for lhs, rhs, strides, padding, options in cases:
        np.testing.assert_array_equal(
            layers.conv_space_to_batch(lhs, rhs, strides, padding, rhs_dilation=(2, 2), **options),
            jax.lax.conv_general_dilated(lhs, rhs, strides, padding, rhs_dilation=(2, 2), **options),
        )
    half, half_kernel = nhwc.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    got = layers.conv_space_to_batch(
        half, half_kernel, (1, 1), "SAME", (1, 1), (3, 3), dimension_numbers=numbers
    )
    want = jax.lax.conv_general_dilated(
        half, half_kernel, (1, 1), "SAME", (1, 1), (3, 3), dimension_numbers=numbers
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=0.02, atol=0.05)


def test_stencil_upsampling_matches_resize():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))
    np.testing.assert_allclose(layers.upsample_bilinear_stencil(x), layers.upsample_bilinear(x), atol=1e-6)


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.9])
def test_bits_dropout_keeps_the_expected_fraction_and_mean(rate):
    keep, keep_probability = layers.dropout_keep_mask(jax.random.PRNGKey(0), rate, (4, 32, 32, 8))
    assert keep.shape == (4, 32, 32, 8) and keep.dtype == jnp.bool_
    assert abs(keep_probability - (1 - rate)) <= 1 / 65536
    assert float(keep.mean()) == pytest.approx(keep_probability, abs=0.01)
    dropout = layers.BitsDropout(rate, deterministic=False)
    x = jnp.ones((4, 32, 32, 8))
    y = dropout.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(y.mean()) == pytest.approx(1.0, abs=0.03)
    values = np.unique(np.asarray(y))
    np.testing.assert_allclose(values, [0.0, 1 / keep_probability], rtol=1e-6)
    again = dropout.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(again, y)
    np.testing.assert_array_equal(layers.BitsDropout(rate, deterministic=True).apply({}, x), x)


@pytest.mark.parametrize("dilation, options", [(None, {}), ((1, 1), {}), ((2, 2), {"batch_group_count": 2})])
def test_space_to_batch_leaves_undilated_and_grouped_convolutions_to_one_xla_convolution(dilation, options):
    lhs = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
    numbers = ("NHWC", "HWIO", "NHWC")

    def convolve(convolution, lhs, rhs):
        return convolution(
            lhs, rhs, (1, 1), "SAME", rhs_dilation=dilation, dimension_numbers=numbers, **options
        )

    program = jax.make_jaxpr(lambda x, k: convolve(layers.conv_space_to_batch, x, k))(lhs, kernel)
    assert [equation.primitive.name for equation in program.jaxpr.eqns] == ["conv_general_dilated"]
    np.testing.assert_array_equal(
        convolve(layers.conv_space_to_batch, lhs, kernel), convolve(jax.lax.conv_general_dilated, lhs, kernel)
    )


def test_sixteen_bit_dropout_keep_probability_is_the_rounded_threshold():
    # rate 0.3: keep 0.7 * 65536 = 45875.2 -> 45875 of 65536 half-words
    keep, keep_probability = layers.dropout_keep_mask(jax.random.PRNGKey(0), 0.3, (4, 8))
    assert keep_probability == 45875 / 65536 and keep.shape == (4, 8) and keep.dtype == jnp.bool_


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_bits_dropout_keeps_bfloat16_and_scales_kept_values(rate):
    x = jnp.full((4, 64), 1.5, jnp.bfloat16)
    dropped = layers.BitsDropout(rate, deterministic=False).apply(
        {}, x, rngs={"dropout": jax.random.PRNGKey(0)}
    )
    assert dropped.dtype == jnp.bfloat16
    values = set(np.unique(np.asarray(dropped, np.float32)).tolist())
    keep_probability = 0.5 if rate == 0.5 else round((1 - rate) * 65536) / 65536
    assert values == {0.0, float(jnp.asarray(1.5 / keep_probability, jnp.bfloat16))}
