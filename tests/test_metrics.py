"""Metrics against hand-computed values, including the empty-mask rules."""

import warnings

import numpy as np
import pytest
from helpers import ellipsoid, independent_hd95

from rdunet_jax import metrics


def _masks(rows):
    return np.array(rows, dtype=np.uint8)


def test_confusion_counts_per_slice():
    prediction = np.array([_masks([[1, 1], [0, 0]]), _masks([[0, 0], [0, 0]])])
    target = np.array([_masks([[1, 0], [1, 0]]), _masks([[0, 0], [0, 1]])])
    tp, fp, fn, tn = metrics.confusion_counts(prediction, target)
    np.testing.assert_array_equal(tp, [1, 0])
    np.testing.assert_array_equal(fp, [1, 0])
    np.testing.assert_array_equal(fn, [1, 1])
    np.testing.assert_array_equal(tn, [1, 3])


def test_slice_metrics_hand_computed():
    # TP=3, FP=1, FN=2, TN=4
    result = metrics.slice_metrics([3], [1], [2], [4])
    assert result["dice"][0] == pytest.approx(6 / 9)
    assert result["jaccard"][0] == pytest.approx(3 / 6)
    assert result["precision"][0] == pytest.approx(3 / 4)
    assert result["recall"][0] == pytest.approx(3 / 5)
    assert result["specificity"][0] == pytest.approx(4 / 5)


def test_both_empty_scores_one_and_one_empty_scores_zero():
    # slice 0: mask and prediction empty; slice 1: lesion missed; slice 2: false alarm
    result = metrics.slice_metrics([0, 0, 0], [0, 0, 5], [0, 4, 0])
    for name in ("dice", "jaccard", "precision", "recall"):
        assert result[name][0] == 1.0
    assert result["dice"][1] == 0.0 and result["recall"][1] == 0.0 and result["precision"][1] == 0.0
    assert result["dice"][2] == 0.0 and result["precision"][2] == 0.0 and result["recall"][2] == 0.0


def test_summary_means_f_score_and_pooled_values():
    # slice A: TP=8 FP=0 FN=0 (perfect); slice B: TP=1 FP=1 FN=2
    summary = metrics.summarize([8, 1], [0, 1], [0, 2], [10, 10])
    assert summary["num_slices"] == 2
    assert summary["dice"] == pytest.approx((1.0 + 2 / 5) / 2)
    assert summary["jaccard"] == pytest.approx((1.0 + 1 / 4) / 2)
    precision, recall = (1.0 + 1 / 2) / 2, (1.0 + 1 / 3) / 2
    assert summary["precision"] == pytest.approx(precision)
    assert summary["recall"] == pytest.approx(recall)
    assert summary["f_score"] == pytest.approx(2 * precision * recall / (precision + recall))
    # The F-score is not mean Dice: the paper's formula would have repeated Dice.
    assert summary["f_score"] != pytest.approx(summary["dice"])
    assert summary["global_dice"] == pytest.approx(2 * 9 / (2 * 9 + 1 + 2))
    assert summary["dice_std"] == pytest.approx(np.std([1.0, 0.4]))


# --- HD95 ---------------------------------------------------------------------------------


def test_hd95_of_single_pixels_is_their_distance_in_pixels_and_mm():
    prediction = np.zeros((10, 12), np.uint8)
    target = np.zeros((10, 12), np.uint8)
    prediction[2, 2], target[2, 7] = 1, 1
    assert metrics.hausdorff95(prediction, target) == pytest.approx(5.0)
    # Columns 0.5 mm apart, rows 2 mm: 5 columns are 2.5 mm.
    assert metrics.hausdorff95(prediction, target, spacing=(2.0, 0.5)) == pytest.approx(2.5)
    target[2, 7], target[6, 2] = 0, 1  # 4 rows away
    assert metrics.hausdorff95(prediction, target, spacing=(2.0, 0.5)) == pytest.approx(8.0)


def test_hd95_of_a_shifted_square_is_the_shift():
    target = np.zeros((20, 20), np.uint8)
    target[5:11, 5:11] = 1
    prediction = np.roll(target, 3, axis=1)
    # Every border pixel is at most 3 columns from the other border; most of the left/right edges are 3.
    assert metrics.hausdorff95(prediction, target) == pytest.approx(
        independent_hd95(prediction, target, (1.0, 1.0))
    )
    assert metrics.hausdorff95(prediction, target) == pytest.approx(3.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 2.5)])
def test_hd95_matches_a_brute_force_computation_on_irregular_masks(spacing):
    target = np.zeros((24, 30), np.uint8)
    target[3:12, 4:15] = 1
    target[14:20, 20:27] = 1  # a second lesion
    target[6:9, 8:11] = 0  # with a hole
    prediction = np.zeros_like(target)
    prediction[4:14, 6:16] = 1
    prediction[0:2, 28:30] = 1  # a false alarm far away, on the image edge
    expected = independent_hd95(prediction, target, spacing)
    assert metrics.hausdorff95(prediction, target, spacing) == pytest.approx(expected)


ANISOTROPIC_SPACING = (0.7, 0.8, 5.0)  # mm: rows, columns, slices (thick CT slices)


def test_3d_hd95_in_mm_with_anisotropic_spacing_matches_a_brute_force_computation():
    """Slice spacing 5 mm against 0.7 x 0.8 mm pixels: the prediction is an ellipsoid of other radii, four
    rows off, with a false alarm at the volume's edge; the code must weigh every axis by its spacing."""
    shape = (24, 24, 7)
    target = ellipsoid(shape, (9, 12, 3), (3.0, 5.0, 7.0), ANISOTROPIC_SPACING)
    prediction = ellipsoid(shape, (5, 11, 3), (6.0, 3.0, 7.0), ANISOTROPIC_SPACING)
    prediction[22:24, 0:2, 0] = True
    expected = independent_hd95(prediction, target, ANISOTROPIC_SPACING)
    assert metrics.hausdorff95(prediction, target, ANISOTROPIC_SPACING) == pytest.approx(expected, rel=1e-9)
    # The masks make the plausible mistakes visible: slices taken as 1 mm apart, row and column spacings
    # swapped, the maximum instead of the 95th percentile, or the larger of the two directed 95th
    # percentiles instead of the percentile of their union each give a number at least 10% off.
    forward = metrics.surface_distances(prediction, target, ANISOTROPIC_SPACING)
    backward = metrics.surface_distances(target, prediction, ANISOTROPIC_SPACING)
    mistakes = [
        independent_hd95(prediction, target, spacing) for spacing in ((0.7, 0.8, 1.0), (0.8, 0.7, 5.0))
    ]
    mistakes += [
        max(forward.max(), backward.max()),
        max(np.percentile(forward, 95), np.percentile(backward, 95)),
    ]
    for mistaken in mistakes:
        assert abs(mistaken - expected) > 0.1 * expected


def test_directed_surface_distances_in_mm_are_the_nearest_border_voxel_distances():
    """`surface_distances` from each border voxel of one mask to the other's border, against cdist."""
    from scipy.spatial.distance import cdist

    shape = (12, 14, 5)
    source = ellipsoid(shape, (5, 6, 2), (3.0, 4.0, 6.0), ANISOTROPIC_SPACING)
    destination = ellipsoid(shape, (7, 8, 3), (4.0, 3.0, 8.0), ANISOTROPIC_SPACING)
    spacing = np.asarray(ANISOTROPIC_SPACING)

    def border(mask):  # a voxel with one of its 6 face neighbours outside (or beyond the edge)
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        neighbours = [
            padded[:-2, 1:-1, 1:-1],
            padded[2:, 1:-1, 1:-1],
            padded[1:-1, :-2, 1:-1],
            padded[1:-1, 2:, 1:-1],
            padded[1:-1, 1:-1, :-2],
            padded[1:-1, 1:-1, 2:],
        ]
        return inner & ~np.logical_and.reduce(neighbours)

    source_points = np.argwhere(border(source)) * spacing  # argwhere's order is the boolean mask's order
    nearest = cdist(source_points, np.argwhere(border(destination)) * spacing).min(axis=1)
    np.testing.assert_allclose(metrics.surface_distances(source, destination, spacing), nearest, rtol=1e-12)


def test_hd95_empty_rules_and_summary_counts():
    empty, lesion = np.zeros((8, 8)), np.zeros((8, 8))
    lesion[2:4, 2:4] = 1
    assert np.isnan(metrics.hausdorff95(empty, empty))
    assert metrics.hausdorff95(lesion, empty) == np.inf
    assert metrics.hausdorff95(empty, lesion) == np.inf
    summary = metrics.summarize_hausdorff95([2.0, 4.0, float("nan"), float("inf"), float("inf")])
    assert summary == {
        "hd95": 3.0,
        "hd95_std": 1.0,
        "hd95_num_slices": 2,
        "hd95_num_both_empty": 1,
        "hd95_num_one_empty": 2,
    }
    assert metrics.summarize_hausdorff95([float("nan")])["hd95"] is None


# --- Lesion size --------------------------------------------------------------------------------


def test_lesion_statistics_on_known_components():
    target = np.zeros((20, 20), np.uint8)
    target[1:3, 1:3] = 1  # small: 4 pixels
    target[3, 3] = 1  # touches it diagonally: the same lesion under 8-connectivity (5 pixels)
    target[10:16, 10:16] = 1  # large: 36 pixels
    target[1, 15:17] = 1  # small: 2 pixels, missed
    prediction = np.zeros_like(target)
    prediction[10:16, 12:18] = 1  # 24 of the large lesion's 36 pixels, and 12 outside it
    prediction[1:3, 1:3] = 1  # the small lesion but its diagonal pixel
    prediction[3:5, 6] = 1  # a false alarm touching no lesion: not part of any lesion's Dice
    lesions = metrics.lesion_statistics(prediction, target)
    by_area = sorted(lesions, key=lambda lesion: lesion["area"])
    assert [lesion["area"] for lesion in by_area] == [2.0, 5.0, 36.0]  # pixels
    assert [lesion["detected"] for lesion in by_area] == [False, True, True]
    assert by_area[0]["dice"] == 0.0
    assert by_area[1]["dice"] == pytest.approx(2 * 4 / (5 + 4))
    assert by_area[2]["dice"] == pytest.approx(2 * 24 / (36 + 36))  # the whole overlapping component

    summary = metrics.lesion_size_summary(lesions, small_area=10.0)
    assert summary["small"]["num_lesions"] == 2 and summary["large"]["num_lesions"] == 1
    assert summary["small"]["detection_rate"] == 0.5 and summary["large"]["detection_rate"] == 1.0
    assert summary["small"]["dice"] == pytest.approx((0.0 + 8 / 9) / 2)
    assert summary["large"]["dice"] == pytest.approx(48 / 72)
    assert summary["all"]["num_lesions"] == 3
    assert summary["small"]["mean_area"] == 3.5 and summary["large"]["mean_area"] == 36.0
    at_the_boundary = metrics.lesion_size_summary(lesions, small_area=36.0)  # "small" is strictly below
    assert at_the_boundary["small"]["num_lesions"] == 2 and at_the_boundary["large"]["num_lesions"] == 1
    assert metrics.lesion_size_summary(lesions, small_area=36.5)["small"]["num_lesions"] == 3
    assert metrics.lesion_statistics(prediction, np.zeros_like(target)) == []
    assert metrics.lesion_size_summary([], 10.0)["small"]["dice"] is None


# --- Mutation-testing survivors (experiments/results/mutation) ------------------------------------------


def test_confusion_counts_tell_every_count_apart():
    """Per slice of a (2, 3, 3) batch, TP, FP, FN and TN all differ, so no count can stand in for another."""
    prediction = np.array(
        [_masks([[1, 1, 1], [1, 0, 0], [0, 0, 0]]), _masks([[0, 0, 0], [0, 1, 0], [0, 0, 0]])]
    )
    target = np.array([_masks([[1, 0, 0], [1, 1, 1], [1, 0, 0]]), _masks([[1, 1, 0], [0, 1, 0], [0, 0, 0]])])
    tp, fp, fn, tn = metrics.confusion_counts(prediction, target)
    # slice 0: TP at (0,0), (1,0); FP at (0,1), (0,2); FN at (1,1), (1,2), (2,0); TN the other 2 pixels.
    np.testing.assert_array_equal(tp, [2, 1])
    np.testing.assert_array_equal(fp, [2, 0])
    np.testing.assert_array_equal(fn, [3, 2])
    np.testing.assert_array_equal(tn, [2, 6])


def test_hd95_summary_averages_in_float64_and_has_no_std_without_finite_values():
    # float32 distances: 2**24 + 1 rounds back to 2**24 in float32, so a float32 mean would be 4194304.0.
    summary = metrics.summarize_hausdorff95(np.array([2.0**24, 1.0, 1.0, 1.0], np.float32))
    assert summary["hd95"] == (2**24 + 3) / 4
    none_finite = metrics.summarize_hausdorff95([float("nan"), float("inf")])
    assert none_finite["hd95"] is None and none_finite["hd95_std"] is None


def test_lesion_statistics_of_a_single_lesion_with_a_diagonally_joined_false_pixel():
    """One lesion (2x2); the prediction covers it plus a pixel touching its corner diagonally: under
    8-connectivity that pixel belongs to the overlapping predicted component, so Dice is 2*4 / (4 + 5)."""
    target = np.zeros((8, 8), np.uint8)
    target[2:4, 2:4] = 1
    prediction = target.copy()
    prediction[4, 4] = 1
    (lesion,) = metrics.lesion_statistics(prediction, target)
    assert lesion == {"area": 4.0, "detected": True, "dice": pytest.approx(8 / 9)}


def test_f_score_harmonic_mean_by_hand_including_zero_and_equal_inputs():
    assert metrics.harmonic_mean(0.0, 0.0) == 0.0  # no precision and no recall: F 0, not a division by zero
    assert metrics.harmonic_mean(0.5, 0.5) == 0.5
    assert metrics.harmonic_mean(0.25, 0.75) == pytest.approx(2 * 0.25 * 0.75 / 1.0)
    # Every slice a miss or a false alarm: mean precision and recall 0, so the F-score is 0.
    assert metrics.summarize([0, 0], [3, 0], [0, 2])["f_score"] == 0.0


def test_summary_reports_specificity_when_true_negatives_are_given():
    # slice A: TN=10, FP=0 -> 1; slice B: TN=6, FP=2 -> 0.75
    summary = metrics.summarize([8, 1], [0, 2], [0, 2], [10, 6])
    assert summary["specificity"] == pytest.approx((1.0 + 0.75) / 2)
    assert summary["specificity_std"] == pytest.approx(0.125)
    assert "specificity" not in metrics.summarize([8, 1], [0, 2], [0, 2])


def test_summary_of_no_slices_is_nan_without_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would be an error here
        summary = metrics.summarize([], [], [], [])
    assert summary["num_slices"] == 0
    for name in ("dice", "jaccard", "precision", "recall", "specificity"):
        assert np.isnan(summary[name]) and np.isnan(summary[f"{name}_std"])


def test_lesion_size_summary_by_hand_with_an_empty_group():
    lesions = [
        {"area": 3.0, "detected": True, "dice": 0.5},
        {"area": 5.0, "detected": False, "dice": 0.0},
        {"area": 20.0, "detected": True, "dice": 0.9},
    ]
    summary = metrics.lesion_size_summary(lesions, small_area=10.0)
    assert summary["small"] == {
        "num_lesions": 2,
        "detection_rate": 0.5,
        "dice": 0.25,
        "dice_std": 0.25,
        "mean_area": 4.0,
    }
    assert summary["large"]["dice_std"] == 0.0 and summary["all"]["dice_std"] == pytest.approx(
        np.std([0.5, 0, 0.9])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty group is None, not numpy's warned-about NaN
        no_small = metrics.lesion_size_summary(lesions, small_area=1.0)["small"]
    assert no_small == {
        "num_lesions": 0,
        "detection_rate": None,
        "dice": None,
        "dice_std": None,
        "mean_area": None,
    }


def test_ratios_with_a_denominator_of_one_and_empty_slices_without_division_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the zero denominators of slice 0 must not be divided by
        result = metrics.slice_metrics([0, 1], [0, 0], [0, 0], [4, 0])
    # slice 1: one pixel, found: Jaccard, precision and recall are 1/1, Dice 2/2; no negatives to flag, so
    # specificity 0/0 follows the empty rule (1.0)
    for name in ("dice", "jaccard", "precision", "recall", "specificity"):
        np.testing.assert_array_equal(result[name], [1.0, 1.0])


def test_slice_metrics_of_narrow_integer_counts_do_not_overflow():
    # uint8 counts: 2 * TP = 400 would wrap to 144 without the float64 conversion
    result = metrics.slice_metrics(
        np.array([200], np.uint8), np.array([0], np.uint8), np.array([100], np.uint8)
    )
    assert result["dice"][0] == pytest.approx(400 / 500)


# --- Per-class metrics ----------------------------------------------------------------------------------


def _label_maps(pixels_by_slice):
    """4x4 label maps from {label: [(row, column), ...]} per slice."""
    maps = np.zeros((len(pixels_by_slice), 4, 4), np.uint8)
    for index, pixels in enumerate(pixels_by_slice):
        for label, coordinates in pixels.items():
            for row, column in coordinates:
                maps[index, row, column] = label
    return maps


SQUARE = [(2, 0), (2, 1), (3, 0), (3, 1)]
# Slice A: class 1 half found, class 2 absent and not predicted. Slice B: class 1 exact, class 2 found
# with one false pixel. Slice C: class 1 absent but predicted on one pixel, class 2 missed entirely.
EXPERT = _label_maps([{1: [(0, 0), (0, 1)]}, {1: SQUARE, 2: [(0, 3)]}, {2: [(3, 0)]}])
PREDICTED = _label_maps([{1: [(0, 0), (1, 0)]}, {1: SQUARE, 2: [(0, 3), (1, 3)]}, {1: [(3, 3)]}])


def test_class_masks_split_a_label_map_into_one_channel_per_class():
    masks = metrics.class_masks(np.array([[0, 1], [2, 2]]), 3)
    assert masks.shape == (2, 2, 3) and masks.dtype == bool
    np.testing.assert_array_equal(masks[..., 0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(masks[..., 1], [[0, 0], [1, 1]])
    assert not masks[..., 2].any()


def test_per_class_metrics_by_hand_with_a_class_absent_from_a_slice():
    result = metrics.per_class_summary(
        metrics.class_masks(PREDICTED, 2), metrics.class_masks(EXPERT, 2), ("ggo", "consolidation")
    )
    assert list(result) == ["ggo", "consolidation"]
    ggo, consolidation = result["ggo"], result["consolidation"]
    # ggo on A (TP 1, FP 1, FN 1) and B (exact); C lacks it and has one false pixel.
    assert (ggo["num_slices_present"], ggo["num_slices_absent"]) == (2, 1)
    assert ggo["dice"] == pytest.approx((1 / 2 + 1) / 2)
    assert ggo["jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    assert ggo["precision"] == pytest.approx(0.75) and ggo["recall"] == pytest.approx(0.75)
    assert ggo["global_dice"] == pytest.approx(2 * 5 / (2 * 5 + 2 + 1))  # TP 5, FP 1 + 1, FN 1
    assert ggo["false_positive_rate"] == 1.0
    # HD95 on A: distances {0, 1} each way, 95th percentile of [0, 0, 1, 1] = 1; B exact: 0.
    assert ggo["hd95"] == pytest.approx(0.5) and ggo["hd95_num_slices"] == 2
    # consolidation on B (TP 1, FP 1) and C (missed); A lacks it and none is predicted there.
    assert (consolidation["num_slices_present"], consolidation["num_slices_absent"]) == (2, 1)
    assert consolidation["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert consolidation["jaccard"] == pytest.approx(0.25)
    assert consolidation["precision"] == pytest.approx(0.25) and consolidation["recall"] == pytest.approx(0.5)
    assert consolidation["global_dice"] == pytest.approx(2 / 4)
    assert consolidation["false_positive_rate"] == 0.0
    # B: distances [0, 1] and [0]: 95th percentile of [0, 0, 1] = 0.9; C has no prediction (one empty).
    assert consolidation["hd95"] == pytest.approx(0.9)
    assert (consolidation["hd95_num_slices"], consolidation["hd95_num_one_empty"]) == (1, 1)


def test_per_class_hd95_uses_the_pixel_spacing():
    # Rows 2 mm apart, columns 1 mm: on A the distances are [0, 0, 1, 2] mm, 95th percentile 1.85.
    result = metrics.per_class_summary(
        metrics.class_masks(PREDICTED, 2),
        metrics.class_masks(EXPERT, 2),
        ("ggo", "consolidation"),
        (2.0, 1.0),
    )
    assert result["ggo"]["hd95"] == pytest.approx((1.85 + 0) / 2)
    per_slice_spacing = np.array([[2.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    result = metrics.per_class_summary(
        metrics.class_masks(PREDICTED, 2), metrics.class_masks(EXPERT, 2), ("a", "b"), per_slice_spacing
    )
    assert result["a"]["hd95"] == pytest.approx(1.85 / 2) and result["b"]["hd95"] == pytest.approx(0.9)


def test_a_class_no_slice_contains_has_no_means_but_a_false_positive_rate():
    expert = np.zeros((2, 4, 4, 1), bool)
    predicted = expert.copy()
    predicted[1, 0, 0, 0] = True
    result = metrics.per_class_summary(predicted, expert, ("effusion",))["effusion"]
    assert result["num_slices_present"] == 0 and result["dice"] is None and result["hd95"] is None
    assert result["false_positive_rate"] == 0.5 and result["global_dice"] == 0.0


def test_per_class_summary_refuses_masks_that_do_not_match_the_classes():
    masks = np.zeros((2, 4, 4, 2), bool)
    with pytest.raises(ValueError, match="classes"):
        metrics.per_class_summary(masks, masks, ("ggo",))
    with pytest.raises(ValueError, match="classes"):
        metrics.per_class_summary(masks, masks[..., :1], ("ggo", "consolidation"))
