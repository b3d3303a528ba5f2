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
    "3-D HD95 with the volume's voxel spacing",
    "lesions": "ground-truth lesions are 8-connected components of a slice's mask; a lesion is detected "
    "when a predicted pixel overlaps it; its Dice is against the predicted components that overlap it; "
    "small when its area is below eval.small_lesion_area",
    "original_resolution": "original_resolution.* score each slice at the size of its stored expert mask: "
    "probabilities resized bilinearly to it, thresholded, against the mask as stored (as Inf-Net's "
    "COVID-SemiSeg results are scored)",
    "test_time_flips": "when on, probabilities are the mean over the identity, left-right, up-down and "
    "both flips of the input, each flipped back",
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


def slices_csv(rows: list[dict]) -> str:
    """The per-slice CSV: one row per slice; hd95 is empty unless both masks have lesion (hd95_status)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SLICE_COLUMNS)
    for row in rows:
        values = metrics.slice_metrics([row["tp"]], [row["fp"]], [row["fn"]], [row["tn"]])
        hd95 = row["hd95"]
        status = "ok" if np.isfinite(hd95) else ("both_empty" if np.isnan(hd95) else "one_empty")
        writer.writerow(
            [
                row["id"],
                "" if row["case_id"] is None else row["case_id"],
                "" if row["slice_index"] is None else row["slice_index"],
                *(
                    _number(values[name][0])
                    for name in ("dice", "jaccard", "precision", "recall", "specificity")
                ),
                _number(hd95) if status == "ok" else "",
                status,
                row["lesion_pixels"],
                row["predicted_pixels"],
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
    sizes = summary["lesion_size"]
    area_unit = sizes["area_unit"]
    lines += [
        "",
        "## Lesion size (the form of the paper's Table 2)",
        "",
        "Lesions: 8-connected components of the ground truth in a slice; detected when a predicted pixel "
        "overlaps; Dice against the overlapping predicted components.",
        "",
        f"| Lesions | Count | Mean area ({area_unit}) | Detection rate | DSC |",
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
    return "\n".join(lines) + "\n"


def _original_resolution_sentence(original: dict) -> str:
    return (
        "At each slice's original resolution (probabilities resized bilinearly to the stored expert "
        f"mask, as published COVID-SemiSeg results are scored): DSC {_mean_std(original, 'dice')}, "
        f"JC {_mean_std(original, 'jaccard')}, F-score {original['f_score']:.4f}, "
        f"pooled DSC {original['global_dice']:.4f}."
    )
