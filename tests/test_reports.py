"""The per-slice CSV and the small-lesion area, against hand computations."""

import csv
import io
import types

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


def _size_group(num_lesions, mean_area=None, detection_rate=None, dice=None, dice_std=None):
    return {
        "num_lesions": num_lesions,
        "mean_area": mean_area,
        "detection_rate": detection_rate,
        "dice": dice,
        "dice_std": dice_std,
    }


def _lesion_sizes(area_unit="pixels", small_area=6.25):
    return {
        "area_unit": area_unit,
        "small_area": small_area,
        "small": _size_group(0),
        "large": _size_group(3, 41.666, 0.66666, 0.5, 0.25),
        "all": _size_group(3, 41.666, 0.66666, 0.5, 0.25),
    }


def _summary(**overrides):
    """A binary split's summary, every figure distinct, as evaluate.summarize_collected shapes it."""
    summary = {
        "split": "test",
        "step": 120,
        "threshold": 0.5,
        "test_time_flips": True,
        "num_slices": 4,
        "image_size": 64,
        "num_slices_with_lesion": 3,
        "hd95_unit": "pixels",
        "dice": 0.71234,
        "dice_std": 0.10101,
        "jaccard": 0.61234,
        "jaccard_std": 0.20202,
        "f_score": 0.73456,
        "precision": 0.81234,
        "precision_std": 0.30303,
        "recall": 0.51234,
        "recall_std": 0.40404,
        "specificity": 0.99123,
        "specificity_std": 0.00506,
        "hd95": 3.25,
        "hd95_std": 1.5,
        "global_dice": 0.75,
        "global_jaccard": 0.6,
        "global_precision": 0.8,
        "global_recall": 0.70588,
        "hd95_num_slices": 2,
        "hd95_num_one_empty": 1,
        "hd95_num_both_empty": 1,
        "original_resolution": {
            "dice": 0.70001,
            "dice_std": 0.1,
            "jaccard": 0.60001,
            "jaccard_std": 0.2,
            "f_score": 0.72,
            "global_dice": 0.74,
        },
        "per_volume": {},
        "lesion_size": _lesion_sizes(),
    }
    return summary | overrides


def _config(variant="rdunet"):
    return types.SimpleNamespace(name="semiseg", model=types.SimpleNamespace(variant=variant))


# The report of `_summary()`, written out by hand: its head (Table 1 and the pooled figures) and its tail
# (Table 2); the other sections go between.
REPORT_HEAD = (
    "# semiseg: evaluation on the test split\n"
    "\n"
    "Checkpoint step 120, threshold 0.5, test-time flips on; 4 slices at 64x64 px, 3 with lesion.\n"
    "\n"
    "## Segmentation (the form of the paper's Table 1)\n"
    "\n"
    "| Model | DSC | JC | F-score | Precision | Recall | Specificity | HD95 (px) |\n"
    "|---|---|---|---|---|---|---|---|\n"
    "| rdunet | 0.7123 ± 0.1010 | 0.6123 ± 0.2020 | 0.7346 | 0.8123 ± 0.3030 | 0.5123 ± 0.4040 | "
    "0.9912 ± 0.0051 | 3.2500 ± 1.5000 |\n"
    "\n"
    "Mean ± standard deviation over slices. F-score: harmonic mean of mean precision and mean recall. "
    "Pooled over the split: DSC 0.7500, JC 0.6000, precision 0.8000, recall 0.7059. HD95 over the 2 "
    "slices where both masks have lesion; 1 slices with exactly one empty mask counted apart, 1 with "
    "both empty excluded.\n"
    "\n"
    "At each slice's original resolution (probabilities resized bilinearly to the stored expert mask, "
    "as published COVID-SemiSeg results are scored): DSC 0.7000 ± 0.1000, JC 0.6000 ± 0.2000, "
    "F-score 0.7200, pooled DSC 0.7400.\n"
)
LESION_TABLE = (
    "|---|---|---|---|---|\n"
    "| Small (< 6.25 pixels) | 0 | n/a | n/a | n/a |\n"
    "| Large (≥ 6.25 pixels) | 3 | 41.7 | 0.6667 | 0.5000 ± 0.2500 |\n"
    "| All | 3 | 41.7 | 0.6667 | 0.5000 ± 0.2500 |\n"
)
REPORT_TAIL = (
    "\n"
    "## Lesion size (the form of the paper's Table 2)\n"
    "\n"
    "Lesions: 8-connected components of the ground truth in a slice; detected when a predicted pixel "
    "overlaps; Dice against the overlapping predicted components.\n"
    "\n"
    "| Lesions | Count | Mean area (pixels) | Detection rate | DSC |\n" + LESION_TABLE
)


def test_the_markdown_report_of_a_binary_split_is_the_papers_tables_written_out():
    assert reports.markdown_report(_summary(), _config()) == REPORT_HEAD + REPORT_TAIL


def test_the_markdown_report_writes_volumes_in_mm_and_a_missing_figure_as_n_a():
    volumes = {
        "num_volumes": 2,
        "cases": {
            "case_a": {
                "num_slices": 3,
                "dice": 0.8,
                "jaccard": 0.66667,
                "precision": 0.9,
                "recall": 0.72,
                "hd95": 4.125,
            },
            "case_b": {
                "num_slices": 1,
                "dice": 0.0,
                "jaccard": 0.0,
                "precision": 0.0,
                "recall": 0.0,
                "hd95": None,
            },
        },
        "dice": 0.4,
        "dice_std": 0.4,
        "jaccard": 0.33333,
        "jaccard_std": 0.33333,
        "precision": 0.45,
        "precision_std": 0.45,
        "recall": 0.36,
        "recall_std": 0.36,
        "hd95": 4.125,
        "hd95_std": 0.0,
    }
    summary = _summary(
        hd95_unit="mm",
        test_time_flips=False,
        per_volume=volumes,
        specificity=None,
        lesion_size=_lesion_sizes("mm^2", 100.0),
    )
    lines = reports.markdown_report(summary, _config("unet")).splitlines()
    assert "test-time flips off;" in lines[2]
    assert lines[6] == "| Model | DSC | JC | F-score | Precision | Recall | Specificity | HD95 (mm) |"
    assert lines[8].endswith(" | 0.5123 ± 0.4040 | n/a | 3.2500 ± 1.5000 |")
    assert lines[8].startswith("| unet | ")
    start = lines.index("## Per volume")
    assert lines[start - 1 : start + 9] == [
        "",
        "## Per volume",
        "",
        "| Case | Slices | DSC | JC | Precision | Recall | HD95 (mm) |",
        "|---|---|---|---|---|---|---|",
        "| case_a | 3 | 0.8000 | 0.6667 | 0.9000 | 0.7200 | 4.12 |",
        "| case_b | 1 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | n/a |",
        "| mean ± std (2 volumes) | | 0.4000 ± 0.4000 | 0.3333 ± 0.3333 | 0.4500 ± 0.4500 | "
        "0.3600 ± 0.3600 | 4.1250 ± 0.0000 |",
        "",
        "## Lesion size (the form of the paper's Table 2)",
    ]
    assert "| Small (< 100 mm^2) | 0 | n/a | n/a | n/a |" in lines


def test_the_markdown_report_of_a_lungs_head_adds_classes_and_involvement():
    lesion, lungs = _lesion_sizes(), _lesion_sizes()
    per_class = {
        "infection": {
            "num_slices_present": 3,
            "dice": 0.6,
            "dice_std": 0.1,
            "jaccard": 0.5,
            "jaccard_std": 0.2,
            "precision": 0.7,
            "precision_std": 0.3,
            "recall": 0.55,
            "recall_std": 0.05,
            "hd95": 2.0,
            "hd95_std": 0.5,
            "global_dice": 0.65,
            "false_positive_rate": 0.0,
            "lesion_size": lesion,
        },
        "lungs": {
            "num_slices_present": 4,
            "dice": 0.95,
            "dice_std": 0.01,
            "jaccard": 0.9,
            "jaccard_std": 0.02,
            "precision": 0.96,
            "precision_std": 0.03,
            "recall": 0.94,
            "recall_std": 0.04,
            "hd95": None,
            "hd95_std": None,
            "global_dice": 0.951,
            "false_positive_rate": None,
            "lesion_size": lungs,
        },
    }
    involvement = {
        "per_slice": {
            "involvement_num_scored": 4,
            "involvement_mae_points": 3.456,
            "involvement_pearson_r": 0.91234,
        },
        "per_volume": {
            "involvement_num_scored": 1,
            "involvement_mae_points": None,
            "involvement_pearson_r": None,
        },
        "severity_agreement": 0.75,
    }
    summary = _summary(per_class=per_class, involvement=involvement, lesion_classes=["ggo", "consolidation"])
    per_class_section = (
        "\n"
        "## Per class\n"
        "\n"
        "Top-level metrics above score the union of ggo, consolidation. Per class: means over the slices "
        "whose expert mask holds the class; pooled DSC over the split; false-positive rate on the slices "
        "without it.\n"
        "\n"
        "| Class | Slices with it | DSC | JC | Precision | Recall | HD95 (px) | Pooled DSC | FP rate |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| infection | 3 | 0.6000 ± 0.1000 | 0.5000 ± 0.2000 | 0.7000 ± 0.3000 | 0.5500 ± 0.0500 | "
        "2.0000 ± 0.5000 | 0.6500 | 0.0000 |\n"
        "| lungs | 4 | 0.9500 ± 0.0100 | 0.9000 ± 0.0200 | 0.9600 ± 0.0300 | 0.9400 ± 0.0400 | n/a | "
        "0.9510 | n/a |\n"
    )
    involvement_section = (
        "\n"
        "## Lung involvement\n"
        "\n"
        "Infection inside the lungs as a percent of the lungs (whole lungs, not per lobe).\n"
        "\n"
        "| Level | Scored | MAE (percentage points) | Pearson r |\n"
        "|---|---|---|---|\n"
        "| per slice | 4 | 3.46 | 0.9123 |\n"
        "| per volume | 1 | n/a | n/a |\n"
        "\n"
        "Severity band agreement per slice: 0.7500.\n"
    )
    # Each class's own lesion-size table follows the top-level one.
    class_tables = "".join(
        f"\nClass {name}:\n\n| {name} | Count | Mean area (pixels) | Detection rate | DSC |\n" + LESION_TABLE
        for name in ("infection", "lungs")
    )
    assert reports.markdown_report(summary, _config()) == (
        REPORT_HEAD + per_class_section + involvement_section + REPORT_TAIL + class_tables
    )


def test_slices_csv_of_a_lungs_head_adds_each_slices_involvement_empty_where_unscored():
    rows = [
        _row("a", tp=1, fp=0, fn=0, tn=3, hd95=0.0)
        | {"involvement_percent": 12.5, "expert_involvement_percent": 10},
        _row("b", tp=0, fp=0, fn=0, tn=4, hd95=float("nan"))
        | {"involvement_percent": None, "expert_involvement_percent": 1 / 3},
    ]
    lines = reports.slices_csv(rows).splitlines()
    assert lines[0] == ",".join(reports.SLICE_COLUMNS + reports.INVOLVEMENT_COLUMNS)
    assert lines[1] == "a,,,1,1,1,1,1,0,ok,1,1,12.5,10"
    assert lines[2] == "b,,,1,1,1,1,1,,both_empty,0,0,,0.333333"
    assert reports.slices_csv(rows[1:]).splitlines() == [lines[0], lines[2]]
    # Without involvement in the rows, no such columns.
    assert reports.slices_csv(rows[:0]) == ",".join(reports.SLICE_COLUMNS) + "\n"
