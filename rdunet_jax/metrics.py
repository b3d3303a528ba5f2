"""Segmentation metrics on binary masks: per slice, per volume and pooled over a set (numpy/scipy, no model).

Conventions, stated once:
- Every ratio is computed from the confusion counts TP, FP, FN (and TN) of a binary mask pair.
- A ratio whose denominator is zero is 1.0 when the slice's mask and prediction are both empty
  (nothing to find, nothing found) and 0.0 otherwise. With this rule Dice, Jaccard, precision and
  recall of an empty-empty slice are all 1.0.
- The paper's F-score formula, 2 TP / (2 TP + FP + FN), is algebraically the Dice coefficient, so
  reporting it would repeat Dice. We report F-score as the harmonic mean of the *mean* precision and
  the *mean* recall over slices, which differs from mean Dice whenever slices differ.
- "Global" (pooled) values sum TP, FP and FN over all slices first, then take the ratio.
- HD95 is the 95th percentile of the distances from each border pixel of either mask to the other
  mask's border (MedPy's `hd95`; borders are 4-connected in 2-D). It is undefined when a mask is empty:
  both empty is excluded and counted, one empty is counted separately; neither enters the mean.
- Lesions are the 8-connected components of the ground truth in a slice. A lesion is detected when a
  predicted pixel overlaps it; its Dice is taken against the predicted components that overlap it.
"""

import numpy as np
from scipy import ndimage


def confusion_counts(prediction, target):
    """TP, FP, FN, TN of binary masks, summed over all but the first (batch) axis."""
    prediction = np.asarray(prediction).astype(bool)
    target = np.asarray(target).astype(bool)
    axes = tuple(range(1, prediction.ndim))
    tp = np.sum(prediction & target, axis=axes)
    fp = np.sum(prediction & ~target, axis=axes)
    fn = np.sum(~prediction & target, axis=axes)
    tn = np.sum(~prediction & ~target, axis=axes)
    return tp, fp, fn, tn


def _ratio(numerator, denominator, both_empty):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.where(both_empty, 1.0, 0.0))


def slice_metrics(tp, fp, fn, tn=None):
    """Dice, Jaccard, precision, recall (and specificity when TN is given) per slice."""
    tp, fp, fn = (np.asarray(count, dtype=np.float64) for count in (tp, fp, fn))
    both_empty = (tp + fp + fn) == 0
    result = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "jaccard": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }
    if tn is not None:
        tn = np.asarray(tn, dtype=np.float64)
        result["specificity"] = _ratio(tn, tn + fp, (tn + fp) == 0)
    return result


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), 0 when both are 0."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def summarize(tp, fp, fn, tn=None) -> dict:
    """Mean and standard deviation over slices, the F-score, and the pooled (global) values."""
    per_slice = slice_metrics(tp, fp, fn, tn)
    summary = {"num_slices": int(np.size(tp))}
    for name, values in per_slice.items():
        summary[name] = float(np.mean(values)) if values.size else float("nan")
        summary[f"{name}_std"] = float(np.std(values)) if values.size else float("nan")
    summary["f_score"] = harmonic_mean(summary["precision"], summary["recall"])
    pooled = slice_metrics(*(np.sum(np.asarray(c, dtype=np.float64)) for c in (tp, fp, fn)))
    for name, value in pooled.items():
        summary[f"global_{name}"] = float(value)
    return summary


# --- Hausdorff distance (HD95) ---------------------------------------------------------------------------


def surface(mask) -> np.ndarray:
    """The border pixels of a binary mask: those with a face-neighbour outside it (or on the image edge)."""
    mask = np.asarray(mask).astype(bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(from_mask, to_mask, spacing=None) -> np.ndarray:
    """Distance from each border pixel of `from_mask` to the nearest border pixel of `to_mask`."""
    to_border = surface(to_mask)
    distance_to_border = ndimage.distance_transform_edt(~to_border, sampling=spacing)
    return distance_to_border[surface(from_mask)]


def hausdorff95(prediction, target, spacing=None) -> float:
    """The 95th percentile of the symmetric border-to-border distances (MedPy's `hd95`), in units of
    `spacing` (pixels when None). NaN when both masks are empty, inf when exactly one is."""
    prediction, target = np.asarray(prediction).astype(bool), np.asarray(target).astype(bool)
    has_prediction, has_target = prediction.any(), target.any()
    if not has_prediction and not has_target:
        return float("nan")
    if has_prediction != has_target:
        return float("inf")
    distances = np.concatenate(
        [surface_distances(prediction, target, spacing), surface_distances(target, prediction, spacing)]
    )
    return float(np.percentile(distances, 95))


def summarize_hausdorff95(values) -> dict:
    """Mean and std of the finite HD95 values; both-empty (NaN) and one-empty (inf) cases are counted,
    never averaged."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {
        "hd95": float(np.mean(finite)) if finite.size else None,
        "hd95_std": float(np.std(finite)) if finite.size else None,
        "hd95_num_slices": int(finite.size),
        "hd95_num_both_empty": int(np.sum(np.isnan(values))),
        "hd95_num_one_empty": int(np.sum(np.isinf(values))),
    }


# --- Lesion size (connected components of the ground truth) --------------------------------------------

# 8-connectivity in a slice: diagonal neighbours belong to the same lesion.
LESION_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def lesion_statistics(prediction, target) -> list[dict]:
    """One entry per ground-truth lesion (8-connected component) of a slice: its area in pixels,
    whether any predicted pixel touches it, and its Dice with the predicted components
    that overlap it."""
    prediction, target = np.asarray(prediction).astype(bool), np.asarray(target).astype(bool)
    lesion_labels, num_lesions = ndimage.label(target, structure=LESION_CONNECTIVITY)
    if num_lesions == 0:
        return []
    predicted_labels, _ = ndimage.label(prediction, structure=LESION_CONNECTIVITY)
    lesions = []
    for label in range(1, num_lesions + 1):
        lesion = lesion_labels == label
        touching = np.unique(predicted_labels[lesion])
        touching = touching[touching > 0]
        matched = np.isin(predicted_labels, touching) if touching.size else np.zeros_like(lesion)
        overlap = np.sum(lesion & matched)
        lesions.append(
            {
                "area": float(np.sum(lesion)),
                "detected": bool(touching.size),
                "dice": float(2.0 * overlap / (np.sum(lesion) + np.sum(matched))),
            }
        )
    return lesions


def lesion_size_summary(lesions: list[dict], small_area: float) -> dict:
    """Per-lesion detection rate and Dice for small (area < `small_area`), large and all lesions."""
    groups = {
        "small": [lesion for lesion in lesions if lesion["area"] < small_area],
        "large": [lesion for lesion in lesions if lesion["area"] >= small_area],
        "all": list(lesions),
    }
    summary = {}
    for name, members in groups.items():
        dice = np.array([lesion["dice"] for lesion in members], dtype=np.float64)
        detected = np.array([lesion["detected"] for lesion in members], dtype=np.float64)
        summary[name] = {
            "num_lesions": len(members),
            "detection_rate": float(np.mean(detected)) if members else None,
            "dice": float(np.mean(dice)) if members else None,
            "dice_std": float(np.std(dice)) if members else None,
            "mean_area": float(np.mean([lesion["area"] for lesion in members])) if members else None,
        }
    return summary


# --- Per-class metrics (multi-class heads) --------------------------------------------------------------
#
# A class's metrics take the slices as they come: Dice, Jaccard, precision, recall and HD95 are means
# over the slices whose expert mask contains the class (a slice without it would score 1.0 for an empty
# prediction and 0.0 for any false pixel, telling nothing about how well the class is outlined); the
# slices without it are scored by the false-positive rate, the share of them on which the class is
# predicted at all. `global_dice` pools TP, FP and FN over every slice of the split, absent ones included.


def class_masks(label_maps, num_classes: int) -> np.ndarray:
    """Integer label maps (..., H, W) with values 0..K as boolean per-class masks (..., H, W, K)."""
    label_maps = np.asarray(label_maps)
    return label_maps[..., None] == np.arange(1, num_classes + 1)


def _spacing_of(spacing, index):
    """The pixel spacing of slice `index`: None, one spacing for every slice, or one per slice."""
    if spacing is None:
        return None
    spacing = np.asarray(spacing, np.float64)
    return tuple(spacing[index]) if spacing.ndim == 2 else tuple(spacing)


def class_summary(predictions, targets, spacing=None) -> dict:
    """The metrics of one class over a split, from boolean masks (N, H, W) of prediction and expert."""
    predictions, targets = np.asarray(predictions).astype(bool), np.asarray(targets).astype(bool)
    tp, fp, fn, _ = confusion_counts(predictions, targets)
    present = np.any(targets, axis=tuple(range(1, targets.ndim)))
    predicted = np.any(predictions, axis=tuple(range(1, predictions.ndim)))
    per_slice = slice_metrics(tp[present], fp[present], fn[present])
    summary = {"num_slices_present": int(np.sum(present)), "num_slices_absent": int(np.sum(~present))}
    for name, values in per_slice.items():
        summary[name] = float(np.mean(values)) if values.size else None
        summary[f"{name}_std"] = float(np.std(values)) if values.size else None
    hausdorff = [
        hausdorff95(predictions[index], targets[index], _spacing_of(spacing, index))
        for index in np.flatnonzero(present)
    ]
    summary.update(summarize_hausdorff95(hausdorff))
    pooled = slice_metrics(*(np.sum(np.asarray(count, np.float64)) for count in (tp, fp, fn)))
    summary["global_dice"] = float(pooled["dice"])
    summary["false_positive_rate"] = float(np.mean(predicted[~present])) if np.any(~present) else None
    return summary


def per_class_summary(predictions, targets, class_names, spacing=None) -> dict:
    """`class_summary` of each class, keyed by class name, from boolean masks (N, H, W, K) whose channel
    k is class `class_names[k]` (`class_masks` turns label maps into these)."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.shape[-1] != len(class_names):
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must both be (N, H, W, "
            f"{len(class_names)}) for classes {list(class_names)}"
        )
    return {
        name: class_summary(predictions[..., index], targets[..., index], spacing)
        for index, name in enumerate(class_names)
    }
