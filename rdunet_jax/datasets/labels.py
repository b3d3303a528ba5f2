"""Class labels of each dataset for the multi-class heads, beside today's binary lesion mask.

A record's `labels` are what a head trains on: for `model.head='exclusive'` an integer label map (H, W)
with 0 background and k the k-th name of `data.classes`; for `'multilabel'` one binary channel per class
(H, W, K), which may overlap. They come from features the prepared datasets already hold:

- `semiseg` (and the phantom): `class_mask`, COVID-SemiSeg's palette masks (`MultiClassInfection-*/GT`:
  0 background, 1 ground-glass opacity, 2 consolidation), classes `ggo` and `consolidation`.
- `ma2020_2d`: `lung_mask` and `mask` (Ma et al.'s `lungs/` and `covid/`), classes `lungs` and
  `infection`; as channels they overlap (infection lies inside the lungs), as a label map infection
  takes precedence (1 lung without infection, 2 infection).
- `nifti`: `class_mask`, the label volume with any number of classes named by `data.classes` (value k
  is the k-th name); the builder refuses values above K when it prepares such a dataset. As channels, a
  `lungs` class holds the `infection` class too, as Ma et al.'s do.
"""

import numpy as np

from rdunet_jax.errors import UserError

# The classes each dataset's labels describe, in label-value order, and where they come from.
DATASET_CLASSES = {
    "semiseg": ("ggo", "consolidation"),
    "synthetic": ("ggo", "consolidation"),
    "ma2020_2d": ("lungs", "infection"),
}
BINARY_CLASSES = ("lesion",)  # a binary config's data.classes (config_lib.DEFAULT_CLASSES)
LUNG_CLASS_NAME = "lungs"


def check_classes(data_config, head: str) -> tuple[str, ...]:
    """The class names of `data.classes` for `head`, checked against what the dataset's labels hold."""
    classes = tuple(data_config.get("classes", BINARY_CLASSES))
    if head == "binary":
        return classes
    expected = DATASET_CLASSES.get(data_config.name)
    if expected is not None and len(classes) != len(expected):
        raise UserError(
            f"data.classes: data.name={data_config.name!r} has {len(expected)} classes "
            f"{list(expected)}, got {list(classes)}"
        )
    return classes


def label_map(record: dict, dataset: str) -> np.ndarray:
    """The record's classes as one label map (H, W) uint8, 0 background."""
    if dataset == "ma2020_2d":
        lungs, infection = np.asarray(record["lung_mask"]) > 0, np.asarray(record["mask"]) > 0
        return np.where(infection, 2, np.where(lungs, 1, 0)).astype(np.uint8)
    if "class_mask" not in record:
        raise UserError(f"data.name={dataset!r}: records have no class labels for a multi-class head")
    return np.asarray(record["class_mask"], np.uint8)


def label_map_masks(values, num_classes: int) -> np.ndarray:
    """Boolean per-class masks (..., K) of a label map (...): class k where the value is k (rounded, so a
    NIfTI label map stored as floats reads the same)."""
    return np.rint(np.asarray(values))[..., None] == np.arange(1, num_classes + 1)


def label_map_class_masks(values, head: str, classes) -> np.ndarray:
    """Boolean per-class masks (..., K) of an expert label map as `head` trains on them: a 'multilabel'
    head's lungs hold the infection too, which lies inside them (a label map gives each pixel one class)."""
    classes = list(classes)
    masks = label_map_masks(values, len(classes))
    if head == "multilabel" and LUNG_CLASS_NAME in classes and "infection" in classes:
        masks[..., classes.index(LUNG_CLASS_NAME)] |= masks[..., classes.index("infection")]
    return masks


def label_channels(record: dict, dataset: str, classes) -> np.ndarray:
    """The record's classes (names `classes`) as binary channels (H, W, K) uint8, which may overlap."""
    if dataset == "ma2020_2d":
        return np.stack(
            [np.asarray(record["lung_mask"]) > 0, np.asarray(record["mask"]) > 0], axis=-1
        ).astype(np.uint8)
    return label_map_class_masks(label_map(record, dataset), "multilabel", classes).astype(np.uint8)


def check_label_map(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises UserError naming `where` when a label map has values above `num_classes`."""
    above = np.unique(labels[labels > num_classes])
    if above.size:
        shown = ", ".join(str(value) for value in above[:5].tolist())
        raise UserError(f"{where}: label values {{{shown}}} outside data.classes (0..{num_classes})")


def with_labels(record: dict, dataset: str, head: str, classes) -> dict:
    """The record with the `labels` its head trains on for the class names `classes` (unchanged for the
    binary head)."""
    num_classes = len(classes)
    if head == "binary":
        return record
    if head == "exclusive":
        labels = label_map(record, dataset)
        check_label_map(labels, num_classes, f"record {record.get('id', '?')!s} of data.name={dataset!r}")
    elif head == "multilabel":
        if dataset != "ma2020_2d":
            check_label_map(label_map(record, dataset), num_classes, f"record {record.get('id', '?')!s}")
        labels = label_channels(record, dataset, classes)
    else:
        raise UserError(f"model.head: must be 'binary', 'exclusive' or 'multilabel', got {head!r}")
    return {**record, "labels": labels}


class LabelledSource:
    """A record source whose records carry the `labels` of a head (see `with_labels`)."""

    def __init__(self, source, data_config, head: str):
        self._source, self._head = source, head
        self._dataset = data_config.name
        self._classes = check_classes(data_config, head)
        self.name, self.split = getattr(source, "name", self._dataset), getattr(source, "split", None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return with_labels(self._source[index], self._dataset, self._head, self._classes)

    def __repr__(self) -> str:
        return f"LabelledSource({self._source!r}, head={self._head!r})"


def for_head(source, config):
    """`source` with the class labels `config.model.head` trains on (itself for the binary head)."""
    head = config.model.get("head", "binary")
    return source if head == "binary" else LabelledSource(source, config.data, head)
