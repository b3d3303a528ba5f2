"""Intensity matching of the unlabelled pool ('window' and 'histogram'): hand-computed remappings,
scikit-image and numpy as references, a window change undone, the source the pool is read through (the
key's check is in test_config_lib's fuzz table)."""

import numpy as np
import pytest

from rdunet_jax import config_lib, datasets
from rdunet_jax.datasets import intensity_matching
from rdunet_jax.errors import UserError


def test_match_histogram_against_hand_computed_values():
    image = np.array([[0, 0, 10, 20]], np.uint8)  # quantiles: 0 -> 0.5, 10 -> 0.75, 20 -> 1
    reference = np.zeros(256, np.int64)
    reference[100], reference[200] = 1, 3  # quantiles: 100 -> 0.25, 200 -> 1
    # 0.5 and 0.75 lie a third and two thirds of the way from 0.25 to 1: 133.3 and 166.7.
    matched = intensity_matching.match_histogram(image, reference)
    np.testing.assert_array_equal(matched, [[133, 133, 167, 200]])
    assert matched.dtype == np.uint8
    # At or below the reference's first quantile, everything goes to its lowest level.
    # Quantiles now 50 -> 0.5, 100 -> 0.625, 200 -> 1: 0.75 lies a third of the way from 100 to 200.
    reference[50] = 4
    np.testing.assert_array_equal(intensity_matching.match_histogram(image, reference), [[50, 50, 133, 200]])
    # Below it: quantiles 50 -> 0.6, 100 -> 0.7, 200 -> 1; 0.5 goes to 50, 0.75 a sixth of the way to 200.
    reference[50] = 6
    np.testing.assert_array_equal(intensity_matching.match_histogram(image, reference), [[50, 50, 117, 200]])


def test_match_histogram_is_scikit_images_match_histograms_rounded():
    exposure = pytest.importorskip("skimage.exposure")  # in the test extra
    rng = np.random.default_rng(2)
    template = np.concatenate([rng.integers(90, 256, 3000), rng.integers(0, 60, 1000)]).astype(np.uint8)
    counts = np.histogram(template, bins=256, range=(0, 256))[0]
    for seed in range(5):
        image = np.random.default_rng(seed).beta(2, 5, (40, 30))
        image = (255 * image).astype(np.uint8)
        expected = np.round(exposure.match_histograms(image, template[None, :])).astype(np.uint8)
        np.testing.assert_array_equal(intensity_matching.match_histogram(image, counts), expected)


def test_an_image_matched_to_its_own_histogram_is_unchanged():
    image = np.random.default_rng(0).integers(0, 256, (17, 23), dtype=np.uint8)
    counts = np.histogram(image, bins=256, range=(0, 256))[0]
    np.testing.assert_array_equal(intensity_matching.match_histogram(image, counts), image)


def test_reference_percentiles_are_numpys_percentiles_of_the_pixels():
    rng = np.random.default_rng(3)
    for size in (1, 2, 7, 1000):
        pixels = rng.integers(0, 256, size)
        counts = np.bincount(pixels, minlength=256)
        percentiles = [0, 5, 37.5, 95, 100]
        np.testing.assert_allclose(
            intensity_matching.reference_percentiles(counts, percentiles), np.percentile(pixels, percentiles)
        )


def test_match_window_against_hand_computed_values():
    # The image 0..100: 5th and 95th percentiles 5 and 95. The reference 0..200: 10 and 190. So x goes to
    # 10 + (x - 5) * 180 / 90 = 2x: 3 -> 6, 50 -> 100, 100 -> 200.
    image = np.arange(101, dtype=np.uint8)
    reference = np.bincount(np.arange(201), minlength=256)
    matched = intensity_matching.match_window(image, reference)
    assert matched.dtype == np.uint8
    np.testing.assert_array_equal(matched[[0, 3, 50, 100]], [0, 6, 100, 200])
    np.testing.assert_array_equal(matched, 2 * image)
    # One more pixel, 130: the percentiles move to 5.05 and 95.95, and 130 maps past 255 (clipped).
    # x goes to 10 + (x - 5.05) * 180 / 90.9: 0 -> 0.0, 3 -> 5.94, 50 -> 99.01, 100 -> 198.02, 130 -> 257.5.
    image = np.concatenate([np.arange(101), [130]]).astype(np.uint8)
    matched = intensity_matching.match_window(image, reference)
    np.testing.assert_array_equal(matched[[0, 3, 50, 100, 101]], [0, 6, 99, 198, 255])


def test_window_matching_clips_below_black_as_well_as_above_white():
    # The second case above mirrored (x -> 255 - x, image and reference alike): every value is mirrored, and
    # 125, the mirror of 130, maps to 255 - 257.5 = -2.5, clipped to 0 rather than wrapped round to 253.
    image = 255 - np.concatenate([np.arange(101), [130]]).astype(np.uint8)
    reference = np.bincount(255 - np.arange(201), minlength=256)
    matched = intensity_matching.match_window(image, reference)
    np.testing.assert_array_equal(matched[[0, 3, 50, 100, 101]], [255, 249, 156, 57, 0])


def test_a_window_exactly_min_window_levels_wide_is_stretched():
    # Half the pixels 10, half 14: the 5th and 95th percentiles are 10 and 14, 4 levels apart (the limit),
    # so the slice is matched: 10 -> 10 and 14 -> 190, the reference's percentiles.
    image = np.repeat(np.array([10, 14], np.uint8), 50)
    reference = np.bincount(np.arange(201), minlength=256)
    assert intensity_matching.MIN_WINDOW_LEVELS == 4.0
    np.testing.assert_array_equal(np.unique(intensity_matching.match_window(image, reference)), [10, 190])


class _Split:
    """A labelled split as `pooled_histogram` reads it: records by index, its name as `split`."""

    def __init__(self, images, split=None):
        self.images = images
        if split is not None:
            self.split = split

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


def test_pooled_histogram_counts_every_image_of_the_split_as_int64():
    images = [np.array([[0, 3], [3, 255]], np.uint8), np.array([[3]], np.uint8)]
    counts = intensity_matching.pooled_histogram(_Split(images, "train"))
    expected = np.zeros(256, np.int64)
    expected[0], expected[3], expected[255] = 1, 3, 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int64


@pytest.mark.parametrize(("split", "named"), [("train", "split 'train'"), (None, "split '?'")])
def test_pooled_histogram_refuses_images_that_are_not_8_bit_naming_the_split(split, named):
    with pytest.raises(UserError) as raised:
        intensity_matching.pooled_histogram(_Split([np.zeros((2, 2), np.uint16)], split))
    assert (
        str(raised.value)
        == f"data.unlabelled_intensity_matching: needs 8-bit images, {named} holds uint16 ones"
    )


def test_pooled_histogram_of_a_split_without_pixels_is_refused_in_one_line():
    with pytest.raises(UserError) as raised:
        intensity_matching.pooled_histogram(_Split([], "train"))
    assert str(raised.value) == (
        "data.unlabelled_intensity_matching: the labelled training split holds no pixels"
    )


@pytest.mark.parametrize("match", ["match_window", "match_histogram"])
def test_a_wider_display_window_is_undone_by_either_matching(match):
    # A slice stored in a window twice as wide (intensities halved, then offset) is brought back to
    # the reference's, to within the levels the narrower copy merged.
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    windowed = (reference // 2 + 20).astype(np.uint8)
    counts = np.histogram(reference, bins=256, range=(0, 256))[0]
    matched = getattr(intensity_matching, match)(windowed, counts).astype(int)
    assert np.abs(matched - reference).max() <= 2
    assert np.abs(windowed.astype(int) - reference).mean() > 40


@pytest.mark.parametrize("match", ["match_window", "match_histogram"])
def test_only_8_bit_images_are_matched_in_one_line(match):
    with pytest.raises(UserError) as raised:
        getattr(intensity_matching, match)(np.zeros((4, 4), np.float32), np.ones(256))
    assert str(raised.value) == (
        "data.unlabelled_intensity_matching: needs 8-bit images, the unlabelled split holds float32 ones"
    )


def test_a_nearly_uniform_slice_is_left_as_it_is_by_window_matching():
    image = np.full((10, 10), 40, np.uint8)
    image[0, :3] = (0, 200, 255)  # 3% of the pixels: the percentiles stay at 40
    reference = np.bincount(np.arange(201), minlength=256)
    np.testing.assert_array_equal(intensity_matching.match_window(image, reference), image)


@pytest.mark.parametrize(
    ("mode", "cv_fold"), [("window", None), ("histogram", None), ("window", 0), ("window", 1)]
)
def test_the_pool_is_read_matched_to_the_training_slices_and_the_labelled_splits_are_not(
    tmp_path, mode, cv_fold
):
    data = config_lib.base_config().data
    data.name, data.data_dir, data.image_size = "synthetic", str(tmp_path / "tfds"), 32
    data.num_train, data.num_validation, data.num_test, data.num_unlabelled = 4, 2, 2, 3
    if cv_fold is not None:  # the reference is the fold's training slices, never its held-out ones
        data.cv_folds, data.cv_fold = 2, cv_fold
    raw_pool = datasets.load_source(data, "unlabelled")
    raw_train = datasets.load_source(data, "train")
    data.unlabelled_intensity_matching = mode
    pool = datasets.load_source(data, "unlabelled")
    train = datasets.load_source(data, "train")
    train_images = np.stack([train[index]["image"] for index in range(len(train))])
    counts = np.histogram(train_images, bins=256, range=(0, 256))[0]
    match = getattr(intensity_matching, f"match_{mode}")
    for index in range(3):
        np.testing.assert_array_equal(pool[index]["image"], match(raw_pool[index]["image"], counts))
        assert pool[index]["id"] == raw_pool[index]["id"]
    assert not np.array_equal(pool[0]["image"], raw_pool[0]["image"])
    for index in range(len(train)):
        np.testing.assert_array_equal(train[index]["image"], raw_train[index]["image"])


def test_matching_a_pool_that_nothing_reads_is_refused_in_one_line():
    from rdunet_jax import config_validation
    from rdunet_jax.errors import UserError

    config = config_lib.base_config()
    config.data.unlabelled_intensity_matching = "window"
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value) == (
        "data.unlabelled_intensity_matching: only the unlabelled split is matched, and this config does not "
        "read it (selftrain.rounds, data.pseudo_label_dir or consistency.weight)"
    )
