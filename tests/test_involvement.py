"""Lung involvement on phantoms of known areas and volumes, severity bands and the error over a split."""

import numpy as np
import pytest
from scipy import stats

from rdunet_jax import involvement


def box(shape, *ranges):
    """A boolean mask of `shape` that is True on the box given by one (start, stop) range per axis."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(start, stop) for start, stop in ranges)] = True
    return mask


def test_slice_phantom_of_known_areas():
    # Lungs: two 20 x 15 boxes (600 px). Infection: 10 x 12 inside the left lung (120 px) plus 30 px
    # outside the lungs, which count in the lesion area but not in the share: 120 / 600 = 20%.
    lungs = box((64, 64), (10, 30), (5, 20)) | box((64, 64), (10, 30), (40, 55))
    infection = box((64, 64), (12, 22), (6, 18)) | box((64, 64), (50, 53), (0, 10))
    result = involvement.involvement(lungs, infection, spacing=(0.5, 0.8))
    assert (result["lung_pixels"], result["infected_lung_pixels"], result["lesion_pixels"]) == (600, 120, 150)
    assert result["involvement_percent"] == pytest.approx(20.0)
    assert result["severity"] == "5-25%"
    assert result["lung_mm2"] == pytest.approx(600 * 0.4) and result["lesion_mm2"] == pytest.approx(150 * 0.4)


def test_volume_phantom_of_known_volumes_in_millilitres():
    # 4 slices of a 10 x 20 lung (800 voxels); infection fills 10 x 5 in two slices (100 voxels): 12.5%.
    # Voxels of 2.5 x 0.7 x 0.7 mm = 1.225 mm^3: lungs 0.98 mL, lesion 0.1225 mL.
    lungs = box((4, 32, 32), (0, 4), (5, 15), (5, 25))
    infection = box((4, 32, 32), (1, 3), (5, 15), (5, 10))
    result = involvement.involvement(lungs, infection, spacing=(2.5, 0.7, 0.7))
    assert result["involvement_percent"] == pytest.approx(12.5) and result["severity"] == "5-25%"
    assert result["lung_ml"] == pytest.approx(0.98) and result["lesion_ml"] == pytest.approx(0.1225)
    assert "lung_mm2" not in result
    assert "lung_ml" not in involvement.involvement(lungs, infection)  # no spacing, no millilitres


def test_no_lung_has_no_involvement_and_shapes_must_match():
    result = involvement.involvement(np.zeros((8, 8)), box((8, 8), (0, 2), (0, 2)))
    assert result["involvement_percent"] is None and result["severity"] is None
    with pytest.raises(ValueError, match="differ in shape"):
        involvement.involvement(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="one value per axis"):
        involvement.involvement(np.zeros((8, 8)), np.zeros((8, 8)), spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "percent, band",
    [(0.0, "<5%"), (4.99, "<5%"), (5.0, "5-25%"), (24.9, "5-25%"), (25.0, "25-50%"), (49.9, "25-50%"),
     (50.0, "50-75%"), (74.9, "50-75%"), (75.0, ">75%"), (100.0, ">75%")],
)  # fmt: skip
def test_severity_band_edges(percent, band):
    assert involvement.severity_band(percent) == band


def test_per_slice_and_per_volume_percentages_pool_pixels():
    lungs = np.stack([box((10, 10), (0, 10), (0, 10)), box((10, 10), (0, 5), (0, 10)), np.zeros((10, 10))])
    infection = np.stack([box((10, 10), (0, 1), (0, 10)), box((10, 10), (0, 3), (0, 10)), np.ones((10, 10))])
    infection[1, 8:] = True  # outside slice 1's lungs: in no share
    percents = involvement.per_slice_percent(lungs, infection)
    np.testing.assert_allclose(percents, [10.0, 60.0, np.nan])
    # Case a: (10 + 30) infected of (100 + 50) lung pixels; case b has no lung.
    volumes = involvement.per_volume_percent(lungs, infection, ["a", "a", "b"])
    assert volumes == {"a": pytest.approx(100 * 40 / 150), "b": None}
    # A slice of no volume (case None: one of MedSeg's unrelated slices) is in none; not a case "None".
    volumes = involvement.per_volume_percent(lungs, infection, [None, "a", "b"])
    assert volumes == {"a": pytest.approx(60.0), "b": None}


def test_involvement_error_against_scipy_with_an_undefined_item():
    predicted, expert = [10.0, 20.0, 30.0, None, 5.0], [12.0, 18.0, 36.0, 50.0, np.nan]
    error = involvement.involvement_error(predicted, expert)
    assert error["involvement_mae_points"] == pytest.approx((2 + 2 + 6) / 3)
    assert error["involvement_pearson_r"] == pytest.approx(stats.pearsonr([10, 20, 30], [12, 18, 36])[0])
    assert (error["involvement_num_scored"], error["involvement_num_undefined"]) == (3, 2)
    constant = involvement.involvement_error([10.0, 10.0], [1.0, 2.0])
    assert constant["involvement_pearson_r"] is None and constant["involvement_mae_points"] == pytest.approx(
        8.5
    )


def test_involvement_report_over_a_split_by_hand():
    # Three 10 x 10 slices, all lung in the experts' masks. Expert infection: 10, 30 and 60 rows of pixels
    # -> 10%, 30%, 60%; predicted: 20%, 30%, 40% with the predicted lungs missing half of slice 2 -> 80%.
    lungs = np.ones((3, 10, 10), bool)
    expert_infection = np.stack([box((10, 10), (0, 1), (0, 10)), box((10, 10), (0, 3), (0, 10)),
                                 box((10, 10), (0, 6), (0, 10))])  # fmt: skip
    predicted_infection = np.stack([box((10, 10), (0, 2), (0, 10)), box((10, 10), (0, 3), (0, 10)),
                                    box((10, 10), (0, 4), (0, 10))])  # fmt: skip
    predicted_lungs = lungs.copy()
    predicted_lungs[2, 5:] = False  # slice 2: 40 infected of 50 lung pixels -> 80%
    report = involvement.involvement_report(
        predicted_lungs, predicted_infection, lungs, expert_infection, case_ids=["a", "a", "b"]
    )
    assert report["per_slice"]["involvement_mae_points"] == pytest.approx((10 + 0 + 20) / 3)
    assert report["per_slice"]["involvement_pearson_r"] == pytest.approx(
        stats.pearsonr([20, 30, 80], [10, 30, 60])[0]
    )
    # Bands: 5-25% vs 5-25%, 25-50% vs 25-50%, >75% vs 50-75%.
    assert report["severity_agreement"] == pytest.approx(2 / 3)
    assert report["expert_mean_percent"] == pytest.approx(100 / 3)
    # Volume a: predicted (20 + 30) / 200 = 25%, expert (10 + 30) / 200 = 20%; b: 80% against 60%.
    assert report["per_volume"]["involvement_mae_points"] == pytest.approx((5 + 20) / 2)
    assert report["per_volume"]["involvement_num_scored"] == 2
    assert "per_volume" not in involvement.involvement_report(
        predicted_lungs, predicted_infection, lungs, expert_infection
    )


def test_a_lung_of_one_pixel_has_an_involvement_and_an_empty_one_divides_by_nothing():
    one_pixel = box((4, 4), (1, 2), (1, 2))
    assert involvement.involvement(one_pixel, one_pixel)["involvement_percent"] == 100.0
    lungs = np.stack([one_pixel, np.zeros((4, 4), bool)])
    with np.errstate(all="raise"):  # the lung-less slice is NaN without a 0 / 0 on the way
        percents = involvement.per_slice_percent(lungs, lungs)
    np.testing.assert_array_equal(percents, [100.0, np.nan])


def test_what_is_not_a_percentage_or_not_paired_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^involvement must be a percentage, got nan$"):
        involvement.severity_band(float("nan"))
    with pytest.raises(ValueError, match=r"^2 predicted and 3 expert involvements$"):
        involvement.involvement_error([1.0, 2.0], [1.0, 2.0, 3.0])


def test_the_correlation_needs_both_sides_to_vary_by_any_amount_and_nothing_scored_is_none():
    # Spreads well under one percentage point still correlate (by hand: both rise evenly, r = 1).
    small = involvement.involvement_error([0.1, 0.2, 0.3], [0.15, 0.25, 0.35])
    assert small["involvement_pearson_r"] == pytest.approx(1.0)
    assert involvement.involvement_error([0.1, 0.2], [3.0, 3.0])["involvement_pearson_r"] is None
    nothing = involvement.involvement_error([None, 1.0], [2.0, None])
    assert nothing == {
        "involvement_mae_points": None,
        "involvement_pearson_r": None,
        "involvement_num_scored": 0,
        "involvement_num_undefined": 2,
    }


def test_a_slice_without_lung_on_either_side_is_left_out_of_the_report():
    # Slice 0: both sides 10%. Slice 1: the experts' lung, none predicted. Slice 2: neither has lung.
    expert_lungs = np.stack([np.ones((10, 10), bool), np.ones((10, 10), bool), np.zeros((10, 10), bool)])
    predicted_lungs = np.stack([np.ones((10, 10), bool), np.zeros((10, 10), bool), np.zeros((10, 10), bool)])
    infection = np.stack([box((10, 10), (0, 1), (0, 10))] * 3)
    expert_infection = infection.copy()
    expert_infection[1, :3] = True  # 30% of the experts' lung on slice 1, which is not scored
    report = involvement.involvement_report(predicted_lungs, infection, expert_lungs, expert_infection)
    assert report["severity_agreement"] == 1.0
    assert report["per_slice"]["involvement_num_scored"] == 1
    # The experts' mean is over every slice with expert lung, scored or not: (10 + 30) / 2.
    assert report["expert_mean_percent"] == pytest.approx(20.0)
    none = involvement.involvement_report(
        predicted_lungs[1:], infection[1:], expert_lungs[2:3].repeat(2, 0), infection[1:]
    )
    assert none["severity_agreement"] is None and none["expert_mean_percent"] is None
