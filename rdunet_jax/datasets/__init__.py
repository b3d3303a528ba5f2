"""Data sources: random-access sequences of slice records for the input pipeline.

A record is a dict of numpy arrays: `image` (H, W) uint8 display-windowed intensities (float32
Hounsfield units for `nifti`), `mask` (H, W) uint8 in {0, 1}, and `id` (str); datasets add more (class
mask, lung mask, case id, spacing, affine). Every `data.name` is read through the TFDS builder in
`builder.py`, which prepares the dataset in `data.data_dir` on first use.

With `data.cv_folds` > 0, `train` and `validation` are index views of a cross-validation pool (see
`cross_validation_folds`); the prepared dataset itself is never rebuilt per fold.
"""

import numpy as np

from rdunet_jax.datasets import builder as builder_lib
from rdunet_jax.datasets import intensity_matching, layouts, pseudo_labels
from rdunet_jax.errors import UserError


class RecordSource:
    """One split of a prepared dataset as a sequence of numpy records (string features as `str`)."""

    def __init__(self, data_source, name: str, split: str, extra: dict | None = None):
        self._data_source, self.name, self.split = data_source, name, split
        self._extra = extra or {}
        self._length = len(data_source)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        if not -self._length <= index < self._length:
            raise IndexError(index)
        record = dict(self._data_source[index % self._length])
        for key, value in record.items():
            if isinstance(value, bytes):
                record[key] = value.decode("utf-8")
        record.update(self._extra)
        return record

    def __repr__(self) -> str:
        return f"RecordSource(name={self.name!r}, split={self.split!r}, num_records={self._length})"


def _splits(prepared) -> list[str]:
    return sorted(prepared.info.splits.keys())


class SubsetSource:
    """Records of other sources, picked by (source, index) pairs: a fold of a cross-validation pool."""

    def __init__(self, entries: list, name: str, split: str):
        self._entries, self.name, self.split = list(entries), name, split

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        if not -len(self._entries) <= index < len(self._entries):
            raise IndexError(index)
        source, source_index = self._entries[index]
        return source[source_index]

    def __repr__(self) -> str:
        return f"SubsetSource(name={self.name!r}, split={self.split!r}, num_records={len(self)})"


def _load_prepared_split(prepared, data_config, split: str) -> RecordSource:
    """One split of a prepared dataset, as the builder wrote it."""
    if split not in prepared.info.splits:
        raise UserError(f"data.name={data_config.name!r} has splits {_splits(prepared)}, not {split!r}")
    extra = {}
    if data_config.name == "nifti":
        # The window travels with each record so preprocessing honours `data.hu_window`.
        extra["hu_window"] = np.asarray(tuple(data_config.hu_window), np.float32)
    return RecordSource(prepared.as_data_source(split), data_config.name, split, extra)


def load_source(data_config, split: str):
    """The records of one split of `data_config.name`, as a random-access sequence.

    With `data.cv_folds` > 0, `train` is the pool without fold `data.cv_fold` and `validation` is that
    fold; `train_full` is refused (it would hold the held-out fold) and `test` is the test split. With
    `data.pseudo_label_dir` set, the training split comes mixed with those pseudo-labelled slices; with
    `data.extra_labelled_dir`, with Ma et al.'s labelled slices (joint training); with
    `data.unlabelled_fraction`, with the unlabelled split at weight 0 (mean teacher).
    """
    labelled = _load_labelled_source(data_config, split)
    if split == data_config.train_split and data_config.get("pseudo_label_dir", ""):
        pseudo_labelled = pseudo_labels.PseudoLabelSource(
            data_config.pseudo_label_dir,
            load_source(data_config, "unlabelled"),
            data_config.get("unlabelled_intensity_matching", "none"),
        )
        return pseudo_labels.MixedSource(
            labelled, _with_lesion(pseudo_labelled, data_config), data_config.pseudo_fraction
        )
    if split == data_config.train_split and data_config.get("unlabelled_fraction", 0.0):
        return pseudo_labels.MixedSource(
            labelled,
            pseudo_labels.WithoutLabels(load_source(data_config, "unlabelled")),
            data_config.unlabelled_fraction,
        )
    if split == data_config.train_split and data_config.get("extra_labelled_dir", ""):
        return pseudo_labels.MixedSource(
            labelled,
            _with_lesion(extra_labelled_source(data_config), data_config),
            data_config.extra_fraction,
        )
    return labelled


def _with_lesion(extra, data_config):
    """`extra`, less its slices with too little lesion (`data.extra_min_lesion_fraction`; 0 keeps all)."""
    min_fraction = data_config.get("extra_min_lesion_fraction", 0.0)
    if min_fraction <= 0:
        return extra
    kept = pseudo_labels.WithLesion(extra, min_fraction)
    # The count depends on the teacher's pseudo-labels (or the folder), so the log is where a user sees it.
    print(
        f"data.extra_min_lesion_fraction={min_fraction:g}: {len(kept)} of {len(extra)} extra slices kept",
        flush=True,
    )
    return kept


def extra_labelled_source(data_config) -> SubsetSource:
    """Every slice (all three splits) of Ma et al.'s 2-D data in `data.extra_labelled_dir`: the other
    labelled data joint training mixes into the training batches."""
    extra = data_config.copy_and_resolve_references()
    extra.name, extra.manual_dir, extra.cv_folds = "ma2020_2d", data_config.extra_labelled_dir, 0
    extra.extra_labelled_dir = extra.pseudo_label_dir = ""
    prepared = builder_lib.prepare(extra)
    sources = [_load_prepared_split(prepared, extra, split) for split in _splits(prepared)]
    return SubsetSource(
        [(source, index) for source in sources for index in range(len(source))], "ma2020_2d", "all"
    )


def training_intensity_counts(data_config) -> np.ndarray:
    """The pooled 256-level histogram of the labelled training slices (a fold's, with data.cv_folds): the
    display window the model learns in, onto which other slices' intensities are matched."""
    training = _load_labelled_source(data_config, data_config.get("train_split", "train"))
    return intensity_matching.pooled_histogram(training)


def _load_labelled_source(data_config, split: str):
    """`load_source` without pseudo-labels: one split, or one fold of the cross-validation pool."""
    if split == builder_lib.UNLABELLED_SPLIT:
        unlabelled = unlabelled_pool(data_config)
        mode = data_config.get("unlabelled_intensity_matching", "none")
        if mode == "none":
            return unlabelled
        # The reference is the slices the model learns labels from: a fold's training slices, never the
        # held-out ones.
        reference = training_intensity_counts(data_config)
        return intensity_matching.IntensityMatched(unlabelled, reference, mode)
    prepared = builder_lib.prepare(data_config)
    num_folds = data_config.get("cv_folds", 0)
    if not num_folds or split not in ("train", "validation", "train_full"):
        return _load_prepared_split(prepared, data_config, split)
    if split == "train_full":
        raise UserError(
            "data.train_split: 'train_full' holds the held-out fold when data.cv_folds > 0; use 'train'"
        )
    fold = data_config.cv_fold
    if not 0 <= fold < num_folds:
        raise UserError(f"data.cv_fold: must be an integer in [0, {num_folds - 1}], got {fold!r}")
    pool = [_load_prepared_split(prepared, data_config, name) for name in _pool_splits(prepared)]
    entries = [(source, index) for source in pool for index in range(len(source))]
    cache_key = (str(prepared.data_path), _pool_splits(prepared))
    if cache_key not in _POOL_IDS:
        _POOL_IDS[cache_key] = tuple(str(source[index]["id"]) for source, index in entries)
    held_out = cross_validation_folds(_POOL_IDS[cache_key], num_folds, data_config.cv_seed)[fold]
    if split == "validation":
        chosen = held_out.tolist()
    else:
        chosen = sorted(set(range(len(entries))) - set(held_out.tolist()))
    return SubsetSource([entries[index] for index in chosen], data_config.name, split)


def unlabelled_pool(data_config) -> "UnlabelledSource":
    """The unlabelled split as stored, before any intensity matching: what pseudo-labels are made from."""
    prepared = builder_lib.prepare(data_config)
    return UnlabelledSource(_load_prepared_split(prepared, data_config, builder_lib.UNLABELLED_SPLIT))


class UnlabelledSource:
    """The unlabelled split: each record's image and id, its volume as `case_id`, and the all-zero `mask`
    placeholder (what prediction reads as the absent expert mask)."""

    def __init__(self, records: RecordSource):
        self._records, self.name, self.split = records, records.name, records.split

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        example_id = str(record["id"])
        case_id = layouts.unlabelled_case_id(example_id) if self.name == "semiseg" else self.name
        return {"image": record["image"], "mask": record["mask"], "id": example_id, "case_id": case_id}

    def __repr__(self) -> str:
        return f"UnlabelledSource(name={self.name!r}, num_records={len(self)})"


def _pool_splits(prepared) -> tuple[str, ...]:
    """The splits pooled for cross-validation: semiseg's train_full (all 50 labelled slices), or
    train + validation (every slice outside the test split) for the other datasets."""
    if "train_full" in prepared.info.splits:
        return ("train_full",)
    return ("train", "validation")


# Ids of each cross-validation pool, keyed by the prepared dataset's folder (its name hashes the data
# and the split options): reading them decodes every record, so once per process is enough.
_POOL_IDS: dict[tuple, tuple[str, ...]] = {}


def cross_validation_folds(ids, num_folds: int, seed: int) -> list[np.ndarray]:
    """Positions in `ids` of each of `num_folds` folds (sizes differ by at most one).

    The folds depend only on the set of ids and the seed, not on record order: ids are sorted, then
    permuted by a `seed`-seeded generator, then cut into consecutive parts.
    """
    ids = [str(value) for value in ids]
    if len(set(ids)) != len(ids):
        raise UserError("data.cv_folds: the cross-validation pool has duplicate ids")
    if num_folds > len(ids):
        raise UserError(
            f"data.cv_folds: {num_folds} folds need at least as many slices, the pool has {len(ids)}"
        )
    by_id = sorted(range(len(ids)), key=lambda position: ids[position])
    permutation = np.random.default_rng(seed).permutation(len(ids))
    shuffled = np.asarray(by_id, np.int64)[permutation]
    return [np.sort(part) for part in np.array_split(shuffled, num_folds)]


def has_split(data_config, split: str) -> bool:
    """Whether `split` exists for this dataset (a test split may be held out)."""
    prepared = builder_lib.prepare(data_config)
    return split in prepared.info.splits and prepared.info.splits[split].num_examples > 0
