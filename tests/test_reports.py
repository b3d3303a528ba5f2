"""The per-slice CSV and the small-lesion area, against hand computations."""

import csv
import io

import pytest

from rdunet_jax import reports


def _row(slice_id, tp, fp, fn, tn, hd95, case_id=None, slice_index=None):
    return {
        "id": slice_id,
        "case_id": case_id,
        "slice_index": slice_index,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "hd95": hd95,
        "lesion_pixels": tp + fn,
        "predicted_pixels": tp + fp,
    }


def test_slices_csv_rows_hold_the_hand_computed_values_and_hd95_status():
    rows = [
        _row("a", tp=3, fp=1, fn=2, tn=10, hd95=1.5, case_id="c1", slice_index=4),
        _row("b", tp=0, fp=0, fn=0, tn=16, hd95=float("nan")),
        _row("c", tp=0, fp=2, fn=0, tn=14, hd95=float("inf")),
    ]
    table = list(csv.DictReader(io.StringIO(reports.slices_csv(rows))))
    assert list(table[0]) == list(reports.SLICE_COLUMNS)
    first = table[0]
    assert (first["id"], first["case_id"], first["slice_index"]) == ("a", "c1", "4")
    assert float(first["dice"]) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2), rel=1e-5)  # 0.666667
    assert first["dice"] == "0.666667"  # six significant digits
    assert float(first["jaccard"]) == pytest.approx(3 / 6, rel=1e-5)
    assert float(first["precision"]) == pytest.approx(3 / 4, rel=1e-5)
    assert float(first["recall"]) == pytest.approx(3 / 5, rel=1e-5)
    assert float(first["specificity"]) == pytest.approx(10 / 11, rel=1e-5)
    assert (first["hd95"], first["hd95_status"]) == ("1.5", "ok")
    assert (first["lesion_pixels"], first["predicted_pixels"]) == ("5", "4")
    # Both empty: every ratio is 1 and HD95 is left out; one empty: 0 and counted apart.
    assert (table[1]["case_id"], table[1]["slice_index"]) == ("", "")
    assert (table[1]["dice"], table[1]["hd95"], table[1]["hd95_status"]) == ("1", "", "both_empty")
    assert (table[2]["dice"], table[2]["hd95"], table[2]["hd95_status"]) == ("0", "", "one_empty")


@pytest.mark.parametrize(("image_size", "area"), [(256, 100.0), (128, 25.0), (512, 400.0), (32, 1.5625)])
def test_small_lesions_keep_the_papers_100_pixels_at_256_as_a_fraction_of_the_slice(image_size, area):
    assert reports.small_lesion_area(image_size) == area
