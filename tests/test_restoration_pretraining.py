"""experiments/restoration_pretraining.py: Models Genesis' corruptions against hand-checkable properties,
and a tiny pretraining whose checkpoint starts a run through model_init."""

import jax
import numpy as np
import pytest
from helpers import make_tiny_config

from experiments import restoration_pretraining as pretraining
from rdunet_jax import checkpoints, models, steps


class _FixedDraws:
    """An rng whose random(2) calls return the given control points in turn."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self, size=None):
        return np.asarray(self.draws.pop(0))


def test_a_bezier_curve_through_evenly_spaced_points_on_the_diagonal_is_the_identity():
    x, y = pretraining.bezier_curve(_FixedDraws([1 / 3, 1 / 3], [2 / 3, 2 / 3]), points=101)
    np.testing.assert_allclose(x, np.linspace(0, 1, 101), atol=1e-12)
    np.testing.assert_allclose(y, x, atol=1e-12)


def test_a_random_bezier_curve_maps_0_to_0_and_1_to_1_and_never_decreases():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = pretraining.bezier_curve(rng)
        assert x[0] == y[0] == 0 and x[-1] == y[-1] == 1
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)


def test_local_shuffling_permutes_pixels_inside_one_window_only():
    image = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    shuffled = pretraining.shuffle_local_pixels(image, np.random.default_rng(0), blocks=1)
    changed = np.argwhere(shuffled != image)
    assert len(changed) > 1
    rows, columns = changed[:, 0], changed[:, 1]
    # The window is at most a tenth of the side (6 px here) in each direction.
    assert rows.max() - rows.min() < 6 and columns.max() - columns.min() < 6
    window = (slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))
    np.testing.assert_array_equal(np.sort(shuffled[window], axis=None), np.sort(image[window], axis=None))


def test_in_painting_changes_at_most_five_boxes_of_a_third_and_out_painting_keeps_a_box():
    image = np.full((63, 63), 2.0, np.float32)  # noise lies in [0, 1): every painted pixel shows
    for seed in range(10):
        painted = pretraining.in_paint(image, np.random.default_rng(seed))
        assert 0 < np.count_nonzero(painted != 2.0) <= 5 * 21 * 21
        kept = pretraining.out_paint(image, np.random.default_rng(seed)) == 2.0
        assert 27 * 27 <= np.count_nonzero(kept) < 63 * 63  # a box of 3/7 of the side, noise elsewhere


def test_restoration_batches_are_a_pure_function_of_seed_and_step_and_target_the_flipped_slice():
    images = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    first = pretraining.restoration_batch(images, [0, 4], seed=1, step=7)
    again = pretraining.restoration_batch(images, [0, 4], seed=1, step=7)
    other = pretraining.restoration_batch(images, [0, 4], seed=1, step=8)
    for key in ("image", "target"):
        np.testing.assert_array_equal(first[key], again[key])
        assert first[key].shape == (2, 32, 32, 1) and first[key].dtype == np.float32
    assert not np.array_equal(first["image"], other["image"])
    for target, index in zip(first["target"][..., 0], [0, 4], strict=True):
        flips = [images[index], images[index][:, ::-1], images[index][::-1], images[index][::-1, ::-1]]
        assert any(np.array_equal(target, flip) for flip in flips)


@pytest.mark.slow
def test_a_tiny_pretraining_saves_weights_that_model_init_reads(tmp_path):
    config = make_tiny_config(num_unlabelled=8)
    summary = pretraining.pretrain(config, tmp_path, epochs=2)
    assert summary["pool_slices"] == 8 and summary["steps"] == 2 * 8 // config.batch_size
    assert all(np.isfinite(record["loss"]) for record in summary["log"])
    params, batch_stats, step = checkpoints.restore_weights(tmp_path, config.model, config.data)
    assert step == summary["steps"]
    fresh = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(fresh.params), strict=True
        )
    ]
    assert any(moved)
