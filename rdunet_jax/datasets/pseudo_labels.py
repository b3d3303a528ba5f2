"""Pseudo-labels on disk, and the training source that mixes them with the expert-labelled slices.

A pseudo-label folder (written by `rdunet_jax.selftrain`; complete once `summary.json` exists, which is
written last):

    masks/<id>.png        the lesion mask of the model that made them (the teacher in round 1, the previous
                          round's student after it) at the slice's stored size, {0, 255}
    confidence/<id>.png   the per-pixel loss weight at that size, 0-255 for [0, 1] (0: the pixel is ignored):
                          0 or 255 with `selftrain.weighting='threshold'`, the model's confidence |2p - 1|
                          with 'confidence' (the folder's name from before the weighting was a choice)
    summary.json          the settings, per-slice statistics, and each slice's index in the unlabelled split
"""

import hashlib
import json
import pathlib

import numpy as np

from rdunet_jax.datasets import readers
from rdunet_jax.errors import UserError

SUMMARY = "summary.json"
MASKS = "masks"
WEIGHTS = "confidence"
# Weights are stored as 8-bit PNGs: weight w is the byte round(255 w).
WEIGHT_SCALE = 255


def read_summary(directory) -> dict:
    """The summary of a complete pseudo-label folder; UserError naming the folder when incomplete."""
    path = pathlib.Path(directory) / SUMMARY
    if not path.is_file():
        raise UserError(
            f"data.pseudo_label_dir: {directory} holds no {SUMMARY} (not a complete pseudo-label folder)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def pool_changed(directory, made_for: int, now: int) -> str:
    return (
        f"data.pseudo_label_dir: {directory} labels a pool of {made_for} slices, the unlabelled split now "
        f"holds {now}; remove the folder (and the students trained on it) to predict it again"
    )


def pool_ids_and_digest(unlabelled) -> tuple[list[str], str]:
    """Every unlabelled slice's id, and a digest of the ids and stored images: pseudo-labels belong to
    these bytes."""
    ids, digest = [], hashlib.sha256()
    for index in range(len(unlabelled)):
        record = unlabelled[index]
        image = np.asarray(record["image"])
        ids.append(str(record["id"]))
        digest.update(f"{record['id']}\0{image.dtype.str}\0{image.shape}\0".encode())
        digest.update(image.tobytes())  # in C order, whatever the layout in memory
    return ids, digest.hexdigest()[:16]


class PseudoLabelSource:
    """Unlabelled slices with their pseudo-labels: records of `image`, `mask` {0, 1}, `weight` (uint8,
    255 = 1) and `id`, in the summary's order."""

    def __init__(self, directory, unlabelled, intensity_matching: str = "none"):
        self.directory = pathlib.Path(directory)
        summary = read_summary(self.directory)
        # The labels belong to the pool's images as the model saw them (datasets/intensity_matching.py).
        made_with = summary.get("unlabelled_intensity_matching", "none")
        if made_with != intensity_matching:
            raise UserError(
                f"data.unlabelled_intensity_matching: {directory} was predicted from the pool matched with "
                f"{made_with!r}, the config reads it with {intensity_matching!r}"
            )
        self.slices = summary["slices"]
        self._unlabelled = unlabelled
        made_for = summary.get("totals", {}).get("num_slices")
        if made_for is not None and made_for != len(unlabelled):
            raise UserError(pool_changed(directory, made_for, len(unlabelled)))

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict:
        entry = self.slices[index]
        record = self._unlabelled[entry["index"]]
        if str(record["id"]) != entry["id"]:
            raise UserError(
                f"data.pseudo_label_dir: {self.directory} labels slice {entry['id']!r} at index "
                f"{entry['index']}, where the unlabelled split now holds {record['id']!r}; predict it again"
            )
        image = np.asarray(record["image"])
        mask = readers.read_binary_mask(self.directory / MASKS / f"{entry['id']}.png")
        weight = readers.read_grayscale_image(self.directory / WEIGHTS / f"{entry['id']}.png")
        for name, array in (("mask", mask), ("weight", weight)):
            if array.shape != image.shape:
                raise UserError(
                    f"{self.directory}: the {name} of {entry['id']} is {array.shape}, its image {image.shape}"
                )
        return {"image": image, "mask": mask, "weight": weight, "id": entry["id"]}

    def lesion_fraction(self, index: int) -> float:
        """The share of slice `index`'s pseudo-label mask that is lesion."""
        mask = readers.read_binary_mask(self.directory / MASKS / f"{self.slices[index]['id']}.png")
        return float(np.mean(mask > 0))

    def __repr__(self) -> str:
        return f"PseudoLabelSource(directory={str(self.directory)!r}, num_records={len(self)})"


class WithoutLabels:
    """Unlabelled slices for mean teacher: each record with an all-zero mask and an all-zero loss weight,
    so the supervised loss ignores it and only the consistency term learns from it."""

    def __init__(self, unlabelled):
        self._unlabelled = unlabelled

    def __len__(self) -> int:
        return len(self._unlabelled)

    def __getitem__(self, index: int) -> dict:
        record = self._unlabelled[index]
        image = np.asarray(record["image"])
        zeros = np.zeros(image.shape, np.uint8)
        return {"image": image, "mask": zeros, "weight": zeros, "id": record["id"]}

    def __repr__(self) -> str:
        return f"WithoutLabels({self._unlabelled!r})"


class WithLesion:
    """The records of `source` whose mask covers at least `min_fraction` of the slice: the extra slices
    kept for training. The expert-labelled slices hold lesion on every slice (14% on average); the pool's
    pseudo-labels and Ma et al.'s slices far less, and a per-slice Dice on a nearly empty slice teaches
    the model to predict nothing."""

    def __init__(self, source, min_fraction: float):
        self._source, self.min_fraction = source, float(min_fraction)
        # A pseudo-label folder answers from its mask files alone, without reading the pool's images.
        lesion_fraction = getattr(source, "lesion_fraction", None) or (
            lambda index: np.mean(np.asarray(source[index]["mask"]) > 0)
        )
        self.kept = [index for index in range(len(source)) if lesion_fraction(index) >= self.min_fraction]
        if not self.kept:
            raise UserError(
                f"data.extra_min_lesion_fraction: none of the {len(source)} extra slices has lesion on "
                f"{min_fraction} of its pixels"
            )

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> dict:
        return self._source[self.kept[index]]

    def __repr__(self) -> str:
        return f"WithLesion({self._source!r}, min_fraction={self.min_fraction}, num_records={len(self)})"


class MixedSource:
    """The labelled training slices and extra ones (pseudo-labelled, or another dataset's labelled slices),
    mixed into batches by the input pipeline (`extra_fraction` of each batch from `extra`). Its length and
    items are the labelled slices'."""

    def __init__(self, labelled, extra, extra_fraction: float):
        self.labelled, self.extra, self.extra_fraction = labelled, extra, float(extra_fraction)
        self.name, self.split = getattr(labelled, "name", ""), getattr(labelled, "split", "train")

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, index: int) -> dict:
        return self.labelled[index]

    def __repr__(self) -> str:
        fraction = self.extra_fraction
        return f"MixedSource(labelled={self.labelled!r}, extra={self.extra!r}, fraction={fraction})"
