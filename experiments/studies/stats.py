"""Confidence intervals for the study tables: t-intervals over folds or seeds, bootstrap over slices."""

import math

import numpy as np
from scipy import stats as scipy_stats


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of `values` (NaN bounds when n < 2)."""
    values = np.asarray([value for value in values if value is not None], np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if values.size < 2:
        return mean, math.nan, math.nan
    standard_error = float(np.std(values, ddof=1)) / math.sqrt(values.size)
    half_width = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=values.size - 1)) * standard_error
    return mean, mean - half_width, mean + half_width


def bootstrap_interval(
    values, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile-bootstrap interval of the mean of `values`, resampled with
    replacement `num_resamples` times by a `seed`-seeded generator (so tables are reproducible)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    resampled_means = values[rng.integers(0, values.size, (num_resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled_means, [tail, 1 - tail])
    return float(np.mean(values)), float(low), float(high)


def paired_slice_differences(reference: dict, alternative: dict) -> np.ndarray:
    """Per slice id, the alternative's value minus the reference's, each first averaged over the runs that
    evaluated that slice (one per fold in cross-validation, one per seed on a fixed test split).

    `reference` and `alternative` map slice id -> list of values; only ids both evaluated are paired.
    """
    shared = sorted(set(reference) & set(alternative))
    return np.asarray(
        [np.mean(alternative[slice_id]) - np.mean(reference[slice_id]) for slice_id in shared], np.float64
    )
