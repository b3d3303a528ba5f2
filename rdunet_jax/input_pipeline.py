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
    random in-plane rotation too (nnU-Net's default spatial augmentation). An example's class `labels`
    (multi-class heads), when it has them, move with the mask, by nearest neighbour, from the same draws."""

    flip: bool = True
    zoom_range: float = 0.1
    rotation_degrees: float = 0.0

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image, mask = example["image"][..., 0], example["mask"][..., 0]
        flips = (False, False)
        if self.flip:
            flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
            if flips[0]:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if flips[1]:
                image, mask = image[::-1, :], mask[::-1, :]
        # Draws happen only for enabled transforms, so a run without rotation sees the same random
        # stream, and the same batches, as before rotation existed.
        factor, degrees = 1.0, 0.0
        if self.zoom_range > 0:
            factor = rng.uniform(1.0 - self.zoom_range, 1.0 + self.zoom_range)
        if self.rotation_degrees > 0:
            degrees = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        if self.zoom_range > 0 or self.rotation_degrees > 0:
            image = zoom_and_rotate(np.ascontiguousarray(image), factor, degrees, order=1)
            mask = zoom_and_rotate(np.ascontiguousarray(mask), factor, degrees, order=0)
        augmented = {
            "image": np.ascontiguousarray(image)[..., None],
            "mask": np.ascontiguousarray(mask)[..., None],
        }
        if "labels" in example:
            augmented["labels"] = self._move_labels(example["labels"], flips, factor, degrees)
        return augmented

    def _move_labels(self, labels: np.ndarray, flips: tuple, factor: float, degrees: float) -> np.ndarray:
        """Class labels (H, W, C) moved as the mask was, channel by channel and by nearest neighbour,
        so a label map keeps exactly its values (0, background, fills outside)."""
        flip_columns, flip_rows = flips
        labels = labels[:, ::-1] if flip_columns else labels
        labels = labels[::-1, :] if flip_rows else labels
        if self.zoom_range > 0 or self.rotation_degrees > 0:
            labels = np.stack(
                [
                    zoom_and_rotate(np.ascontiguousarray(labels[..., index]), factor, degrees, order=0)
                    for index in range(labels.shape[-1])
                ],
                axis=-1,
            )
        return np.ascontiguousarray(labels)


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct 32-bit seed for each (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _stack(examples):
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def train_dataset(
    source, data_config, batch_size: int, seed: int, epoch: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """One epoch of training batches (the last partial batch is dropped: fixed shapes).

    With several hosts, `batch_size` is each host's part of the global batch: every host shuffles and
    augments the epoch identically, cuts it into parts of `batch_size` slices and keeps every
    `shard_count`-th part from `shard_index`, so the hosts' parts, in host order, are exactly the
    one-host run's global batch (the same augmented slices in the same rows) and never overlap.
    """
    if len(source) // shard_count < batch_size:
        raise UserError(
            f"batch_size: {batch_size} per host is larger than the training split "
            f"({len(source)} slices over {shard_count} hosts)"
        )
    dataset = grain.MapDataset.source(source).seed(epoch_seed(seed, epoch)).shuffle()
    dataset = dataset.map(lambda record: preprocess(record, data_config.image_size))
    # Augmented before sharding: Grain draws a slice's randomness from its position in the dataset, so
    # it stays the global position. The dataset is lazy: a host prepares only the slices it keeps.
    dataset = dataset.random_map(
        Augment(data_config.flip, data_config.zoom_range, data_config.rotation_degrees)
    )
    dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    if shard_count > 1:
        dataset = dataset[shard_index : (len(dataset) // shard_count) * shard_count : shard_count]
    return dataset


def to_iterator(dataset: grain.MapDataset, state: dict | None = None, num_threads: int = 2):
    """A prefetching Grain iterator over `dataset`, optionally resumed from `get_state()`."""
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    if state is not None:
        iterator.set_state(state)
    return iterator
