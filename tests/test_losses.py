"""The soft Dice and Dice + cross-entropy losses against hand-computed values, one loss per image."""

import jax.numpy as jnp
import numpy as np

from rdunet_jax import losses

BIG = 30.0  # sigmoid(30) == 1 and sigmoid(-30) == 0 in float32


def _assert_per_image(loss, expected):
    """One loss per image (shape [batch]), each equal to its hand-computed value."""
    loss = np.asarray(loss)
    assert loss.shape == (len(expected),)
    np.testing.assert_allclose(loss, expected, atol=1e-6)


def test_perfect_prediction_has_zero_loss():
    mask = jnp.array([[[[1.0], [0.0]], [[1.0], [1.0]]]])
    logits = jnp.where(mask > 0, BIG, -BIG)
    _assert_per_image(losses.soft_dice_loss(logits, mask), [0.0])


def test_hand_computed_soft_dice():
    # probabilities 0.5 everywhere on 4 pixels, 1 lesion pixel: 1 - (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    logits = jnp.zeros((1, 2, 2, 1))
    mask = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    _assert_per_image(losses.soft_dice_loss(logits, mask), [0.5])


def test_soft_dice_is_computed_per_image_of_a_mixed_batch():
    """Three different 2x2 images in one batch: each keeps its own Dice, none is pooled or averaged."""
    masks = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])[
        ..., None
    ]
    logits = jnp.stack(
        [
            jnp.zeros((2, 2, 1)),  # p = 0.5 on 4 pixels, 1 lesion pixel: 1 - (1 + 1) / (2 + 1 + 1)
            jnp.where(masks[1] > 0, BIG, -BIG),  # perfect: 1 - (4 + 1) / (2 + 2 + 1)
            jnp.full((2, 2, 1), -BIG),  # nothing predicted, 2 lesion pixels: 1 - 1 / (0 + 2 + 1)
        ]
    )
    _assert_per_image(losses.soft_dice_loss(logits, masks), [0.5, 0.0, 2 / 3])


def test_empty_mask_and_empty_prediction_is_zero_loss_not_nan():
    # Image 0 empty and predicted empty: 0. Image 1 empty with one false pixel: 1 - 1 / (1 + 0 + 1) = 0.5.
    logits = jnp.full((2, 3, 3, 1), -BIG).at[1, 0, 0].set(BIG)
    _assert_per_image(losses.soft_dice_loss(logits, jnp.zeros((2, 3, 3, 1))), [0.0, 0.5])


def test_completely_wrong_prediction_approaches_one():
    mask = jnp.zeros((1, 10, 10, 1)).at[0, :5].set(1.0)
    logits = jnp.where(mask > 0, -BIG, BIG)
    # 1 - 1 / (50 + 50 + 1)
    _assert_per_image(losses.soft_dice_loss(logits, mask), [1 - 1 / 101])


def test_hand_computed_dice_plus_cross_entropy():
    # Dice 0.5 as above; every pixel's cross-entropy at probability 0.5 is log 2, whatever its label.
    logits = jnp.zeros((1, 2, 2, 1))
    mask = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    _assert_per_image(losses.dice_bce_loss(logits, mask), [0.5 + np.log(2.0)])


def test_dice_plus_cross_entropy_is_per_image_and_zero_when_perfect():
    mask = jnp.zeros((2, 4, 4, 1)).at[1, :2].set(1.0)
    perfect = jnp.where(mask > 0, BIG, -BIG)
    _assert_per_image(losses.dice_bce_loss(perfect, mask), [0.0, 0.0])
    # Image 0 (empty mask) predicted at p = sigmoid(1): Dice 1 - 1 / (16 p + 1), cross-entropy log(1 + e).
    logits = perfect.at[0].set(1.0)
    probability = 1 / (1 + np.exp(-1.0))
    expected = 1 - 1 / (16 * probability + 1) + np.log1p(np.e)
    loss = np.asarray(losses.dice_bce_loss(logits, mask))
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss, [expected, 0.0], atol=1e-5)


def test_dice_plus_cross_entropy_passes_its_smoothing_to_the_dice_term():
    # p = 0.5 on 4 pixels, 1 lesion pixel, s = 0.5: Dice 1 - (2*0.5 + 0.5) / (2 + 1 + 0.5) = 4/7, plus log 2.
    logits = jnp.zeros((1, 2, 2, 1))
    mask = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    _assert_per_image(losses.soft_dice_loss(logits, mask, smooth=0.5), [4 / 7])
    _assert_per_image(losses.dice_bce_loss(logits, mask, smooth=0.5), [4 / 7 + np.log(2.0)])
