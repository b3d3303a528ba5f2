"""The soft Dice and Dice + cross-entropy losses against hand-computed values."""

import jax.numpy as jnp
import numpy as np

from rdunet_jax import losses

BIG = 30.0  # sigmoid(30) == 1 and sigmoid(-30) == 0 in float32


def test_perfect_prediction_has_zero_loss():
    mask = jnp.array([[[[1.0], [0.0]], [[1.0], [1.0]]]])
    logits = jnp.where(mask > 0, BIG, -BIG)
    np.testing.assert_allclose(losses.soft_dice_loss(logits, mask), [0.0], atol=1e-6)


def test_hand_computed_soft_dice():
    # probabilities 0.5 everywhere on 4 pixels, 1 lesion pixel: 1 - (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    logits = jnp.zeros((1, 2, 2, 1))
    mask = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    np.testing.assert_allclose(losses.soft_dice_loss(logits, mask), [0.5], atol=1e-6)


def test_empty_mask_and_empty_prediction_is_zero_loss_not_nan():
    loss = losses.soft_dice_loss(jnp.full((2, 3, 3, 1), -BIG), jnp.zeros((2, 3, 3, 1)))
    np.testing.assert_allclose(loss, [0.0, 0.0], atol=1e-6)


def test_completely_wrong_prediction_approaches_one():
    mask = jnp.zeros((1, 10, 10, 1)).at[0, :5].set(1.0)
    logits = jnp.where(mask > 0, -BIG, BIG)
    # 1 - 1 / (50 + 50 + 1)
    np.testing.assert_allclose(losses.soft_dice_loss(logits, mask), [1 - 1 / 101], atol=1e-6)


def test_hand_computed_dice_plus_cross_entropy():
    # Dice 0.5 as above; every pixel's cross-entropy at probability 0.5 is log 2, whatever its label.
    logits = jnp.zeros((1, 2, 2, 1))
    mask = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    np.testing.assert_allclose(losses.dice_bce_loss(logits, mask), [0.5 + np.log(2.0)], atol=1e-6)


def test_dice_plus_cross_entropy_is_per_image_and_zero_when_perfect():
    mask = jnp.zeros((2, 4, 4, 1)).at[1, :2].set(1.0)
    perfect = jnp.where(mask > 0, BIG, -BIG)
    np.testing.assert_allclose(losses.dice_bce_loss(perfect, mask), [0.0, 0.0], atol=1e-6)
    # Image 0 (empty mask) predicted at p = sigmoid(1): Dice 1 - 1 / (16 p + 1), cross-entropy log(1 + e).
    logits = perfect.at[0].set(1.0)
    probability = 1 / (1 + np.exp(-1.0))
    expected = 1 - 1 / (16 * probability + 1) + np.log1p(np.e)
    np.testing.assert_allclose(losses.dice_bce_loss(logits, mask), [expected, 0.0], atol=1e-5)
