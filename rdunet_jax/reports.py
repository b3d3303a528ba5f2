"""What evaluation writes besides its JSON numbers: the conventions the metrics follow, the per-slice CSV
and the markdown forms of the paper's Table 1 (segmentation) and Table 2 (lesion size)."""

import csv
import io

import numpy as np

from rdunet_jax import metrics

# The paper's "small" lesions: below 100 pixels of a 256x256 slice.
SMALL_LESION_AREA_AT_256 = 100.0


def small_lesion_area(image_size: int) -> float:
    """`eval.small_lesion_area` in pixels at `image_size`: the paper's 100 px at 256x256, kept as the same
    fraction of the slice."""
    return SMALL_LESION_AREA_AT_256 * (image_size / 256) ** 2


CONVENTIONS = {
    "resolution": "metrics are computed on masks resized to data.image_size (nearest neighbour), "
    "as validation during training; millimetres scale the slice spacing by the resize",
    "empty_slices": "Dice, Jaccard, precision, recall: 1.0 when mask and prediction are both empty, "
    "0.0 when only one is",
    "f_score": "harmonic mean of the mean precision and the mean recall over slices (the paper's "
    "F-score formula equals Dice)",
    "global": "global_* values pool TP, FP and FN over the split before taking the ratio",
    "hd95": "95th percentile of the symmetric distances between the borders (4-connected) of prediction "
    "and mask (MedPy's hd95); slices with both masks empty are excluded and counted "
    "(hd95_num_both_empty), slices with exactly one empty mask are counted apart (hd95_num_one_empty); "
    "neither enters hd95 or hd95_std",
    "per_volume": "slices grouped by case id and placed at their slice index; counts pooled per volume; "
    "3-D HD95 with the volume's voxel spacing; slices without a case id (of no volume) are left out and "
    "counted (num_slices_outside_volumes)",
    "lesions": "ground-truth lesions are 8-connected components of a slice's mask; a lesion is detected "
    "when a predicted pixel overlaps it; its Dice is against the predicted components that overlap it; "
    "small when its area is below eval.small_lesion_area",
    "original_resolution": "original_resolution.* score each slice at the size of its stored expert mask: "
    "probabilities resized bilinearly to it, thresholded, against the mask as stored (as Inf-Net's "
    "COVID-SemiSeg results are scored)",
    "test_time_flips": "when on, probabilities are the mean over the identity, left-right, up-down and "
    "both flips of the input, each flipped back",
}


# Added to CONVENTIONS for the multi-class heads only (a binary run's JSON stays as it was).
CLASS_CONVENTIONS = {
    "per_class": "multi-class heads: the top-level metrics score the 'any lesion' mask (lesion_classes: "
    "any foreground class for model.head='exclusive', the infection or lesion class for 'multilabel'); "
    "per_class.<name>.dice, jaccard, precision, recall and hd95 are means over the slices whose expert "
    "mask holds the class (num_slices_present), global_dice pools the split, false_positive_rate is the "
    "share of the other slices where the class is predicted",
    "involvement": "infection inside the lungs as a percent of lung area (slice) or volume (case); "
    "severity bands <5%, 5-25%, 25-50%, 50-75%, >75% of the whole lungs (not per lobe); errors over the "
    "slices or volumes where both predicted and expert lungs are non-empty",
}


SLICE_COLUMNS = (
    "id",
    "case_id",
    "slice_index",
    "dice",
    "jaccard",
    "precision",
    "recall",
    "specificity",
    "hd95",
    "hd95_status",
    "lesion_pixels",
    "predicted_pixels",
)


def _number(value) -> str:
    """A float with 6 significant digits, as CSV and markdown show it."""
    return f"{value:.6g}"


# With a lungs head, the slice's predicted and expert involvement in percent of its lung area.
INVOLVEMENT_COLUMNS = ("involvement_percent", "expert_involvement_percent")


def _optional_number(value) -> str:
    return "" if value is None else _number(value)


def slices_csv(rows: list[dict]) -> str:
    """The per-slice CSV: one row per slice; hd95 is empty unless both masks have lesion (hd95_status);
    the involvement columns when the rows carry them (a lungs head)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_involvement = bool(rows) and INVOLVEMENT_COLUMNS[0] in rows[0]
    writer.writerow(SLICE_COLUMNS + (INVOLVEMENT_COLUMNS if with_involvement else ()))
    for row in rows:
        values = metrics.slice_metrics([row["tp"]], [row["fp"]], [row["fn"]], [row["tn"]])
        hd95 = row["hd95"]
        status = "ok" if np.isfinite(hd95) else ("both_empty" if np.isnan(hd95) else "one_empty")
        writer.writerow(
            [
                row["id"],
                row["case_id"],  # None is written as an empty cell
                row["slice_index"],
                *(
                    _number(values[name][0])
                    for name in ("dice", "jaccard", "precision", "recall", "specificity")
                ),
                _number(hd95) if status == "ok" else "",
                status,
                row["lesion_pixels"],
                row["predicted_pixels"],
                *(_optional_number(row[name]) for name in (INVOLVEMENT_COLUMNS if with_involvement else ())),
            ]
        )
    return buffer.getvalue()


def _mean_std(summary: dict, name: str) -> str:
    value, std = summary.get(name), summary.get(f"{name}_std")
    if value is None:
        return "n/a"
    return f"{value:.4f} ± {std:.4f}"


def markdown_report(summary: dict, config) -> str:
    """`metrics/<split>.md`: Table 1 (DSC, JC, F-score and more), per-volume values, Table 2 (lesion size)."""
    unit = "mm" if summary["hd95_unit"] == "mm" else "px"
    flips = "on" if summary["test_time_flips"] else "off"
    lines = [
        f"# {config.name}: evaluation on the {summary['split']} split",
        "",
        f"Checkpoint step {summary['step']}, threshold {summary['threshold']}, test-time flips {flips}; "
        f"{summary['num_slices']} slices at {summary['image_size']}x{summary['image_size']} px, "
        f"{summary['num_slices_with_lesion']} with lesion.",
        "",
        "## Segmentation (the form of the paper's Table 1)",
        "",
        f"| Model | DSC | JC | F-score | Precision | Recall | Specificity | HD95 ({unit}) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {config.model.variant} | {_mean_std(summary, 'dice')} | {_mean_std(summary, 'jaccard')} | "
        f"{summary['f_score']:.4f} | {_mean_std(summary, 'precision')} | {_mean_std(summary, 'recall')} | "
        f"{_mean_std(summary, 'specificity')} | {_mean_std(summary, 'hd95')} |",
        "",
        "Mean ± standard deviation over slices. F-score: harmonic mean of mean precision and mean recall. "
        f"Pooled over the split: DSC {summary['global_dice']:.4f}, JC {summary['global_jaccard']:.4f}, "
        f"precision {summary['global_precision']:.4f}, recall {summary['global_recall']:.4f}. "
        f"HD95 over the {summary['hd95_num_slices']} slices where both masks have lesion; "
        f"{summary['hd95_num_one_empty']} slices with exactly one empty mask counted apart, "
        f"{summary['hd95_num_both_empty']} with both empty excluded.",
        "",
        _original_resolution_sentence(summary["original_resolution"]),
    ]
    volumes = summary["per_volume"]
    if volumes:
        lines += [
            "",
            "## Per volume",
            "",
            f"| Case | Slices | DSC | JC | Precision | Recall | HD95 ({unit}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for case_id, case in volumes["cases"].items():
            hd95 = "n/a" if case["hd95"] is None else f"{case['hd95']:.2f}"
            lines.append(
                f"| {case_id} | {case['num_slices']} | {case['dice']:.4f} | {case['jaccard']:.4f} | "
                f"{case['precision']:.4f} | {case['recall']:.4f} | {hd95} |"
            )
        lines.append(
            f"| mean ± std ({volumes['num_volumes']} volumes) | | {_mean_std(volumes, 'dice')} | "
            f"{_mean_std(volumes, 'jaccard')} | {_mean_std(volumes, 'precision')} | "
            f"{_mean_std(volumes, 'recall')} | {_mean_std(volumes, 'hd95')} |"
        )
        if volumes.get("num_slices_outside_volumes"):
            lines += [
                "",
                f"{volumes['num_slices_outside_volumes']} slices of no volume are left out of this table.",
            ]
    if "per_class" in summary:
        lines += _per_class_lines(summary, unit)
    if "involvement" in summary:
        lines += _involvement_lines(summary["involvement"])
    lines += [
        "",
        "## Lesion size (the form of the paper's Table 2)",
        "",
        "Lesions: 8-connected components of the ground truth in a slice; detected when a predicted pixel "
        "overlaps; Dice against the overlapping predicted components.",
        "",
        *_lesion_size_lines(summary["lesion_size"], "Lesions"),
    ]
    for name, values in summary.get("per_class", {}).items():
        lines += ["", f"Class {name}:", "", *_lesion_size_lines(values["lesion_size"], name)]
    return "\n".join(lines) + "\n"


def _lesion_size_lines(sizes: dict, title: str) -> list[str]:
    """One lesion-size table (small, large, all)."""
    area_unit = sizes["area_unit"]
    lines = [
        f"| {title} | Count | Mean area ({area_unit}) | Detection rate | DSC |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "small": f"Small (< {sizes['small_area']:g} {area_unit})",
        "large": f"Large (≥ {sizes['small_area']:g} {area_unit})",
        "all": "All",
    }
    for group, label in labels.items():
        values = sizes[group]
        if not values["num_lesions"]:
            lines.append(f"| {label} | 0 | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {values['num_lesions']} | {values['mean_area']:.1f} | "
            f"{values['detection_rate']:.4f} | {_mean_std(values, 'dice')} |"
        )
    return lines


def _optional(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _per_class_lines(summary: dict, unit: str) -> list[str]:
    """The per-class table of a multi-class head."""
    lines = [
        "",
        "## Per class",
        "",
        f"Top-level metrics above score the union of {', '.join(summary['lesion_classes'])}. Per class: "
        "means over the slices whose expert mask holds the class; pooled DSC over the split; "
        "false-positive rate on the slices without it.",
        "",
        f"| Class | Slices with it | DSC | JC | Precision | Recall | HD95 ({unit}) | Pooled DSC | FP rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, values in summary["per_class"].items():
        lines.append(
            f"| {name} | {values['num_slices_present']} | {_mean_std(values, 'dice')} | "
            f"{_mean_std(values, 'jaccard')} | {_mean_std(values, 'precision')} | "
            f"{_mean_std(values, 'recall')} | {_mean_std(values, 'hd95')} | {values['global_dice']:.4f} | "
            f"{_optional(values['false_positive_rate'])} |"
        )
    return lines


def _involvement_lines(report: dict) -> list[str]:
    """The involvement error (predicted against expert share of the lungs infected)."""
    lines = [
        "",
        "## Lung involvement",
        "",
        "Infection inside the lungs as a percent of the lungs (whole lungs, not per lobe).",
        "",
        "| Level | Scored | MAE (percentage points) | Pearson r |",
        "|---|---|---|---|",
    ]
    for level in ("per_slice", "per_volume"):
        if level in report:
            values = report[level]
            mae, pearson = values["involvement_mae_points"], values["involvement_pearson_r"]
            lines.append(
                f"| {level.replace('_', ' ')} | {values['involvement_num_scored']} | "
                f"{_optional(mae, 2)} | {_optional(pearson)} |"
            )
    lines += ["", f"Severity band agreement per slice: {_optional(report['severity_agreement'])}."]
    return lines


def _original_resolution_sentence(original: dict) -> str:
    return (
        "At each slice's original resolution (probabilities resized bilinearly to the stored expert "
        f"mask, as published COVID-SemiSeg results are scored): DSC {_mean_std(original, 'dice')}, "
        f"JC {_mean_std(original, 'jaccard')}, F-score {original['f_score']:.4f}, "
        f"pooled DSC {original['global_dice']:.4f}."
    )
