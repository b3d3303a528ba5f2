"""The `synthetic` dataset: an axial chest-CT phantom with COVID-19-like lesions, generated from a seed.

Each slice has a body ellipse with a spine, two dark lungs with bright vessel cross-sections, and one
to four lesions inside the lungs: fuzzy low-contrast ground-glass opacities and denser, sharper
consolidations, of varied size, with noise on top. Slice `i` of a split is a pure function of
(split, i, size), so the dataset needs no download and is identical on every machine.
"""

import zlib

import numpy as np
from scipy import ndimage

GROUND_GLASS, CONSOLIDATION = 1, 2
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2, "unlabelled": 3}


def _ellipse(yy, xx, centre, radii, angle=0.0):
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dx * cos + dy * sin) / radii[1]
    v = (-dx * sin + dy * cos) / radii[0]
    return u**2 + v**2


def synthetic_slice(seed: int, size: int) -> dict:
    """One synthetic slice: `image` uint8 (size, size), `mask` {0,1} and `class_mask` {0,1,2} uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]

    body = _ellipse(yy, xx, (0.02, 0), (rng.uniform(0.62, 0.75), rng.uniform(0.82, 0.92))) <= 1
    image = np.where(body, 0.55, 0.0)
    spine = _ellipse(yy, xx, (0.5, 0), (0.1, 0.09)) <= 1
    image = np.where(spine, 0.9, image)

    lungs = np.zeros_like(body)
    for side in (-1, 1):
        centre = (rng.uniform(-0.12, 0.02), side * rng.uniform(0.36, 0.44))
        radii = (rng.uniform(0.42, 0.52), rng.uniform(0.24, 0.31))
        lungs |= _ellipse(yy, xx, centre, radii, rng.uniform(-0.2, 0.2) * side) <= 1
    image = np.where(lungs, 0.12, image)

    lung_y, lung_x = np.nonzero(lungs)
    vessels = np.zeros_like(image)
    for _ in range(rng.integers(12, 25)):
        k = rng.integers(len(lung_y))
        radius = rng.uniform(0.012, 0.03)
        vessels += 0.35 * np.exp(
            -((yy - yy[lung_y[k], lung_x[k]]) ** 2 + (xx - xx[lung_y[k], lung_x[k]]) ** 2) / (2 * radius**2)
        )

    class_mask = np.zeros((size, size), np.uint8)
    lesion_intensity = np.zeros_like(image)
    for _ in range(rng.integers(1, 5)):
        kind = CONSOLIDATION if rng.random() < 0.35 else GROUND_GLASS
        k = rng.integers(len(lung_y))
        centre = np.array([yy[lung_y[k], lung_x[k]], xx[lung_y[k], lung_x[k]]])
        scale = rng.uniform(0.06, 0.2)
        # A lesion is a union of overlapping Gaussian "metaballs": irregular but smooth outlines.
        field = np.zeros_like(image)
        for _ in range(rng.integers(1, 4)):
            offset = rng.normal(0, scale * 0.6, 2)
            sigma = scale * rng.uniform(0.6, 1.0)
            field += np.exp(
                -((yy - centre[0] - offset[0]) ** 2 + (xx - centre[1] - offset[1]) ** 2) / (2 * sigma**2)
            )
        inside = (field > 0.5) & lungs
        if inside.sum() < 4:
            continue
        if kind == GROUND_GLASS:
            edge = np.clip((field - 0.35) / 0.3, 0, 1)  # fuzzy rim
            contribution = rng.uniform(0.16, 0.24) * edge
        else:
            contribution = rng.uniform(0.35, 0.45) * (field > 0.5)
        lesion_intensity = np.maximum(lesion_intensity, contribution * lungs)
        class_mask = np.where(inside & (class_mask < kind), kind, class_mask).astype(np.uint8)

    image = image + (vessels + lesion_intensity) * lungs
    image = ndimage.gaussian_filter(image, sigma=0.6 * size / 256 + 0.3)
    image = image + rng.normal(0, 0.03, image.shape)
    return {
        "image": np.clip(np.round(image * 255), 0, 255).astype(np.uint8),
        "mask": (class_mask > 0).astype(np.uint8),
        "class_mask": class_mask,
    }


class SyntheticSource:
    """A split of synthetic slices as a random-access sequence of records."""

    def __init__(self, split: str, num_slices: int, size: int):
        self.split, self.num_slices, self.size = split, num_slices, size
        self._split_seed = _SPLIT_SEEDS[split]

    def __len__(self) -> int:
        return self.num_slices

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_slices:
            raise IndexError(index)
        # The seed and id strings keep the dataset's first name: they fix its slices and their ids.
        seed = zlib.crc32(f"phantom/{self._split_seed}/{index}".encode())
        record = synthetic_slice(seed, self.size)
        record["id"] = f"phantom-{self.split}-{index:05d}"
        return record

    def __repr__(self) -> str:
        return f"SyntheticSource(split={self.split!r}, num_slices={self.num_slices}, size={self.size})"
