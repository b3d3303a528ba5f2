"""The soft Dice and Dice + cross-entropy losses (plain, pixel-weighted for self-training, and per class)
against hand-computed values, one loss per image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# --- Multi-class heads: hand-computed values and a plain numpy re-implementation ------------------------


def _numpy_softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def numpy_exclusive_losses(logits, labels, smooth=1.0):
    """Dice (mean over foreground classes, per image) and Dice + CE, written out with loops in numpy."""
    logits = np.asarray(logits, np.float64)
    batch, _, _, channels = logits.shape
    dice_losses, ce_terms = [], []
    for image in range(batch):
        probabilities = _numpy_softmax(logits[image])
        label_map = np.asarray(labels)[image].reshape(probabilities.shape[:2])
        per_class = []
        for class_index in range(1, channels):
            target = (label_map == class_index).astype(np.float64)
            predicted = probabilities[..., class_index]
            per_class.append(
                (2 * np.sum(predicted * target) + smooth) / (np.sum(predicted) + np.sum(target) + smooth)
            )
        dice_losses.append(1 - np.mean(per_class))
        picked = np.take_along_axis(probabilities, label_map[..., None].astype(int), axis=-1)
        ce_terms.append(np.mean(-np.log(picked)))
    dice_losses = np.array(dice_losses)
    return dice_losses, dice_losses + np.array(ce_terms)


def numpy_multilabel_losses(logits, targets, smooth=1.0):
    """Per-channel sigmoid Dice averaged over channels, and plus the mean binary cross-entropy."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    probabilities = 1 / (1 + np.exp(-logits))
    intersection = np.sum(probabilities * targets, axis=(1, 2))
    total = np.sum(probabilities, axis=(1, 2)) + np.sum(targets, axis=(1, 2))
    dice_losses = 1 - np.mean((2 * intersection + smooth) / (total + smooth), axis=-1)
    cross_entropy = -(targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities))
    return dice_losses, dice_losses + np.mean(cross_entropy, axis=(1, 2, 3))


def test_exclusive_dice_by_hand_with_a_class_absent_from_the_mask():
    # Zero logits over background + 2 classes: p = 1/3 on each of 4 pixels. Class 1 has one pixel:
    # (2/3 + 1) / (4/3 + 1 + 1) = 1/2. Class 2 is absent from the mask: (0 + 1) / (4/3 + 0 + 1) = 3/7.
    labels = jnp.array([[[1, 0], [0, 0]]])[..., None]
    logits = jnp.zeros((1, 2, 2, 3))
    _assert_per_image(losses.exclusive_soft_dice_loss(logits, labels), [1 - (1 / 2 + 3 / 7) / 2])
    # Every pixel's softmax cross-entropy at p = 1/3 is log 3.
    _assert_per_image(losses.exclusive_dice_ce_loss(logits, labels), [1 - (1 / 2 + 3 / 7) / 2 + np.log(3)])


def test_exclusive_class_absent_from_mask_and_prediction_scores_dice_one_and_still_counts():
    # Class 1 predicted perfectly, class 2 absent from both: its Dice is (0 + 1) / (0 + 0 + 1) = 1.
    labels = jnp.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]]])
    logits = jnp.where(jax.nn.one_hot(labels, 3) > 0, BIG, -BIG)
    _assert_per_image(losses.exclusive_soft_dice_loss(logits, labels), [0.0, 0.0])
    # Image 0 now also predicts class 2 on one background pixel (p = 1): class 2 Dice 1 / (1 + 0 + 1).
    logits = logits.at[0, 0, 1].set(jnp.array([-BIG, -BIG, BIG]))
    _assert_per_image(losses.exclusive_soft_dice_loss(logits, labels), [1 - (1 + 1 / 2) / 2, 0.0])


def test_exclusive_head_with_one_class_is_the_binary_loss_of_the_logit_difference():
    # softmax over (l0, l1) gives p1 = sigmoid(l1 - l0): one class reduces to the paper's soft Dice.
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 4, 2)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=(3, 5, 4, 1)))
    binary = losses.soft_dice_loss(logits[..., 1:] - logits[..., :1], labels)
    np.testing.assert_allclose(losses.exclusive_soft_dice_loss(logits, labels), binary, atol=1e-6)


@pytest.mark.parametrize("trailing_channel", [True, False])
def test_exclusive_losses_match_a_numpy_re_implementation(trailing_channel):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 5, 4)) * 2
    labels = rng.integers(0, 4, size=(4, 6, 5))
    labels[2][labels[2] == 3] = 0  # image 2 lacks class 3
    given = labels[..., None] if trailing_channel else labels
    expected_dice, expected_dice_ce = numpy_exclusive_losses(logits, labels)
    logits = jnp.asarray(logits, jnp.float32)
    _assert_per_image(losses.exclusive_soft_dice_loss(logits, given), expected_dice)
    np.testing.assert_allclose(losses.exclusive_dice_ce_loss(logits, given), expected_dice_ce, atol=1e-5)
    # Another smoothing reaches the Dice term of Dice + cross-entropy too.
    _, smoothed = numpy_exclusive_losses(np.asarray(logits, np.float64), labels, smooth=0.25)
    np.testing.assert_allclose(losses.exclusive_dice_ce_loss(logits, given, smooth=0.25), smoothed, atol=1e-5)
    assert np.max(np.abs(smoothed - expected_dice_ce)) > 1e-3


def test_multilabel_dice_by_hand_with_overlapping_channels():
    # Channel 0 (lungs): p = 0.5 on 4 pixels, 2 lung pixels: (2 + 1) / (2 + 2 + 1) = 3/5. Channel 1
    # (infection, inside the lungs): predicted perfectly, Dice 1. Loss 1 - (3/5 + 1) / 2 = 1/5.
    targets = jnp.zeros((1, 2, 2, 2)).at[0, 0, :, 0].set(1.0).at[0, 0, 0, 1].set(1.0)
    logits = jnp.stack([jnp.zeros((1, 2, 2)), jnp.where(targets[..., 1] > 0, BIG, -BIG)], axis=-1)
    _assert_per_image(losses.multilabel_soft_dice_loss(logits, targets), [1 / 5])
    # Cross-entropy: 4 pixels of log 2 in channel 0, 0 in channel 1, averaged over 8 values.
    _assert_per_image(losses.multilabel_dice_bce_loss(logits, targets), [1 / 5 + np.log(2) / 2])


def test_multilabel_losses_match_a_numpy_re_implementation():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 6, 5, 2)) * 2
    targets = rng.integers(0, 2, size=(3, 6, 5, 2)).astype(np.float32)
    targets[1, ..., 1] = 0  # image 1 lacks class 1
    expected_dice, expected_dice_bce = numpy_multilabel_losses(logits, targets)
    logits = jnp.asarray(logits, jnp.float32)
    _assert_per_image(losses.multilabel_soft_dice_loss(logits, targets), expected_dice)
    np.testing.assert_allclose(losses.multilabel_dice_bce_loss(logits, targets), expected_dice_bce, atol=1e-5)
    _, smoothed = numpy_multilabel_losses(np.asarray(logits, np.float64), targets, smooth=0.25)
    np.testing.assert_allclose(
        losses.multilabel_dice_bce_loss(logits, targets, smooth=0.25), smoothed, atol=1e-5
    )
    assert np.max(np.abs(smoothed - expected_dice_bce)) > 1e-3


def test_every_head_names_its_losses_and_binary_is_the_paper_table():
    assert losses.LOSSES_BY_HEAD["binary"] is losses.LOSSES
    assert set(losses.LOSSES_BY_HEAD) == {"binary", "exclusive", "multilabel"}
    assert all("dice" in table for table in losses.LOSSES_BY_HEAD.values())


def test_weighted_dice_against_hand_computed_values_and_plain_dice_at_weight_one():
    # One 1x3 image: sigmoid(0) = 0.5, sigmoid(log 3) = 0.75, sigmoid(-log 3) = 0.25.
    logits = jnp.log(jnp.array([1.0, 3.0, 1 / 3]))[None, None, :, None]
    masks = np.array([1.0, 1.0, 0.0])[None, None, :, None]
    weights = np.array([1.0, 0.0, 0.5])[None, None, :, None]
    targets = np.concatenate([masks, weights], axis=-1)
    # sum wPG = 0.5; sum wP = 0.5 + 0.125 = 0.625; sum wG = 1; loss = 1 - (1 + 1) / (1.625 + 1).
    expected = 1 - 2.0 / 2.625
    np.testing.assert_allclose(losses.weighted_soft_dice_loss(logits, targets), [expected], rtol=1e-6)
    # Weighted cross-entropy mean: (-log 0.5 + 0.5 * -log 0.75) / 1.5.
    cross_entropy = (np.log(2) + 0.5 * -np.log(0.75)) / 1.5
    np.testing.assert_allclose(
        losses.weighted_dice_bce_loss(logits, targets), [expected + cross_entropy], rtol=1e-6
    )
    # One channel (an expert mask) weighs every pixel 1: the paper's Dice loss and Dice + BCE.
    np.testing.assert_allclose(
        losses.weighted_soft_dice_loss(logits, masks), losses.soft_dice_loss(logits, masks), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.weighted_dice_bce_loss(logits, masks), losses.dice_bce_loss(logits, masks), rtol=1e-6
    )


def test_weighted_losses_are_per_image_with_their_smoothing_and_weights_summing_below_one():
    # Image 0 as above; image 1: p (0.5, 0.75, 0.25), mask (0, 1, 1), every weight 0.25 (sum 0.75 < 1):
    # sum wPG = 0.25, sum wP = 0.375, sum wG = 0.5.
    logits = jnp.log(jnp.array([1.0, 3.0, 1 / 3]))[None, None, :, None].repeat(2, axis=0)
    masks = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])[:, None, :, None]
    weights = np.array([[1.0, 0.0, 0.5], [0.25, 0.25, 0.25]])[:, None, :, None]
    targets = np.concatenate([masks, weights], axis=-1)
    for smooth in (1.0, 0.5):
        dice = [1 - (1 + smooth) / (1.625 + smooth), 1 - (0.5 + smooth) / (0.875 + smooth)]
        _assert_per_image(losses.weighted_soft_dice_loss(logits, targets, smooth=smooth), dice)
        # Weighted cross-entropy means: image 1's weights sum to 0.75, the mean's denominator.
        cross_entropy = [
            (np.log(2) + 0.5 * -np.log(0.75)) / 1.5,
            0.25 * (np.log(2) - np.log(0.75) + np.log(4)) / 0.75,
        ]
        _assert_per_image(
            losses.weighted_dice_bce_loss(logits, targets, smooth=smooth), np.add(dice, cross_entropy)
        )
