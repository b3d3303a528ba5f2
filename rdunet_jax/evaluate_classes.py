"""The multi-class parts of a split's metrics: `per_class` (each class's overlap metrics, HD95, pooled
Dice, false-positive rate and lesion sizes, keyed by class name) and, for a head with lungs and infection,
`involvement` (the share of the lungs infected, predicted against the experts', per slice and volume).

The top level of metrics/<split>.json keeps the binary metrics of the head's "any lesion" mask
(heads.lesion_classes): any foreground class for 'exclusive', the infection (or lesion) class for
'multilabel'.
"""

import csv
import io

import numpy as np

from rdunet_jax import heads, involvement, metrics

CLASS_SLICE_COLUMNS = (
    "id",
    "class",
    "present",
    "dice",
    "jaccard",
    "precision",
    "recall",
    "expert_pixels",
    "predicted_pixels",
)


def unpacked_class_masks(collected: dict, image_size: int, num_classes: int):
    """The per-class (predictions, targets) of every slice, boolean (N, S, S, K), from `collect_slices`;
    unpacked once and kept in `collected` (the split's summary and its per-class CSV both read them)."""
    key = f"class_masks_{image_size}_{num_classes}"
    if key not in collected:
        count = image_size * image_size * num_classes

        def unpack(packed):
            return np.unpackbits(packed)[:count].reshape(image_size, image_size, num_classes).astype(bool)

        predictions = np.stack([unpack(prediction) for prediction, _ in collected["packed_classes"]])
        targets = np.stack([unpack(target) for _, target in collected["packed_classes"]])
        collected[key] = predictions, targets
    return collected[key]


def class_slices_csv(collected: dict, config) -> str:
    """The per-class slice CSV (`metrics/<split>_classes.csv`): a row per slice and class, so per-slice
    paired comparisons (cross-validation) can be made per class. `present` says whether the experts'
    mask holds the class: the summary's per-class means are over those rows; Dice is 1 on a row where
    neither mask holds it."""
    classes = tuple(config.data.classes)
    predictions, targets = unpacked_class_masks(collected, config.data.image_size, len(classes))
    tp = (predictions & targets).sum(axis=(1, 2))
    fp = (predictions & ~targets).sum(axis=(1, 2))
    fn = (~predictions & targets).sum(axis=(1, 2))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CLASS_SLICE_COLUMNS)
    for index, name in enumerate(classes):
        values = metrics.slice_metrics(tp[:, index], fp[:, index], fn[:, index])
        for row_number, row in enumerate(collected["rows"]):
            expert = int(tp[row_number, index] + fn[row_number, index])
            writer.writerow(
                [row["id"], name, int(expert > 0)]
                + [f"{values[key][row_number]:.6g}" for key in ("dice", "jaccard", "precision", "recall")]
                + [expert, int(tp[row_number, index] + fp[row_number, index])]
            )
    return buffer.getvalue()


def _volume_involvement(lungs, infection, rows, unit: str) -> dict:
    """Involvement of each case (slices grouped by case id), with lung and lesion mL when the spacing is
    known."""
    cases = {}
    case_ids = np.array([row["case_id"] for row in rows], object)
    for case_id in dict.fromkeys(case_id for case_id in case_ids.tolist() if case_id is not None):
        chosen = np.flatnonzero(case_ids == case_id)
        first = rows[chosen[0]]
        spacing = (first["slice_spacing"], *first["pixel_spacing"]) if unit == "mm" else None
        cases[case_id] = involvement.involvement(lungs[chosen], infection[chosen], spacing)
    return cases


def involvement_section(predictions, targets, rows, config, unit: str) -> dict | None:
    """`involvement` of a split: the error of predicted against expert involvement (MAE in percentage
    points, Pearson r) per slice and per volume, severity-band agreement, and each volume's involvement,
    predicted and expert; None when the classes hold no lungs and infection. Adds each slice's predicted
    and expert percent to its row (the slices CSV)."""
    head, classes = config.model.head, tuple(config.data.classes)
    predicted, expert = (heads.lungs_and_infection(masks, head, classes) for masks in (predictions, targets))
    if predicted is None:
        return None
    has_cases = any(row["case_id"] is not None for row in rows)
    report = involvement.involvement_report(
        *predicted, *expert, [row["case_id"] for row in rows] if has_cases else None
    )
    slice_percent = involvement.per_slice_percent(*predicted)
    expert_percent = involvement.per_slice_percent(*expert)
    for row, value, reference in zip(rows, slice_percent, expert_percent, strict=True):
        row["involvement_percent"] = None if np.isnan(value) else float(value)
        row["expert_involvement_percent"] = None if np.isnan(reference) else float(reference)
    if has_cases:
        expert_volumes = _volume_involvement(*expert, rows, unit)
        report["volumes"] = {
            case_id: {"predicted": value, "expert": expert_volumes[case_id]}
            for case_id, value in _volume_involvement(*predicted, rows, unit).items()
        }
    return report


def class_sections(collected: dict, config) -> dict:
    """The `per_class` (and, with lungs and infection, `involvement`) entries of a split's summary."""
    classes = tuple(config.data.classes)
    rows, unit = collected["rows"], collected["unit"]
    predictions, targets = unpacked_class_masks(collected, config.data.image_size, len(classes))
    spacing = np.array([row["pixel_spacing"] for row in rows], np.float64) if unit == "mm" else None
    per_class = metrics.per_class_summary(predictions, targets, classes, spacing)
    small_area = float(config.eval.small_lesion_area)
    for name, values in per_class.items():
        values["hd95_unit"] = unit
        values["lesion_size"] = {
            "small_area": small_area,
            "area_unit": "mm^2" if unit == "mm" else "pixels",
            **metrics.lesion_size_summary(collected["class_lesions"][name], small_area),
        }
    sections = {
        "per_class": per_class,
        "lesion_classes": [classes[index] for index in heads.lesion_classes(config.model.head, classes)],
    }
    report = involvement_section(predictions, targets, rows, config, unit)
    if report is not None:
        sections["involvement"] = report
    return sections
