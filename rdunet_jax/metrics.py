"""Segmentation metrics on binary masks: per slice and pooled over a set (numpy only, no model).

Conventions, stated once:
- Every ratio is computed from the confusion counts TP, FP, FN (and TN) of a binary mask pair.
- A ratio whose denominator is zero is 1.0 when the slice's mask and prediction are both empty
  (nothing to find, nothing found) and 0.0 otherwise. With this rule Dice, Jaccard, precision and
  recall of an empty-empty slice are all 1.0.
- The paper's F-score formula, 2 TP / (2 TP + FP + FN), is algebraically the Dice coefficient, so
  reporting it would repeat Dice. We report F-score as the harmonic mean of the *mean* precision and
  the *mean* recall over slices, which differs from mean Dice whenever slices differ.
- "Global" (pooled) values sum TP, FP and FN over all slices first, then take the ratio.
"""

import numpy as np


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
