"""FixMatch: the pseudo-label loss and the unlabelled rows against hand values, the strong view's jitter,
the train step's loss against a numpy recomputation, the config's errors, and a resumed run that ends
bit-identical to an uninterrupted one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_refused,
    assert_same_training_state,
    make_consistency_config,
    sigmoid64,
    train_to_the_end,
)

from rdunet_jax import fixmatch, mean_teacher, models, steps


def test_the_pseudo_label_loss_against_hand_computed_values():
    # Row 0 (unlabelled): the teacher's p and the student's logits z, pixel by pixel.
    #   p 0.97: lesion, confident (>= 0.95)        -> -log(sigmoid(2))
    #   p 0.60: lesion, not confident               -> 0
    #   p 0.03: background, confident (<= 0.05)    -> -log(1 - sigmoid(-1)) = -log(sigmoid(1))
    #   p 0.50: lesion at the 0.5 threshold, unsure -> 0
    # Row 1 (labelled) does not count, whatever it holds; unlabelled, it adds its own mean:
    #   p 0.99 against z -1: lesion, confident     -> -log(sigmoid(-1))
    #   p 0.02 against z 3: background, confident  -> -log(1 - sigmoid(3)) = -log(sigmoid(-3))
    #   p 0.40 and 0.90: unsure                     -> 0
    teacher = np.array([[[0.97, 0.60], [0.03, 0.50]], [[0.99, 0.02], [0.40, 0.90]]], np.float32)[..., None]
    logits = np.array([[[2.0, -3.0], [-1.0, 4.0]], [[-1.0, 3.0], [5.0, -5.0]]], np.float32)[..., None]
    loss = fixmatch.pseudo_label_loss(logits, teacher, np.array([1.0, 0.0]), 0.5, 0.95)
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(-1.0)))) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    both = fixmatch.pseudo_label_loss(logits, teacher, np.array([1.0, 1.0]), 0.5, 0.95)
    row1 = (-math.log(1 / (1 + math.exp(1.0))) - math.log(1 / (1 + math.exp(3.0)))) / 4
    assert float(both) == pytest.approx((expected + row1) / 2, rel=1e-6)
    # A mask threshold of 0.7 makes p 0.60 and 0.50 background. At confidence 0.5 the teacher is sure of
    # background where p <= 0.5: of 0.50, not of 0.60 (confident in the label its mask gives, not in any).
    low = fixmatch.pseudo_label_loss(logits, teacher, np.array([1.0, 0.0]), 0.7, 0.5)
    kept = [
        -math.log(1 / (1 + math.exp(-2.0))),  # 0.97 lesion, z 2
        -math.log(1 / (1 + math.exp(-1.0))),  # 0.03 background, z -1
        -math.log(1 / (1 + math.exp(4.0))),  # 0.50 background, z 4
    ]
    assert float(low) == pytest.approx(sum(kept) / 4, rel=1e-6)
    # At mask threshold 0.5, p 0.50 is lesion (p >= threshold), and at confidence 0.5 a sure one: of row
    # 0's pixels 0.97 (lesion, z 2), 0.60 (lesion, z -3) and 0.50 (lesion, z 4) count; 0.03 is background,
    # and p <= 0.5, sure too (z -1).
    edge = fixmatch.pseudo_label_loss(logits, teacher, np.array([1.0, 0.0]), 0.5, 0.5)
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731  (-log sigmoid(-z))
    assert float(edge) == pytest.approx(
        (softplus(-2.0) + softplus(3.0) + softplus(-1.0) + softplus(-4.0)) / 4
    )
    # bfloat16 logits (these are exact in it) are scored in float32: the same loss to float32 precision.
    half = fixmatch.pseudo_label_loss(
        jnp.asarray(logits, jnp.bfloat16), teacher, np.array([1.0, 0.0]), 0.5, 0.95
    )
    assert half.dtype == jnp.float32 and float(half) == pytest.approx(expected, rel=1e-6)
    # No unlabelled row: 0, not a division by zero.
    assert float(fixmatch.pseudo_label_loss(logits, teacher, np.zeros(2), 0.5, 0.95)) == 0.0


def test_unlabelled_rows_are_those_whose_weight_channel_is_zero_everywhere():
    mask = np.ones((3, 4, 4, 2), np.float32)
    mask[1, ..., 1] = 0.0  # unlabelled
    mask[2, :2, ..., 1] = 0.0  # labelled, its border zoomed out to weight 0
    rows = fixmatch.unlabelled_rows(mask)
    np.testing.assert_array_equal(np.asarray(rows), [0.0, 1.0, 0.0])
    assert rows.dtype == np.float32  # weights of the rows' losses, not a boolean mask


def test_the_slice_filter_keeps_rows_whose_pseudo_label_covers_at_least_the_share():
    # 4 rows of 10 pixels; lesion where p >= 0.5 (0.5 itself included):
    #   row 0: one pixel 0.9            -> share 0.1
    #   row 1: none (0.49 is background) -> 0.0
    #   row 2: two pixels, one at 0.5   -> 0.2
    #   row 3: every pixel 0.7          -> 1.0
    p = np.full((4, 2, 5, 1), 0.1, np.float32)
    p[0, 0, 0] = 0.9
    p[1, 1, 4] = 0.49
    p[2, 0, :2, 0] = (0.5, 0.8)
    p[3] = 0.7
    np.testing.assert_array_equal(np.asarray(fixmatch.rows_with_lesion(p, 0.5, 0.1)), [1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(fixmatch.rows_with_lesion(p, 0.5, 0.15)), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(fixmatch.rows_with_lesion(p, 0.5, 0.0)), [1, 1, 1, 1])
    # At mask threshold 0.6, 0.5 is background: row 2 is 0.1 lesion; 0.49 still is not.
    np.testing.assert_array_equal(np.asarray(fixmatch.rows_with_lesion(p, 0.6, 0.15)), [0, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(fixmatch.rows_with_lesion(p, 0.45, 0.1)), [1, 1, 1, 1])
    assert fixmatch.rows_with_lesion(p, 0.5, 0.1).dtype == np.float32


def test_the_strong_view_is_a_contrast_and_brightness_change_of_each_slice_plus_noise():
    rng = np.random.default_rng(0)
    images = (0.45 + 0.1 * rng.random((6, 16, 16, 1))).astype(np.float32)  # never clipped
    key = jax.random.PRNGKey(3)
    strong = np.asarray(fixmatch.strong_view(images, key, 0.3, 0.0), np.float64)
    contrasts = []
    for image, view in zip(images, strong, strict=True):
        # An affine map of the slice about its mean: (x - m) c + m + b, c in [0.7, 1.3], b in [-0.15, 0.15].
        contrast, intercept = np.polyfit(image.ravel(), view.ravel(), 1)
        mean = float(np.mean(image))
        brightness = intercept - mean * (1 - contrast)
        np.testing.assert_allclose(view, (image - mean) * contrast + mean + brightness, atol=1e-5)
        assert 0.7 <= contrast <= 1.3 and -0.15 <= brightness <= 0.15
        contrasts.append(contrast)
    assert len(set(np.round(contrasts, 4))) == 6  # each slice its own draw
    np.testing.assert_array_equal(strong, np.asarray(fixmatch.strong_view(images, key, 0.3, 0.0)))
    # Clipped to [0, 1], then the noise: white slices (mean 1) are 1 + brightness, clipped to at most 1,
    # black ones at least 0; with noise they are those values plus the noise, past the clip.
    for value in (0.0, 1.0):
        flat = np.full_like(images, value)
        clipped = np.asarray(fixmatch.strong_view(flat, key, 0.3, 0.0))
        assert np.min(clipped) >= 0.0 and np.max(clipped) <= 1.0 and np.any(clipped == value)
        noisy = np.asarray(fixmatch.strong_view(flat, key, 0.3, 0.05))
        assert np.std(noisy - clipped) == pytest.approx(0.05, rel=0.1)
        assert np.any(noisy > 1.0) if value else np.any(noisy < 0.0)
    # The draws' ranges, and the centre of each slice's contrast change: on 200 slices whose means spread
    # over 0.2-0.8 (never clipped at s 0.1), each view's mean is its slice's plus a brightness within
    # s/2 (about the batch's mean instead, it would be off by (m - M)(c - 1), up to 0.03), and the
    # contrasts (the fit's slopes) reach both ends of [1 - s, 1 + s].
    spread = 0.2 + 0.6 * rng.random((200, 1, 1, 1)) + 0.05 * rng.random((200, 8, 8, 1)) - 0.025
    views = np.asarray(fixmatch.strong_view(spread.astype(np.float32), key, 0.1, 0.0), np.float64)
    brightness = views.mean(axis=(1, 2, 3)) - spread.mean(axis=(1, 2, 3))
    assert np.max(np.abs(brightness)) <= 0.05 + 1e-5
    assert np.min(brightness) < -0.045 and np.max(brightness) > 0.045  # both ends of [-s/2, s/2]
    slopes = np.array([np.polyfit(x.ravel(), v.ravel(), 1)[0] for x, v in zip(spread, views, strict=True)])
    assert 0.9 - 1e-4 <= np.min(slopes) < 0.91 and 1.09 < np.max(slopes) <= 1.1 + 1e-4
    noise = np.asarray(fixmatch.strong_view(images, key, 0.0, 0.05)) - images
    assert np.std(noise) == pytest.approx(0.05, rel=0.1) and abs(np.mean(noise)) < 0.005
    # The view keeps the slices' dtype: its draws are made in it, so bfloat16 slices are not promoted.
    half = fixmatch.strong_view(jnp.asarray(images, jnp.bfloat16), key, 0.3, 0.05)
    assert half.dtype == jnp.bfloat16


def _fixmatch_config(**changes):
    config = make_consistency_config(**changes)
    config.consistency.method = "fixmatch"
    return config


@pytest.mark.parametrize("slice_filter", ["none", "one row", "every row"])
def test_the_step_adds_the_weighted_pseudo_label_loss_of_the_unlabelled_rows_to_the_supervised_loss(
    slice_filter,
):
    config = _fixmatch_config()
    config.consistency.noise_std = 0.05  # and strong_intensity_range 0.3
    model = models.build_model(config.model)
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 1), np.float32)
    state = steps.create_train_state(config, model, steps_per_epoch=2)
    # The untrained model's probabilities all lie within 1e-4 of 0.5, some at exactly 0.5 (all 4 features
    # 0); a steeper output layer with a bias spreads them, so that float32 rounding decides no pixel's
    # side of a threshold.
    output = {"kernel": 30 * state.params["Conv_0"]["kernel"], "bias": state.params["Conv_0"]["bias"] - 0.3}
    params = {**state.params, "Conv_0": output}
    variables = {"params": params, "batch_stats": state.batch_stats}
    teacher = sigmoid64(model.apply(variables, images, train=False))
    assert np.min(np.abs(teacher - 0.5)) > 1e-5
    # A confidence threshold halfway between two certainties from the median up keeps some pixels.
    certainty = np.sort(np.maximum(teacher, 1 - teacher).ravel())
    middle = len(certainty) // 2
    gap = middle + int(np.argmax(np.diff(certainty[middle:]) > 1e-5))
    threshold = float((certainty[gap] + certainty[gap + 1]) / 2)
    # At step 1 of a ramp-up over 2 steps: the term weighs 2 x exp(-5 (1 - 1/2)^2).
    state = state.replace(
        step=1,
        params=params,
        consistency=state.consistency._replace(confidence_threshold=threshold, rampup_steps=2),
    )
    assert state.consistency.method == "fixmatch"
    # No moving average in the optimizer: FixMatch's teacher is the model itself.
    assert not any(isinstance(part, mean_teacher.ParameterEmaState) for part in state.opt_state)
    masks = (rng.random((4, 32, 32, 1)) > 0.7).astype(np.float32)
    weights = np.ones((4, 32, 32, 1), np.float32)
    weights[2:] = 0.0  # two unlabelled rows
    batch = {"image": images, "mask": np.concatenate([masks, weights], axis=-1)}

    # The student's input: the labelled rows as they are, the unlabelled rows' strong view, drawn from the
    # step's own stream (the dropout key of step 1, folded with 1).
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 1)
    strong = np.asarray(fixmatch.strong_view(images, key, 0.3, 0.05))
    assert np.mean(np.abs(strong - images)) > 0.03
    student_input = np.concatenate([images[:2], strong[2:]])
    student_logits = model.apply(variables, student_input, train=True, mutable=["batch_stats"])[0]
    student_logits = np.asarray(student_logits, float)
    student = sigmoid64(student_logits)
    intersection = np.sum(weights * student * masks, axis=(1, 2, 3))
    total = np.sum(weights * student, axis=(1, 2, 3)) + np.sum(weights * masks, axis=(1, 2, 3))
    supervised = 1.0 - (2.0 * intersection + 1.0) / (total + 1.0)
    lesion = teacher >= 0.5
    confident = np.where(lesion, teacher >= threshold, teacher <= 1 - threshold)
    assert 0.05 < np.mean(confident[2:]) < 0.95  # both kept and dropped pixels
    # -log sigmoid(z) for lesion, -log(1 - sigmoid(z)) for background, in a form that does not overflow.
    softplus = np.maximum(student_logits, 0) + np.log1p(np.exp(-np.abs(student_logits)))
    entropy = softplus - lesion * student_logits
    per_row = np.mean(np.where(confident, entropy, 0.0), axis=(1, 2, 3))
    pseudo = np.mean(per_row[2:])  # the unlabelled rows' pixels only
    shares = np.mean(lesion[2:], axis=(1, 2, 3))
    assert abs(shares[0] - shares[1]) > 0.01 and np.max(shares) < 0.99
    if slice_filter == "one row":
        # A share between the two unlabelled rows' pseudo-label lesion shares: only the larger one teaches,
        # its own pixels' mean (not halved by the row left out).
        minimum = float(np.mean(shares))
        pseudo = per_row[2 + int(np.argmax(shares))]
    elif slice_filter == "every row":
        # Above both: the step is the supervised loss alone, not a division by zero.
        minimum = float(np.max(shares) + 0.005)
        pseudo = 0.0
    if slice_filter != "none":
        state = state.replace(consistency=state.consistency._replace(min_lesion_fraction=minimum))
    scale = 2.0 * np.exp(-1.25)
    expected = np.mean(supervised) + scale * pseudo

    trained, metrics = steps.train_step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    if slice_filter == "every row":
        leaves = jax.tree_util.tree_leaves(trained.params)
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    else:
        assert scale * pseudo > 0.01 * expected  # the term is large enough for the comparison to see it


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"consistency.method": "mixmatch"}, "consistency.method: must be 'mean_teacher' or 'fixmatch'"),
        (
            {"consistency.confidence_threshold": 0.4},
            "consistency.confidence_threshold: must be in [0.5, 1), got 0.4",
        ),
        (
            {"consistency.strong_intensity_range": 1.0},
            "consistency.strong_intensity_range: must be a number in [0, 1), got 1.0",
        ),
        (
            {"consistency.strong_intensity_range": 0.0, "consistency.noise_std": 0.0},
            "consistency.strong_intensity_range: FixMatch's strong view needs it or noise_std > 0",
        ),
        ({"data.unlabelled_fraction": 0.0}, "consistency.weight: FixMatch needs unlabelled slices"),
        ({"loss": "dice"}, "loss: FixMatch's mixed batches need a weighted loss"),
        ({"selftrain.rounds": 1}, "consistency.weight: FixMatch and selftrain.rounds > 0 are alternatives"),
        (
            {"consistency.min_lesion_fraction": 1.0},
            "consistency.min_lesion_fraction: must be a number in [0, 1), got 1.0",
        ),
        (
            {"consistency.method": "mean_teacher", "consistency.min_lesion_fraction": 0.05},
            "consistency.min_lesion_fraction: only consistency.method='fixmatch' reads this slice filter",
        ),
    ],
)
def test_bad_fixmatch_settings_are_refused_naming_the_key(changes, message):
    assert_refused(_fixmatch_config(), changes, message)


# Two whole runs (28-40 s in CI); out of the default suite for CI's 15 minutes: the mean-teacher
# crash-resume test keeps the consistency runs' resume (ramp-up, noise draws, data order) in it.
@pytest.mark.slow
def test_a_fixmatch_run_crashed_mid_epoch_resumes_bit_identical(tmp_path):
    # One epoch of 4 steps, checkpointed after each: the ramp-up, the strong views and the data order
    # must carry on from a mid-epoch checkpoint.
    config = _fixmatch_config(checkpoint_every_steps=1, num_epochs=1)
    config.consistency.rampup_epochs, config.consistency.noise_std = 1, 0.05
    config.consistency.confidence_threshold = 0.5  # every pixel: the tiny model is never 95% sure
    config.eval.checkpoint = "last"
    reference = train_to_the_end(config, tmp_path / "uninterrupted")
    resumed = train_to_the_end(config, tmp_path / "resumed", crash_after_step=2)
    assert int(resumed.step) == int(reference.step) == 4
    assert_same_training_state(resumed, reference)
    # A FixMatch checkpoint holds plain Adam: a config without consistency restores it.
    plain = make_consistency_config(num_epochs=1)
    plain.consistency.weight, plain.data.unlabelled_fraction = 0.0, 0.0
    plain.eval.checkpoint = "last"
    restored = steps.restore_state(plain, tmp_path / "uninterrupted")
    np.testing.assert_array_equal(
        np.asarray(jax.tree_util.tree_leaves(restored.params)[0]),
        np.asarray(jax.tree_util.tree_leaves(reference.params)[0]),
    )


def test_fixmatch_settings_come_from_the_consistency_keys_and_the_mask_threshold():
    config = _fixmatch_config()
    config.eval.threshold, config.consistency.rampup_epochs = 0.6, 3
    config.consistency.confidence_threshold, config.consistency.strong_intensity_range = 0.8, 0.2
    settings = mean_teacher.settings(config, steps_per_epoch=5)
    assert settings == (2.0, 15, 0.0, "fixmatch", 0.6, 0.8, 0.2, 0.0)
    assert not mean_teacher.averages_parameters(settings)
    config.consistency.min_lesion_fraction = 0.05
    assert mean_teacher.settings(config, steps_per_epoch=5).min_lesion_fraction == 0.05
    # A run folder's config.json from before the filter trains on every slice, as it did.
    del config.consistency["min_lesion_fraction"]
    assert mean_teacher.settings(config, steps_per_epoch=5).min_lesion_fraction == 0.0
    config.consistency.method = "mixmatch"  # unvalidated: refused rather than run as either
    with pytest.raises(ValueError, match="'mixmatch' is neither 'mean_teacher' nor 'fixmatch'"):
        mean_teacher.settings(config, steps_per_epoch=5)
