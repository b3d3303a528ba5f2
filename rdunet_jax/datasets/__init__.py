"""Data sources: random-access sequences of slice records for the input pipeline.

A record is a dict of numpy arrays: `image` (H, W) uint8 display-windowed intensities, `mask` (H, W)
uint8 in {0, 1}, and `id` (str); datasets may add more (class mask, lung mask, case id, spacing).
"""

from rdunet_jax.datasets import phantom
from rdunet_jax.errors import UserError

SPLITS = ("train", "validation", "test")


def load_source(data_config, split: str):
    """The records of one split of `data_config.name`, as a random-access sequence."""
    if data_config.name == "synthetic":
        sizes = {
            "train": data_config.num_train,
            "validation": data_config.num_validation,
            "test": data_config.num_test,
        }
        if split not in sizes:
            raise UserError(f"data.name='synthetic' has splits {sorted(sizes)}, not {split!r}")
        return phantom.PhantomSource(split, sizes[split], data_config.image_size)
    raise UserError(f"data.name: unknown dataset {data_config.name!r}; choose 'synthetic'")


def has_split(data_config, split: str) -> bool:
    """Whether `split` exists for this dataset (a test split may be held out)."""
    try:
        return len(load_source(data_config, split)) > 0
    except UserError:
        return False
