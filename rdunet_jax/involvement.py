"""Lung involvement: the share of the lungs that is infected, per slice and per volume, and its error.

Involvement is the infection inside the lungs as a percentage of the lungs' area (a slice) or volume (a
volume): infection outside the lung mask is not counted in the share, though it is in the lesion volume.
The severity band reads the whole lungs, not each lobe as the lobar CT severity scores do (we have no
lobe masks): [0, 5) '<5%', [5, 25) '5-25%', [25, 50) '25-50%', [50, 75) '50-75%', [75, 100] '>75%'.
A slice or volume without lung has no involvement (None) and is left out of the error over a split.
"""

import numpy as np

# Upper bounds (exclusive) of each severity band in percent of the lungs, with the band's name.
SEVERITY_BANDS = ((5.0, "<5%"), (25.0, "5-25%"), (50.0, "25-50%"), (75.0, "50-75%"), (float("inf"), ">75%"))
CUBIC_MILLIMETRES_PER_MILLILITRE = 1000.0


def severity_band(percent) -> str | None:
    """The severity band of an involvement in percent (None for None)."""
    if percent is None:
        return None
    for upper, name in SEVERITY_BANDS:
        if percent < upper:
            return name
    raise ValueError(f"involvement must be a percentage, got {percent!r}")


def _percent(infected_lung: float, lung: float) -> float | None:
    return 100.0 * infected_lung / lung if lung > 0 else None


def involvement(lungs, infection, spacing=None) -> dict:
    """The involvement of one slice (H, W) or volume (D, H, W) of boolean lung and infection masks.

    Areas and volumes are counted in pixels (voxels); with `spacing` (mm per axis of the masks) also in
    mm^2 for a slice and mL for a volume.
    """
    lungs, infection = np.asarray(lungs).astype(bool), np.asarray(infection).astype(bool)
    if lungs.shape != infection.shape:
        raise ValueError(f"lung mask {lungs.shape} and infection mask {infection.shape} differ in shape")
    lung, infected_lung, lesion = (int(np.sum(mask)) for mask in (lungs, lungs & infection, infection))
    percent = _percent(infected_lung, lung)
    result = {
        "lung_pixels": lung,
        "infected_lung_pixels": infected_lung,
        "lesion_pixels": lesion,
        "involvement_percent": percent,
        "severity": severity_band(percent),
    }
    if spacing is not None:
        spacing = tuple(float(value) for value in spacing)
        if len(spacing) != lungs.ndim:
            raise ValueError(f"spacing {spacing} has not one value per axis of masks of shape {lungs.shape}")
        unit = float(np.prod(spacing))
        if lungs.ndim == 3:
            scale, suffix = unit / CUBIC_MILLIMETRES_PER_MILLILITRE, "ml"
        else:
            scale, suffix = unit, "mm2"
        result.update({f"lung_{suffix}": lung * scale, f"lesion_{suffix}": lesion * scale})
    return result


def per_slice_percent(lungs, infection) -> np.ndarray:
    """Involvement in percent of each slice of (N, H, W) masks, NaN where a slice has no lung."""
    lungs, infection = np.asarray(lungs).astype(bool), np.asarray(infection).astype(bool)
    lung = np.sum(lungs, axis=(1, 2)).astype(np.float64)
    infected = np.sum(lungs & infection, axis=(1, 2)).astype(np.float64)
    return np.where(lung > 0, 100.0 * infected / np.where(lung > 0, lung, 1.0), np.nan)


def per_volume_percent(lungs, infection, case_ids) -> dict:
    """Involvement in percent of each volume, pooling the lung and infected-lung pixels of its slices
    (N, H, W) by `case_ids` (one per slice; None for a slice of no volume); None for a volume without
    lung. Pooling pixels equals the volume ratio when every slice of a case has the same spacing."""
    lungs, infection = np.asarray(lungs).astype(bool), np.asarray(infection).astype(bool)
    lung = np.sum(lungs, axis=(1, 2))
    infected = np.sum(lungs & infection, axis=(1, 2))
    cases = [None if case is None else str(case) for case in case_ids]
    case_ids = np.asarray(cases, object)
    return {
        case: _percent(float(np.sum(infected[case_ids == case])), float(np.sum(lung[case_ids == case])))
        for case in dict.fromkeys(cases)
        if case is not None
    }


def involvement_error(predicted_percent, expert_percent) -> dict:
    """Mean absolute error in percentage points and Pearson correlation of predicted against expert
    involvement, over the items (slices or volumes) where both are defined (the expert's lungs and the
    predicted lungs are not empty); the rest are counted."""
    predicted = np.asarray([np.nan if value is None else value for value in predicted_percent], np.float64)
    expert = np.asarray([np.nan if value is None else value for value in expert_percent], np.float64)
    if predicted.shape != expert.shape:
        raise ValueError(f"{predicted.size} predicted and {expert.size} expert involvements")
    defined = np.isfinite(predicted) & np.isfinite(expert)
    predicted, expert = predicted[defined], expert[defined]
    varies = predicted.size >= 2 and np.std(predicted) > 0 and np.std(expert) > 0
    return {
        "involvement_mae_points": float(np.mean(np.abs(predicted - expert))) if predicted.size else None,
        "involvement_pearson_r": float(np.corrcoef(predicted, expert)[0, 1]) if varies else None,
        "involvement_num_scored": int(predicted.size),
        "involvement_num_undefined": int(np.sum(~defined)),
    }


def involvement_report(predicted_lungs, predicted_infection, expert_lungs, expert_infection, case_ids=None):
    """The involvement error of a split's (N, H, W) predicted masks against the experts': per slice, the
    share of slices in the experts' severity band, and per volume when slices carry `case_ids` (None for
    a slice of no volume)."""
    predicted = per_slice_percent(predicted_lungs, predicted_infection)
    expert = per_slice_percent(expert_lungs, expert_infection)
    defined = np.isfinite(predicted) & np.isfinite(expert)
    same_band = [
        severity_band(value) == severity_band(reference)
        for value, reference in zip(predicted[defined], expert[defined], strict=True)
    ]
    report = {
        "per_slice": involvement_error(predicted, expert),
        "severity_agreement": float(np.mean(same_band)) if same_band else None,
        "expert_mean_percent": float(np.mean(expert[np.isfinite(expert)]))
        if np.isfinite(expert).any()
        else None,
    }
    if case_ids is not None:
        predicted_volumes = per_volume_percent(predicted_lungs, predicted_infection, case_ids)
        expert_volumes = per_volume_percent(expert_lungs, expert_infection, case_ids)
        cases = list(expert_volumes)
        report["per_volume"] = involvement_error(
            [predicted_volumes[case] for case in cases], [expert_volumes[case] for case in cases]
        )
    return report
