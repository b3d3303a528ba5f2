"""Grain pipelines: records -> resized, [0, 1]-scaled, augmented, fixed-shape numpy batches.

Training batches are a pure function of (seed, epoch, batch index): each epoch builds a Grain
`MapDataset` shuffled and augmented with a seed derived from both, so the same seed gives the same
batch sequence, and a checkpointed iterator position resumes exactly.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image
from scipy import ndimage

from rdunet_jax import datasets
from rdunet_jax.errors import UserError

# Hounsfield units: the lung window W1500/L-600, the default of `data.hu_window`.
LUNG_WINDOW = (-1350.0, 150.0)


def resize(array: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """Resizes a 2-D slice to (size, size): bilinear for images, nearest for masks (stay binary)."""
    if array.shape == (size, size):
        return array
    resample = Image.Resampling.NEAREST if is_mask else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def resize_probabilities(probabilities: np.ndarray, shape) -> np.ndarray:
    """Probabilities (size, size) resized bilinearly back to a slice's `shape` (rows, columns)."""
    if probabilities.shape == tuple(shape):
        return probabilities.astype(np.float32)
    image = Image.fromarray(probabilities.astype(np.float32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def window_hounsfield(image: np.ndarray, hu_window) -> np.ndarray:
    """Maps Hounsfield units linearly from the (lower, upper) window to [0, 1], clipped (CT windowing)."""
    lower, upper = (float(value) for value in hu_window)
    return np.clip((np.asarray(image, np.float32) - lower) / (upper - lower), 0.0, 1.0)


def preprocess(record: dict, image_size: int, hu_window: tuple | None = None) -> dict:
    """The training preprocessing: resize to `image_size`, intensities to [0, 1], NHWC float32.

    uint8 images are display-windowed already and are divided by 255; other images (`nifti`) hold
    Hounsfield units, mapped linearly from `hu_window` (else the record's `hu_window`, else the lung
    window W1500/L-600, as `data.hu_window`) to [0, 1] and clipped.
    """
    image = np.asarray(record["image"])
    if image.dtype == np.uint8:
        image = resize(image, image_size, is_mask=False).astype(np.float32) / 255.0
    else:
        if hu_window is None:
            hu_window = record.get("hu_window", LUNG_WINDOW)
        image = resize(window_hounsfield(image, hu_window), image_size, is_mask=False)
    mask = resize(np.asarray(record["mask"]), image_size, is_mask=True)
    example = {
        "image": image.astype(np.float32)[..., None],
        "mask": (mask > 0).astype(np.float32)[..., None],
    }
    if "labels" in record:
        example["labels"] = resize_labels(record["labels"], image_size)
    return example


def resize_labels(labels, size: int) -> np.ndarray:
    """Class labels (a label map (H, W) or per-class channels (H, W, K)) resized by nearest neighbour
    to (size, size, C) int32 (C = 1 for a label map): every value is one of the input's."""
    labels = np.asarray(labels)
    channels = labels[..., None] if labels.ndim == 2 else labels
    resized = [
        resize(np.ascontiguousarray(channels[..., index]), size, is_mask=True)
        for index in range(channels.shape[-1])
    ]
    return np.stack(resized, axis=-1).astype(np.int32)


def zoom_and_rotate(array: np.ndarray, factor: float, degrees: float, order: int) -> np.ndarray:
    """Zooms by `factor` (> 1 magnifies) and rotates by `degrees` about the centre, keeping the shape;
    zeros fill outside."""
    centre = (np.array(array.shape[:2]) - 1) / 2.0
    angle = np.deg2rad(degrees)
    # affine_transform maps output to input coordinates, hence the inverse zoom.
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / factor
    offset = centre - matrix @ centre
    return ndimage.affine_transform(array, matrix, offset=offset, order=order, mode="constant")


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """The paper's augmentation: random horizontal and vertical flips and random zoom, image and
    mask transformed identically (nearest-neighbour for the mask, so it stays binary); optionally a
    random in-plane rotation too (nnU-Net's default spatial augmentation), and a random contrast and
    brightness change of the image (`intensity_range`). Every channel of the mask (a pseudo-label's weight
    map too) and an example's class `labels` (multi-class heads) move with the image, by nearest
    neighbour, from the same draws."""

    flip: bool = True
    zoom_range: float = 0.1
    rotation_degrees: float = 0.0
    intensity_range: float = 0.0

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = example["image"][..., 0]
        flips = (False, False)
        if self.flip:
            flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
            image = image[:, ::-1] if flips[0] else image
            image = image[::-1, :] if flips[1] else image
        # Draws happen only for enabled transforms, so a run without rotation sees the same random
        # stream, and the same batches, as before rotation existed.
        factor, degrees = 1.0, 0.0
        if self.zoom_range > 0:
            factor = rng.uniform(1.0 - self.zoom_range, 1.0 + self.zoom_range)
        if self.rotation_degrees > 0:
            degrees = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        if self.zoom_range > 0 or self.rotation_degrees > 0:
            image = zoom_and_rotate(np.ascontiguousarray(image), factor, degrees, order=1)
        if self.intensity_range > 0:
            image = jitter_intensity(image, rng, self.intensity_range)
        augmented = {
            "image": np.ascontiguousarray(image)[..., None],
            "mask": self._move_like_the_image(example["mask"], flips, factor, degrees),
        }
        if "labels" in example:
            augmented["labels"] = self._move_like_the_image(example["labels"], flips, factor, degrees)
        return augmented

    def _move_like_the_image(self, channels: np.ndarray, flips: tuple, factor: float, degrees: float):
        """A mask, weight map or class labels (H, W, C) moved as the image was, channel by channel and by
        nearest neighbour, so each keeps exactly its values (0, background, fills outside)."""
        flip_columns, flip_rows = flips
        channels = channels[:, ::-1] if flip_columns else channels
        channels = channels[::-1, :] if flip_rows else channels
        if self.zoom_range > 0 or self.rotation_degrees > 0:
            channels = np.stack(
                [
                    zoom_and_rotate(np.ascontiguousarray(channels[..., index]), factor, degrees, order=0)
                    for index in range(channels.shape[-1])
                ],
                axis=-1,
            )
        return np.ascontiguousarray(channels)


def jitter_intensity(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A random contrast (x U(1-s, 1+s) about the slice mean) and brightness (+ U(-s/2, s/2)) change,
    clipped to [0, 1]: the label-preserving intensity noise of the student's stronger augmentation."""
    contrast = rng.uniform(1.0 - strength, 1.0 + strength)
    brightness = rng.uniform(-strength / 2, strength / 2)
    mean = float(np.mean(image))
    return np.clip((image - mean) * contrast + mean + brightness, 0.0, 1.0).astype(np.float32)


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct 32-bit seed for each (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_dataset(
    source, data_config, batch_size: int, seed: int, epoch: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """One epoch of training batches (the last partial batch is dropped: fixed shapes).

    With several hosts, `batch_size` is each host's part of the global batch: every host shuffles and
    augments the epoch identically, cuts it into parts of `batch_size` slices and keeps every
    `shard_count`-th part from `shard_index`, so the hosts' parts, in host order, are exactly the
    one-host run's global batch (the same augmented slices in the same rows) and never overlap.
    """
    mixed = isinstance(source, datasets.pseudo_labels.MixedSource)
    # A mixed batch takes only its labelled rows from the training split (the rest from the extra source).
    needed = batch_size * shard_count - (
        pseudo_per_batch(batch_size * shard_count, source.extra_fraction) if mixed else 0
    )
    if len(source) < needed:
        raise UserError(
            f"batch_size: {batch_size} per host needs {needed} training slices a batch, more than the "
            f"training split's {len(source)} ({shard_count} hosts)"
        )
    if mixed:
        dataset = mixed_epoch(source, batch_size * shard_count, seed, epoch, data_config.image_size)
    else:
        dataset = grain.MapDataset.source(source).seed(epoch_seed(seed, epoch)).shuffle()
        dataset = dataset.map(lambda record: preprocess(record, data_config.image_size))
    # Augmented before sharding: Grain draws a slice's randomness from its position in the dataset, so
    # it stays the global position. The dataset is lazy: a host prepares only the slices it keeps.
    dataset = dataset.random_map(
        Augment(
            data_config.flip,
            data_config.zoom_range,
            data_config.rotation_degrees,
            data_config.get("intensity_range", 0.0),
        )
    )
    dataset = dataset.batch(batch_size, drop_remainder=True)  # Grain's default: each key stacked
    if shard_count > 1:
        dataset = dataset[shard_index : (len(dataset) // shard_count) * shard_count : shard_count]
    return dataset


# --- Labelled slices mixed with pseudo-labelled ones (self-training) ---------------------------------------


def pseudo_per_batch(batch_size: int, pseudo_fraction: float) -> int:
    """How many of each (global) batch's rows are pseudo-labelled: the nearest whole number to
    `pseudo_fraction` of the batch, leaving at least one labelled row."""
    return min(int(np.floor(batch_size * pseudo_fraction + 0.5)), batch_size - 1)


def labelled_rows(source, batch_size: int) -> int:
    """How many labelled rows open each global batch of `batch_size` from `source` (`MixedEpoch`'s order);
    0 for a source of one kind."""
    if not isinstance(source, datasets.pseudo_labels.MixedSource):
        return 0
    return batch_size - pseudo_per_batch(batch_size, source.extra_fraction)


def batch_norm_split_row(source, config) -> int:
    """Where `model.batch_norm_by_source` (domain-specific batch statistics) splits each training batch:
    the labelled rows of the global batch, 0 where the setting is off."""
    # The step sees the global batch, the hosts' parts in host order (`devices.host_batches`), not one
    # host's part: a host's part of a mixed batch has another split.
    return labelled_rows(source, config.batch_size) if config.model.get("batch_norm_by_source") else 0


def preprocess_weighted(record: dict, image_size: int) -> dict:
    """`preprocess`, with the mask's second channel the per-pixel loss weight (a pseudo-label's stored
    weight, 1 everywhere for an expert mask)."""
    example = preprocess(record, image_size)
    if "weight" in record:
        weight = resize(np.asarray(record["weight"]), image_size, is_mask=True).astype(np.float32) / 255.0
    else:
        weight = np.ones(example["mask"].shape[:2], np.float32)
    example["mask"] = np.concatenate([example["mask"], weight[..., None]], axis=-1)
    return example


class MixedEpoch:
    """One epoch of a `MixedSource` in batch order: every global batch holds `batch_size - k` labelled
    slices (a seeded permutation of them per epoch, each once) then `k` pseudo-labelled ones
    (`pseudo_per_batch`). The pseudo-labelled slices are drawn without replacement from a seeded
    permutation of the pool, carried on across epochs (a new permutation per pass over the pool), so a
    run sees the whole pool before any slice twice. Item `i` is a pure function of (seed, epoch, i)."""

    def __init__(self, source, batch_size: int, seed: int, epoch: int):
        self.source, self.seed, self.epoch = source, seed, epoch
        self.pseudo_rows = pseudo_per_batch(batch_size, source.extra_fraction)
        self.labelled_rows = batch_size - self.pseudo_rows
        self.batch_size = batch_size
        self.num_batches = len(source.labelled) // self.labelled_rows
        self.labelled_order = np.random.default_rng([seed, epoch, 0]).permutation(len(source.labelled))
        self._pool_orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def pseudo_index(self, draw: int) -> int:
        """The pool slice of the run's `draw`-th pseudo-labelled row (counted from epoch 0)."""
        pool_size = len(self.source.extra)
        cycle, position = divmod(draw, pool_size)
        if cycle not in self._pool_orders:
            self._pool_orders[cycle] = np.random.default_rng([self.seed, cycle, 1]).permutation(pool_size)
        return int(self._pool_orders[cycle][position])

    def locate(self, index: int) -> tuple[str, int]:
        """('labelled' or 'pseudo', the index in that source) of item `index`."""
        batch, row = divmod(index, self.batch_size)
        if row < self.labelled_rows:
            return "labelled", int(self.labelled_order[batch * self.labelled_rows + row])
        draw = (self.epoch * self.num_batches + batch) * self.pseudo_rows + row - self.labelled_rows
        return "pseudo", self.pseudo_index(draw)

    def __getitem__(self, index: int) -> dict:
        kind, position = self.locate(index)
        return (self.source.labelled if kind == "labelled" else self.source.extra)[position]


def mixed_epoch(source, batch_size: int, seed: int, epoch: int, image_size: int) -> grain.MapDataset:
    """A `MixedEpoch` of global batches of `batch_size`, preprocessed with weight channels."""
    return (
        grain.MapDataset.source(MixedEpoch(source, batch_size, seed, epoch))
        .seed(epoch_seed(seed, epoch))
        .map(lambda record: preprocess_weighted(record, image_size))
    )


# Batches read ahead of the train step. Grain's default of 500 held a whole epoch of 256-px batches in
# memory (about 0.5 GB for Ma et al.'s 968 slices) while a slow CPU step ran; a few keep the step fed.
PREFETCH_BATCHES = 4


def to_iterator(dataset: grain.MapDataset, state: dict | None = None, num_threads: int = 2):
    """A prefetching Grain iterator over `dataset`, optionally resumed from `get_state()`."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=PREFETCH_BATCHES)
    iterator = iter(dataset.to_iter_dataset(options))
    if state is not None:
        iterator.set_state(state)
    return iterator
