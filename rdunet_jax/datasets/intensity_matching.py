"""The unlabelled pool's intensities matched to the labelled slices' (domain harmonisation).

COVID-SemiSeg's unlabelled pool is not windowed as its labelled slices are: its 1,119 coronacases.org
slices are stored in a wider window (soft tissue mid-grey, where the labelled MedSeg slices saturate it
to white), so a model trained on the labelled slices sees them out of distribution (fold 0's teacher
finds lesion in 0.2% of their pixels, against 4.5% of the Radiopaedia slices', which are windowed as
the labelled ones). Two remappings onto the labelled training slices' pooled intensities:

- 'window': a linear map, clipped to [0, 255], of the slice's 5th and 95th intensity percentiles onto
  the pooled ones: a change of display window, whatever the slice holds (lesion or not), as long as
  the percentiles fall on the same tissues (lung, soft tissue);
- 'histogram': the classic cumulative-histogram matching (scikit-image's `exposure.match_histograms`).
  It also transfers the labelled slices' contents: COVID-SemiSeg's 50 labelled slices are 14% lesion,
  so a pool slice matched to them gets its lung brightened until the teacher finds lesion nearly
  everywhere (18% of the coronacases pixels, on every slice). Kept as the measured alternative.
"""

import numpy as np

from rdunet_jax.errors import UserError

NUM_LEVELS = 256
# The percentiles 'window' matching maps onto each other: below the lower lies air and the darkest lung,
# above the upper the brightest soft tissue and bone, in the labelled slices and the pool alike.
WINDOW_PERCENTILES = (5.0, 95.0)
# A slice whose percentiles lie closer than this many levels is left as it is by 'window'.
MIN_WINDOW_LEVELS = 4.0


def _as_uint8(image, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(
            f"data.unlabelled_intensity_matching: needs 8-bit images, {where} holds {image.dtype} ones"
        )
    return image


def pooled_histogram(source) -> np.ndarray:
    """The counts of each of the 256 intensities over every image of `source` (int64, shape (256,))."""
    counts = np.zeros(NUM_LEVELS, np.int64)
    for index in range(len(source)):
        image = _as_uint8(source[index]["image"], f"split {getattr(source, 'split', '?')!r}")
        counts += np.bincount(image.ravel(), minlength=NUM_LEVELS)
    if not counts.sum():
        raise UserError("data.unlabelled_intensity_matching: the labelled training split holds no pixels")
    return counts


def match_histogram(image, reference_counts) -> np.ndarray:
    """`image` (uint8) remapped so that its cumulative histogram follows that of `reference_counts`: each
    intensity goes to the reference intensity at the same quantile (linear between reference levels),
    rounded to uint8."""
    image = _as_uint8(image, "the unlabelled split")
    values, inverse, counts = np.unique(image.ravel(), return_inverse=True, return_counts=True)
    quantiles = np.cumsum(counts) / image.size
    reference_counts = np.asarray(reference_counts)
    levels = np.flatnonzero(reference_counts)
    reference_quantiles = np.cumsum(reference_counts[levels]) / reference_counts.sum()
    matched = np.interp(quantiles, reference_quantiles, levels.astype(np.float64))
    return np.round(matched).astype(np.uint8)[inverse].reshape(image.shape)


def match_window(image, reference_counts) -> np.ndarray:
    """`image` (uint8) linearly remapped so that its `WINDOW_PERCENTILES` land on those of
    `reference_counts` (linear interpolation between levels, as numpy's percentile), clipped and rounded
    to uint8; unchanged when its percentiles lie within `MIN_WINDOW_LEVELS`."""
    image = _as_uint8(image, "the unlabelled split")
    low, high = np.percentile(image, WINDOW_PERCENTILES)
    if high - low < MIN_WINDOW_LEVELS:
        # A (nearly) uniform slice has no window to read: stretching it would turn its few other pixels
        # white or black.
        return image
    reference_low, reference_high = reference_percentiles(reference_counts, WINDOW_PERCENTILES)
    scale = (reference_high - reference_low) / (high - low)
    remapped = reference_low + (image.astype(np.float64) - low) * scale
    return np.clip(np.round(remapped), 0, NUM_LEVELS - 1).astype(np.uint8)


def reference_percentiles(reference_counts, percentiles) -> np.ndarray:
    """The percentiles of the intensities counted in `reference_counts`, as `np.percentile` of the pixels
    themselves would give them ('linear': between the two order statistics around each rank)."""
    reference_counts = np.asarray(reference_counts, np.int64)
    total = int(reference_counts.sum())
    ends = np.cumsum(reference_counts)  # pixel ranks [ends - counts, ends) hold each level, sorted
    ranks = np.asarray(percentiles, np.float64) / 100.0 * (total - 1)
    below, above = np.floor(ranks).astype(np.int64), np.ceil(ranks).astype(np.int64)
    value_below = np.searchsorted(ends, below, side="right")
    value_above = np.searchsorted(ends, above, side="right")
    return value_below + (ranks - below) * (value_above - value_below)


MATCHERS = {"window": match_window, "histogram": match_histogram}


class IntensityMatched:
    """A source whose records' images are matched to `reference_counts` by `mode` ('window' or
    'histogram')."""

    def __init__(self, source, reference_counts, mode: str):
        self._source, self.reference_counts, self.mode = source, np.asarray(reference_counts), mode
        self._match = MATCHERS[mode]
        self.name, self.split = source.name, source.split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        record["image"] = self._match(record["image"], self.reference_counts)
        return record

    def __repr__(self) -> str:
        return f"IntensityMatched({self._source!r}, mode={self.mode!r})"
