"""Data sources: random-access sequences of slice records for the input pipeline.

A record is a dict of numpy arrays: `image` (H, W) uint8 display-windowed intensities (float32
Hounsfield units for `nifti`), `mask` (H, W) uint8 in {0, 1}, and `id` (str); datasets add more (class
mask, lung mask, case id, spacing, affine). Every `data.name` is read through the TFDS builder in
`builder.py`, which prepares the dataset in `data.data_dir` on first use.
"""

import numpy as np

from rdunet_jax.datasets import builder as builder_lib
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


def load_source(data_config, split: str) -> RecordSource:
    """The records of one split of `data_config.name`, as a random-access sequence."""
    prepared = builder_lib.prepare(data_config)
    if split not in prepared.info.splits:
        raise UserError(f"data.name={data_config.name!r} has splits {_splits(prepared)}, not {split!r}")
    extra = {}
    if data_config.name == "nifti":
        # The window travels with each record so preprocessing honours `data.hu_window`.
        extra["hu_window"] = np.asarray(tuple(data_config.hu_window), np.float32)
    return RecordSource(prepared.as_data_source(split), data_config.name, split, extra)


def has_split(data_config, split: str) -> bool:
    """Whether `split` exists for this dataset (a test split may be held out)."""
    prepared = builder_lib.prepare(data_config)
    return split in prepared.info.splits and prepared.info.splits[split].num_examples > 0
