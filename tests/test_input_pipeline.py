"""The Grain pipeline: seeded batch order, aligned binary augmentation, exact resume, fixed shapes."""

import shutil
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest
from helpers import write_pseudo_label_folder
from PIL import Image
from scipy import ndimage

from rdunet_jax import config_lib, datasets, devices, input_pipeline
from rdunet_jax.datasets import pseudo_labels

IMAGE_SIZE, BATCH_SIZE = 32, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 phantom slices at 32 px, prepared once through the TFDS builder."""
    data = config_lib.base_config().data
    data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.num_train, data.num_validation, data.num_test, data.image_size = 16, 6, 2, IMAGE_SIZE
    return data


@pytest.fixture(scope="module")
def source(data):
    return datasets.load_source(data, "train")


def epoch_batches(source, data, seed, epoch):
    return list(input_pipeline.train_dataset(source, data, BATCH_SIZE, seed=seed, epoch=epoch))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for left, right in zip(first, second, strict=True):
        for key in left:
            np.testing.assert_array_equal(left[key], right[key])


def test_same_seed_gives_the_same_batch_sequence(source, data):
    assert_same_batches(epoch_batches(source, data, 7, 0), epoch_batches(source, data, 7, 0))
    other_seed, other_epoch = epoch_batches(source, data, 8, 0), epoch_batches(source, data, 7, 1)
    reference = epoch_batches(source, data, 7, 0)
    assert not np.array_equal(reference[0]["image"], other_seed[0]["image"])
    assert not np.array_equal(reference[0]["image"], other_epoch[0]["image"])


def test_batches_have_fixed_shapes_and_ranges(source, data):
    batches = epoch_batches(source, data, 0, 0)
    assert len(batches) == len(source) // BATCH_SIZE == 4  # the partial batch is dropped
    for batch in batches:
        assert batch["image"].shape == batch["mask"].shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 1)
        assert batch["image"].dtype == batch["mask"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(np.unique(batch["mask"])) <= {0.0, 1.0}


def augment_with_seed(augment, image, mask, seed):
    """One augmentation draw (the same one for the same seed) of an (image, mask) pair of 2-D arrays."""
    example = {"image": image[..., None], "mask": mask[..., None]}
    augmented = augment.random_map(example, np.random.default_rng(seed))
    return augmented["image"][..., 0], augmented["mask"][..., 0]


@pytest.mark.parametrize("rotation_degrees", [0.0, 20.0])
@pytest.mark.parametrize("seed", range(12))
def test_flips_zoom_and_rotation_move_image_and_mask_identically_and_keep_masks_binary(
    seed, rotation_degrees
):
    # Images that say where each pixel came from: bilinear interpolation reproduces a constant and a linear
    # ramp exactly wherever it reads inside the slice, so the augmented row and column ramps give the source
    # point that each output pixel shows, whatever flips, zoom and rotation were drawn. The mask must be
    # the source mask at the nearest source pixel there (nearest-neighbour: no new values).
    rows, columns = np.indices((IMAGE_SIZE, IMAGE_SIZE)).astype(np.float64)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    mask[5:14, 8:25] = 1.0  # asymmetric blobs: every flip, zoom and turn changes the mask
    mask[20:28, 3:9] = 1.0
    augment = input_pipeline.Augment(flip=True, zoom_range=0.2, rotation_degrees=rotation_degrees)
    coverage, augmented_mask = augment_with_seed(augment, np.ones_like(mask), mask, seed)
    source_rows, _ = augment_with_seed(augment, rows, mask, seed)
    source_columns, _ = augment_with_seed(augment, columns, mask, seed)
    assert set(np.unique(augmented_mask)) <= {0.0, 1.0} and augmented_mask.sum() > 0
    read_inside = np.abs(coverage - 1.0) < 1e-9
    halfway = (np.abs(source_rows % 1 - 0.5) < 1e-3) | (np.abs(source_columns % 1 - 0.5) < 1e-3)
    checked = read_inside & ~halfway  # a point halfway between two pixels may round to either
    assert checked.mean() > 0.5
    nearest = mask[
        np.rint(source_rows).astype(int).clip(0, IMAGE_SIZE - 1),
        np.rint(source_columns).astype(int).clip(0, IMAGE_SIZE - 1),
    ]
    np.testing.assert_array_equal(augmented_mask[checked], nearest[checked])
    assert 0 < augmented_mask[checked].sum() < checked.sum()  # both classes inside the compared region


def test_zoom_and_rotate_matches_hand_computed_turns_and_magnification():
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    # A quarter turn about the centre is an exact permutation of the pixels (clockwise as displayed
    # with row 0 on top; a negative angle turns the other way), and no change returns the image.
    np.testing.assert_allclose(
        input_pipeline.zoom_and_rotate(image, 1.0, 90.0, order=1), np.rot90(image, -1), atol=1e-4
    )
    np.testing.assert_allclose(
        input_pipeline.zoom_and_rotate(image, 1.0, -90.0, order=1), np.rot90(image), atol=1e-4
    )
    np.testing.assert_array_equal(input_pipeline.zoom_and_rotate(image, 1.0, 0.0, order=1), image)
    # Zoom 2 about the centre (2, 2): output pixel (r, c) samples input (2 + (r - 2) / 2, 2 + (c - 2) / 2).
    zoomed = input_pipeline.zoom_and_rotate(image, 2.0, 0.0, order=1)
    assert zoomed[2, 2] == image[2, 2] and zoomed[0, 0] == image[1, 1] and zoomed[4, 4] == image[3, 3]
    assert zoomed[0, 1] == pytest.approx((image[1, 1] + image[1, 2]) / 2)


def test_rotation_off_draws_and_transforms_exactly_as_the_zoom_only_augmentation(source, data):
    example = {"image": np.random.default_rng(0).random((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)}
    example["mask"] = (example["image"] > 0.5).astype(np.float32)
    off = input_pipeline.Augment(True, 0.2, 0.0).random_map(example, np.random.default_rng(4))
    on = input_pipeline.Augment(True, 0.2, 15.0).random_map(example, np.random.default_rng(4))
    # The augmentation as it was before rotation existed: two flip draws, one zoom draw, diagonal zoom.
    rng, expected = np.random.default_rng(4), example["image"][..., 0]
    expected = expected[:, ::-1] if rng.random() < 0.5 else expected
    expected = expected[::-1, :] if rng.random() < 0.5 else expected
    factor = rng.uniform(0.8, 1.2)
    centre = np.full(2, (IMAGE_SIZE - 1) / 2.0)
    matrix = np.diag([1.0 / factor, 1.0 / factor])
    expected = ndimage.affine_transform(
        np.ascontiguousarray(expected), matrix, offset=centre - matrix @ centre, order=1, mode="constant"
    )
    np.testing.assert_array_equal(off["image"][..., 0], expected)
    assert not np.array_equal(off["image"], on["image"])
    rotated = data.copy_and_resolve_references()
    rotated.rotation_degrees = 15.0
    assert any(
        not np.array_equal(a["image"], b["image"])
        for a, b in zip(epoch_batches(source, data, 3, 0), epoch_batches(source, rotated, 3, 0), strict=True)
    )


def test_augmentation_is_applied(source, data):
    data_without = data.copy_and_resolve_references()
    data_without.flip, data_without.zoom_range = False, 0.0
    plain = epoch_batches(source, data_without, 3, 0)
    augmented = epoch_batches(source, data, 3, 0)
    assert any(not np.array_equal(p["image"], a["image"]) for p, a in zip(plain, augmented, strict=True))


def test_iterator_restored_mid_epoch_yields_exactly_the_remaining_batches(source, data):
    dataset = input_pipeline.train_dataset(source, data, BATCH_SIZE, seed=5, epoch=2)
    uninterrupted = list(input_pipeline.to_iterator(dataset))
    iterator = input_pipeline.to_iterator(dataset)
    consumed = [next(iterator), next(iterator)]
    state = iterator.get_state()
    del iterator  # the run stops here; a new process rebuilds the dataset and restores the position
    rebuilt = input_pipeline.train_dataset(source, data, BATCH_SIZE, seed=5, epoch=2)
    resumed = list(input_pipeline.to_iterator(rebuilt, state))
    assert_same_batches(consumed + resumed, uninterrupted)
    assert len(resumed) == len(uninterrupted) - 2


def test_the_iterator_reads_only_a_few_batches_ahead_of_the_train_step():
    # Grain's default buffer of 500 read a whole epoch ahead while a slow train step ran (0.5 GB of 256-px
    # batches); now at most the buffer and one in flight per thread are read before the next is asked for.
    reads = []
    dataset = grain.MapDataset.range(200).map(lambda index: reads.append(index) or index)
    iterator = input_pipeline.to_iterator(dataset, num_threads=2)
    assert next(iterator) == 0
    time.sleep(1.0)  # the reading threads run on while the step computes
    assert len(reads) <= 8  # a fixed bound: the constant set back to 500 fails here
    assert list(iterator) == list(range(1, 200))  # and nothing is lost or reordered


# --- Label maps (multi-class heads) ---------------------------------------------------------------------


def checkerboard_labels(num_values: int, seed: int) -> np.ndarray:
    """A label map of 4-pixel squares cycling through 0..num_values-1 from a seeded offset."""
    rows, columns = np.indices((IMAGE_SIZE, IMAGE_SIZE))
    offset = np.random.default_rng(seed).integers(num_values)
    return ((rows // 4 + 2 * (columns // 4) + offset) % num_values).astype(np.int32)


@pytest.mark.parametrize("rotation_degrees", [0.0, 25.0])
@pytest.mark.parametrize("seed", range(8))
def test_label_maps_and_label_channels_stay_exact_through_flips_zoom_and_rotation(seed, rotation_degrees):
    # As for the mask: the augmented coordinate ramps say where each output pixel was read from, and the
    # labels there must be the source labels at the nearest source pixel, in every channel.
    rows, columns = np.indices((IMAGE_SIZE, IMAGE_SIZE)).astype(np.float64)
    label_map = checkerboard_labels(4, seed)
    channels = np.stack([label_map % 2, (label_map >= 2).astype(np.int32)], axis=-1)  # overlapping classes
    augment = input_pipeline.Augment(flip=True, zoom_range=0.2, rotation_degrees=rotation_degrees)

    def run(image, labels):
        example = {"image": image[..., None], "mask": (label_map > 0).astype(np.float32)[..., None]}
        example["labels"] = labels
        return augment.random_map(example, np.random.default_rng(seed))

    coverage = run(np.ones_like(rows), label_map[..., None])
    source_rows = run(rows, label_map[..., None])["image"][..., 0]
    source_columns = run(columns, channels)["image"][..., 0]
    moved_map, moved_channels = coverage["labels"], run(columns, channels)["labels"]
    assert moved_map.shape == (IMAGE_SIZE, IMAGE_SIZE, 1) and moved_channels.shape == (
        IMAGE_SIZE,
        IMAGE_SIZE,
        2,
    )
    assert set(np.unique(moved_map)) <= {0, 1, 2, 3} and moved_map.dtype == label_map.dtype
    # The binary mask of the same slice moves identically: labels > 0 is the augmented mask everywhere.
    np.testing.assert_array_equal(moved_map[..., 0] > 0, coverage["mask"][..., 0] > 0)
    read_inside = np.abs(coverage["image"][..., 0] - 1.0) < 1e-9
    halfway = (np.abs(source_rows % 1 - 0.5) < 1e-3) | (np.abs(source_columns % 1 - 0.5) < 1e-3)
    checked = read_inside & ~halfway
    assert checked.mean() > 0.5
    nearest = (
        np.rint(source_rows).astype(int).clip(0, IMAGE_SIZE - 1),
        np.rint(source_columns).astype(int).clip(0, IMAGE_SIZE - 1),
    )
    np.testing.assert_array_equal(moved_map[..., 0][checked], label_map[nearest][checked])
    for index in range(2):
        np.testing.assert_array_equal(
            moved_channels[..., index][checked], channels[..., index][nearest][checked]
        )
    assert len(np.unique(moved_map[..., 0][checked])) == 4  # every class inside the compared region


def test_labels_take_no_random_draws_of_their_own():
    example = {"image": np.random.default_rng(0).random((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)}
    example["mask"] = (example["image"] > 0.5).astype(np.float32)
    augment = input_pipeline.Augment(True, 0.2, 15.0)
    without = augment.random_map(example, np.random.default_rng(5))
    with_labels = augment.random_map(
        {**example, "labels": checkerboard_labels(3, 0)[..., None]}, np.random.default_rng(5)
    )
    for key in ("image", "mask"):
        np.testing.assert_array_equal(without[key], with_labels[key])


def test_preprocess_resizes_labels_by_nearest_neighbour_like_the_mask():
    rng = np.random.default_rng(3)
    label_map = rng.integers(0, 3, size=(45, 37)).astype(np.uint8)
    record = {
        "image": rng.integers(0, 256, size=(45, 37)).astype(np.uint8),
        "mask": (label_map > 0).astype(np.uint8),
    }
    binary = input_pipeline.preprocess(record, IMAGE_SIZE)
    assert "labels" not in binary  # a binary record's example is as before
    example = input_pipeline.preprocess({**record, "labels": label_map}, IMAGE_SIZE)
    for key in ("image", "mask"):
        np.testing.assert_array_equal(example[key], binary[key])
    labels = example["labels"]
    assert labels.shape == (IMAGE_SIZE, IMAGE_SIZE, 1) and labels.dtype == np.int32
    # PIL's nearest neighbour reads source pixel floor((i + 0.5) * in / out) in each axis.
    source_rows = np.floor((np.arange(IMAGE_SIZE) + 0.5) * 45 / IMAGE_SIZE).astype(int)
    source_columns = np.floor((np.arange(IMAGE_SIZE) + 0.5) * 37 / IMAGE_SIZE).astype(int)
    np.testing.assert_array_equal(labels[..., 0], label_map[np.ix_(source_rows, source_columns)])
    np.testing.assert_array_equal(labels[..., 0] > 0, example["mask"][..., 0] > 0)
    channels = np.stack([label_map == 1, label_map == 2], axis=-1).astype(np.uint8)
    moved = input_pipeline.preprocess({**record, "labels": channels}, IMAGE_SIZE)["labels"]
    np.testing.assert_array_equal(moved, np.stack([labels[..., 0] == 1, labels[..., 0] == 2], axis=-1))


@pytest.mark.parametrize("head, channels", [("exclusive", 1), ("multilabel", 2)])
def test_training_batches_of_a_labelled_source_carry_labels_aligned_with_the_mask(
    source, data, head, channels
):
    from rdunet_jax.datasets import labels as class_labels

    labelled_data = data.copy_and_resolve_references()
    labelled_data.classes = ("ggo", "consolidation")
    labelled = class_labels.LabelledSource(source, labelled_data, head)
    batches = epoch_batches(labelled, labelled_data, 7, 0)
    binary = epoch_batches(source, data, 7, 0)
    for batch, binary_batch in zip(batches, binary, strict=True):
        for key in ("image", "mask"):  # the labels change nothing else in the batch
            np.testing.assert_array_equal(batch[key], binary_batch[key])
        labels = batch["labels"]
        assert labels.shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, channels) and labels.dtype == np.int32
        # The phantom's lesion mask is its class mask > 0: after the same flips and zoom, still so.
        np.testing.assert_array_equal(labels.max(axis=-1) > 0, batch["mask"][..., 0] > 0)
    every_label = np.concatenate([batch["labels"] for batch in batches])
    if head == "exclusive":
        assert set(np.unique(every_label).tolist()) == {0, 1, 2}
    else:
        assert every_label[..., 0].any() and every_label[..., 1].any()


# --- Labelled and pseudo-labelled slices mixed (self-training) ---------------------------------------------

POOL_SIZE, PSEUDO_WEIGHT_BYTE = 10, 128


def write_pseudo_labels(folder, pool, weight_byte):
    """A pseudo-label folder for every slice of `pool`: the top half "lesion", and one weight everywhere,
    so a batch row tells by its weight channel where it came from."""
    slices = []
    for index in range(len(pool)):
        record = pool[index]
        mask = np.zeros_like(record["image"])
        mask[: mask.shape[0] // 2] = 255
        slices.append((record["id"], index, mask, np.full_like(record["image"], weight_byte)))
    return write_pseudo_label_folder(folder, slices)


@pytest.fixture(scope="module")
def mixed_data(data, tmp_path_factory):
    """`data` with a phantom pool of 10 slices pseudo-labelled (weight 128/255), zoom off (flips only, so
    the weight channels stay uniform), half of each batch pseudo-labelled."""
    mixed = data.copy_and_resolve_references()
    mixed.num_unlabelled = POOL_SIZE
    folder = tmp_path_factory.mktemp("pseudo") / "round1"
    write_pseudo_labels(folder, datasets.load_source(mixed, "unlabelled"), PSEUDO_WEIGHT_BYTE)
    mixed.pseudo_label_dir, mixed.pseudo_fraction, mixed.zoom_range = str(folder), 0.5, 0.0
    return mixed


def test_pseudo_rows_per_batch_is_the_nearest_whole_number_leaving_a_labelled_row():
    assert input_pipeline.pseudo_per_batch(4, 0.5) == 2
    assert input_pipeline.pseudo_per_batch(4, 0.3) == 1  # 1.2
    assert input_pipeline.pseudo_per_batch(8, 0.3) == 2  # 2.4
    assert input_pipeline.pseudo_per_batch(8, 0.7) == 6  # 5.6
    assert input_pipeline.pseudo_per_batch(4, 0.0) == 0
    assert input_pipeline.pseudo_per_batch(4, 0.95) == 3  # 3.8 rounds to 4: one row stays labelled


def test_mixed_batches_hold_the_configured_ratio_with_weights_in_the_second_mask_channel(mixed_data):
    source = datasets.load_source(mixed_data, "train")
    assert isinstance(source, pseudo_labels.MixedSource) and len(source.extra) == POOL_SIZE
    batches = epoch_batches(source, mixed_data, 3, 0)
    # 16 labelled slices, 2 a batch: 8 batches, each 2 labelled (weight 1) and 2 pseudo (128/255) rows.
    assert len(batches) == 8
    for batch in batches:
        assert batch["mask"].shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 2)
        weights = batch["mask"][..., 1]
        row_weights = [np.unique(weights[row]).tolist() for row in range(BATCH_SIZE)]
        assert row_weights == [[1.0], [1.0], [np.float32(128 / 255)], [np.float32(128 / 255)]]
        # Pseudo rows carry their stored mask: half of the (possibly flipped) slice.
        for row in (2, 3):
            assert batch["mask"][row, ..., 0].mean() == 0.5


def test_pseudo_labelled_slices_with_too_little_lesion_are_left_out_of_batches(mixed_data, tmp_path, capsys):
    folder = shutil.copytree(mixed_data.pseudo_label_dir, tmp_path / "round1")
    masks = sorted((folder / pseudo_labels.MASKS).iterdir())
    for path in masks[1:4]:  # a single lesion row: 1/32 of the slice, below the 1/4 asked for
        mask = np.zeros_like(np.asarray(Image.open(path)))
        mask[0] = 255
        Image.fromarray(mask).save(path)
    filtered = mixed_data.copy_and_resolve_references()
    filtered.pseudo_label_dir, filtered.extra_min_lesion_fraction = str(folder), 0.25
    source = datasets.load_source(filtered, "train")
    expected = sorted(path.stem for path in masks[:1] + masks[4:])
    assert sorted(source.extra[index]["id"] for index in range(len(source.extra))) == expected
    assert f"={0.25:g}: {len(expected)} of {len(masks)} extra slices kept" in capsys.readouterr().out
    mixed = input_pipeline.MixedEpoch(source, BATCH_SIZE, seed=3, epoch=0)
    drawn = {mixed[index]["id"] for index in range(len(mixed)) if mixed.locate(index)[0] == "pseudo"}
    assert drawn == set(expected)  # an epoch's 16 draws over the 7 kept slices reach each of them


def test_mixed_epochs_use_each_labelled_slice_once_and_the_pool_without_replacement(mixed_data):
    source = datasets.load_source(mixed_data, "train")
    pool_draws = []
    for epoch in range(4):
        mixed = input_pipeline.MixedEpoch(source, BATCH_SIZE, seed=3, epoch=epoch)
        located = [mixed.locate(index) for index in range(len(mixed))]
        labelled = sorted(position for kind, position in located if kind == "labelled")
        assert labelled == list(range(16))
        pool_draws += [position for kind, position in located if kind == "pseudo"]
    # 4 epochs x 16 draws = 64 draws: six whole passes over the 10 pool slices, then 4 of a seventh.
    for start in range(0, 60, POOL_SIZE):
        assert sorted(pool_draws[start : start + POOL_SIZE]) == list(range(POOL_SIZE))
    assert len(set(pool_draws[60:])) == 4
    assert pool_draws[:POOL_SIZE] != pool_draws[POOL_SIZE : 2 * POOL_SIZE]  # a new order each pass


def test_mixed_batches_are_a_pure_function_of_seed_and_epoch_and_resume_mid_epoch(mixed_data):
    source = datasets.load_source(mixed_data, "train")
    assert_same_batches(epoch_batches(source, mixed_data, 7, 1), epoch_batches(source, mixed_data, 7, 1))
    assert not np.array_equal(
        epoch_batches(source, mixed_data, 7, 1)[0]["image"],
        epoch_batches(source, mixed_data, 8, 1)[0]["image"],
    )
    dataset = input_pipeline.train_dataset(source, mixed_data, BATCH_SIZE, seed=5, epoch=2)
    uninterrupted = list(input_pipeline.to_iterator(dataset))
    iterator = input_pipeline.to_iterator(dataset)
    consumed = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    del iterator
    rebuilt = datasets.load_source(mixed_data, "train")  # a new process reads the folder again
    resumed = list(
        input_pipeline.to_iterator(input_pipeline.train_dataset(rebuilt, mixed_data, BATCH_SIZE, 5, 2), state)
    )
    assert_same_batches(consumed + resumed, uninterrupted)


def test_two_hosts_mixed_parts_are_the_one_host_batch(mixed_data):
    source = datasets.load_source(mixed_data, "train")
    whole = list(input_pipeline.train_dataset(source, mixed_data, BATCH_SIZE, 4, 1))
    parts = [
        list(input_pipeline.train_dataset(source, mixed_data, BATCH_SIZE // 2, 4, 1, host, 2))
        for host in (0, 1)
    ]
    for index, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][index][key], parts[1][index][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_intensity_jitter_is_off_by_default_and_a_clipped_contrast_and_brightness_change():
    example = {"image": np.random.default_rng(0).random((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)}
    example["mask"] = (example["image"] > 0.5).astype(np.float32)
    plain = input_pipeline.Augment(False, 0.0, 0.0).random_map(example, np.random.default_rng(1))
    np.testing.assert_array_equal(plain["image"], example["image"])
    jittered = input_pipeline.Augment(False, 0.0, 0.0, 0.2).random_map(example, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    image = example["image"][..., 0]
    expected = np.clip((image - image.mean()) * contrast + image.mean() + brightness, 0, 1)
    np.testing.assert_allclose(jittered["image"][..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(jittered["mask"], example["mask"])  # labels do not move


# --- Each step by hand ----------------------------------------------------------------------------------


def test_resize_is_bilinear_for_images_and_nearest_for_masks():
    # Doubling [0, 200]: output pixel centres fall at -0.25, 0.25, 0.75 and 1.25 input pixels (edges clamp).
    row = np.array([[0, 200], [0, 200]], np.uint8)
    np.testing.assert_array_equal(input_pipeline.resize(row, 4, is_mask=False), [[0, 50, 150, 200]] * 4)
    np.testing.assert_array_equal(input_pipeline.resize(row, 4, is_mask=True), [[0, 0, 200, 200]] * 4)


def test_probabilities_go_back_to_the_slice_shape_bilinearly_as_float32():
    probabilities = np.array([[0.0, 1.0], [0.0, 1.0]])  # float64 in, float32 out
    same = input_pipeline.resize_probabilities(probabilities, (2, 2))
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, probabilities)
    back = input_pipeline.resize_probabilities(probabilities, [3, 4])  # 3 rows, 4 columns
    assert back.dtype == np.float32 and back.shape == (3, 4)
    np.testing.assert_allclose(back, [[0.0, 0.25, 0.75, 1.0]] * 3, atol=1e-6)


def test_hounsfield_windowing_and_preprocessing_by_hand():
    hounsfield = np.array([-1350, -600, 150, 1000], np.int16)
    windowed = input_pipeline.window_hounsfield(hounsfield, input_pipeline.LUNG_WINDOW)
    assert windowed.dtype == np.float32
    np.testing.assert_allclose(windowed, [0.0, 0.5, 1.0, 1.0])

    mask = np.array([[0, 255], [0, 255]], np.uint8)
    display = input_pipeline.preprocess({"image": np.array([[0, 255], [51, 102]], np.uint8), "mask": mask}, 2)
    np.testing.assert_allclose(display["image"][..., 0], [[0.0, 1.0], [0.2, 0.4]], atol=1e-7)
    # Doubled: the image bilinearly, the mask by nearest neighbour (bilinear would make 64 and 191 > 0).
    doubled = input_pipeline.preprocess({"image": np.array([[0, 200], [0, 200]], np.uint8), "mask": mask}, 4)
    np.testing.assert_allclose(doubled["image"][0, :, 0], np.array([0, 50, 150, 200]) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(doubled["mask"][0, :, 0], [0, 0, 1, 1])

    # Hounsfield units: the record's own window, else the lung window; resized bilinearly after windowing.
    ct = {"image": np.array([[-1350.0, 150.0], [-1350.0, 150.0]], np.float32), "mask": mask}
    np.testing.assert_allclose(
        input_pipeline.preprocess(ct, 4)["image"][0, :, 0], [0, 0.25, 0.75, 1], atol=1e-6
    )
    ct["hu_window"] = (-1350.0, -600.0)  # 150 is far above this window: 1
    np.testing.assert_allclose(input_pipeline.preprocess(ct, 2)["image"][0, :, 0], [0.0, 1.0])
    ct["image"] = np.full((2, 2), -975.0, np.float32)
    assert input_pipeline.preprocess(ct, 2)["image"][0, 0, 0] == pytest.approx(0.5)
    assert input_pipeline.preprocess(ct, 2, hu_window=(-975.0, 25.0))["image"][0, 0, 0] == 0.0


def test_pseudo_label_weights_resize_by_nearest_as_float32_and_expert_masks_weigh_1():
    record = {"image": np.zeros((2, 2), np.uint8), "mask": np.zeros((2, 2), np.uint8)}
    expert = input_pipeline.preprocess_weighted(record, 2)
    assert expert["mask"].dtype == np.float32 and expert["mask"].shape == (2, 2, 2)
    np.testing.assert_array_equal(expert["mask"][..., 1], 1.0)
    record["weight"] = np.array([[0, 255], [0, 255]], np.uint8)
    weighted = input_pipeline.preprocess_weighted(record, 4)
    assert weighted["mask"].dtype == np.float32
    np.testing.assert_array_equal(weighted["mask"][..., 1], [[0.0, 0.0, 1.0, 1.0]] * 4)


def disc(size=32, radius=8.0):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    return ((yy**2 + xx**2) <= radius**2).astype(np.float32)


@pytest.mark.parametrize("rotation_degrees", [1.0, 30.0])
def test_rotation_alone_draws_one_angle_and_turns_image_and_mask_without_zooming(rotation_degrees):
    # 96 px of noise: even a turn under 1 degree moves the corners' nearest-neighbour samples.
    image = np.random.default_rng(5).random((96, 96), dtype=np.float32)
    mask = (np.random.default_rng(6).random((96, 96)) < 0.5).astype(np.float32)
    example = {"image": image[..., None], "mask": np.stack([mask, disc(96, 30.0)], axis=-1)}
    augment = input_pipeline.Augment(flip=False, zoom_range=0.0, rotation_degrees=rotation_degrees)
    augmented = augment.random_map(example, np.random.default_rng(9))
    degrees = np.random.default_rng(9).uniform(-rotation_degrees, rotation_degrees)  # the only draw
    expected_image = input_pipeline.zoom_and_rotate(image, 1.0, degrees, order=1)
    np.testing.assert_allclose(augmented["image"][..., 0], expected_image, atol=1e-6)
    expected_mask = input_pipeline.zoom_and_rotate(mask, 1.0, degrees, order=0)
    assert not np.array_equal(expected_mask, mask)  # the turn shows in the mask
    np.testing.assert_array_equal(augmented["mask"][..., 0], expected_mask)
    turned_disc = augmented["mask"][..., 1]
    assert abs(turned_disc.sum() - disc(96, 30.0).sum()) <= 0.02 * disc(96, 30.0).sum()  # not magnified


def test_intensity_jitter_clips_below_zero_and_stays_float32():
    image = np.full((4, 4), 0.02, np.float32)  # a flat slice: contrast leaves it, brightness moves it
    rng = np.random.default_rng(3)
    _, brightness = rng.uniform(0.5, 1.5), rng.uniform(-0.25, 0.25)  # the draws of strength 0.5, in order
    assert 0.02 + brightness < 0  # seed 3: -0.132
    jittered = input_pipeline.jitter_intensity(image, np.random.default_rng(3), 0.5)
    assert jittered.dtype == np.float32
    np.testing.assert_array_equal(jittered, np.zeros((4, 4)))


def plain_records(count, size=8):
    """`count` slices whose pixels all hold their index (image) and a lesion on the left half (mask)."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255
    return [{"image": np.full((size, size), index, np.uint8), "mask": mask} for index in range(count)]


def plain_config(**changes):
    data = config_lib.base_config().data
    data.image_size, data.flip, data.zoom_range, data.rotation_degrees = 8, False, 0.0, 0.0
    data.update(changes)
    return data


def test_training_batches_drop_the_last_partial_batch_and_may_hold_one_slice():
    batches = list(input_pipeline.train_dataset(plain_records(5), plain_config(), 2, seed=0, epoch=0))
    assert [batch["image"].shape[0] for batch in batches] == [2, 2]
    singles = list(input_pipeline.train_dataset(plain_records(3), plain_config(), 1, seed=0, epoch=0))
    assert sorted(round(float(batch["image"][0, 0, 0, 0]) * 255) for batch in singles) == [0, 1, 2]


def test_a_batch_as_large_as_the_split_is_allowed_and_a_larger_one_refused_in_whole():
    (batch,) = input_pipeline.train_dataset(plain_records(4), plain_config(), 4, seed=0, epoch=0)
    assert batch["image"].shape == (4, 8, 8, 1)
    message = (
        "batch_size: 5 per host needs 5 training slices a batch, more than the training split's 4 (1 hosts)"
    )
    with pytest.raises(input_pipeline.UserError) as raised:
        input_pipeline.train_dataset(plain_records(4), plain_config(), 5, seed=0, epoch=0)
    assert str(raised.value) == message


def test_training_batches_follow_the_flip_and_intensity_settings():
    def images(data):
        batches = input_pipeline.train_dataset(plain_records(8), data, 8, seed=1, epoch=0)
        return next(iter(batches))["image"][..., 0]

    # Flips only: each mask's lesion is on the left or, flipped left-right, on the right.
    flipped = input_pipeline.train_dataset(plain_records(8), plain_config(flip=True), 8, seed=1, epoch=0)
    masks = next(iter(flipped))["mask"][..., 0]
    left = [bool(mask[:, 0].all()) for mask in masks]
    assert any(left) and not all(left)
    # Without augmentation each image is its slice's index / 255, as preprocessing made it.
    plain = images(plain_config())
    assert sorted(round(float(image[0, 0]) * 255) for image in plain) == list(range(8))
    assert all(np.ptp(image) == 0 for image in plain)
    # The student's intensity change: no image keeps its value.
    jittered = images(plain_config(intensity_range=0.5))
    assert not any(np.isclose(jittered[:, 0, 0], plain[:, 0, 0], atol=1e-6))
    # A config saved before the key existed trains without it.
    saved_earlier = plain_config()
    del saved_earlier["intensity_range"]
    np.testing.assert_array_equal(images(saved_earlier), plain)


def test_a_mixed_epoch_with_two_labelled_rows_a_batch_uses_each_labelled_slice_once():
    source = pseudo_labels.MixedSource(list(range(6)), list(range(100, 104)), 0.5)
    epoch = input_pipeline.MixedEpoch(source, batch_size=4, seed=3, epoch=0)
    assert (epoch.labelled_rows, epoch.pseudo_rows, len(epoch)) == (2, 2, 12)
    items = [epoch[index] for index in range(len(epoch))]
    rows = np.array(items).reshape(3, 4)
    assert sorted(rows[:, :2].ravel()) == list(range(6))
    assert sorted(rows[:, 2:].ravel()[:4]) == [100, 101, 102, 103]  # the pool once before any slice twice
    # With a labelled slice left over (7 for 3 batches of 2), the batches take the permutation's first 6
    # in order, two a batch.
    source.labelled = list(range(7))
    epoch = input_pipeline.MixedEpoch(source, batch_size=4, seed=3, epoch=0)
    labelled = [epoch[batch * 4 + row] for batch in range(3) for row in range(2)]
    assert labelled == list(epoch.labelled_order[:6]) and len(set(labelled)) == 6


@pytest.mark.parametrize(("num_hosts", "batch_size"), [(1, 4), (2, 4), (2, 6), (3, 6)])
def test_batch_norm_splits_the_global_batch_at_its_labelled_rows_whatever_the_hosts(
    monkeypatch, mixed_data, num_hosts, batch_size
):
    """Every host's step sees the global batch, the hosts' parts in host order: `batch_norm_split_row` is
    where its expert-masked rows (weight 1) end, not where one host's part of it would split."""
    config = ml_collections.ConfigDict({"data": mixed_data, "batch_size": batch_size, "seed": 0})
    config.model = {"batch_norm_by_source": True}
    source = datasets.load_source(mixed_data, "train")
    parts = []
    for host in range(num_hosts):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        monkeypatch.setattr(jax, "process_count", lambda: num_hosts)
        parts.append(list(devices.host_batches(source, config, epoch=1)))
        split = input_pipeline.batch_norm_split_row(source, config)  # as each host's train.py computes it
        assert split == batch_size // 2  # half of each batch pseudo-labelled
    for step_parts in zip(*parts, strict=True):
        weights = np.concatenate([part["mask"][..., 1] for part in step_parts])
        labelled = [bool(np.all(weight == 1.0)) for weight in weights]
        assert labelled == [True] * split + [False] * (batch_size - split)
    config.model.batch_norm_by_source = False
    assert input_pipeline.batch_norm_split_row(source, config) == 0


def test_a_mixed_batch_needs_only_its_labelled_rows_from_the_training_split(mixed_data):
    source = datasets.load_source(mixed_data, "train")  # 16 labelled slices, half of each batch pseudo
    (batch,) = list(input_pipeline.train_dataset(source, mixed_data, 32, seed=0, epoch=0))  # 16 + 16 rows
    assert batch["image"].shape[0] == 32
    with pytest.raises(input_pipeline.UserError) as raised:
        input_pipeline.train_dataset(source, mixed_data, 34, seed=0, epoch=0)  # 17 labelled rows
    assert str(raised.value) == (
        "batch_size: 34 per host needs 17 training slices a batch, more than the training split's 16 "
        "(1 hosts)"
    )


@pytest.mark.parametrize(
    ("batch_size", "fraction", "expected"), [(5, 0.2, 4), (4, 0.5, 2), (8, 0.3, 6), (2, 0.9, 1)]
)
def test_labelled_rows_are_the_rows_a_mixed_epoch_takes_from_the_labelled_slices(
    batch_size, fraction, expected
):
    """`labelled_rows` (what `model.batch_norm_by_source` splits each batch at): the labelled rows that open
    every batch of a `MixedEpoch`, 0 for a source of one kind."""
    source = pseudo_labels.MixedSource(list(range(40)), list(range(100, 140)), fraction)
    assert input_pipeline.labelled_rows(source, batch_size) == expected
    epoch = input_pipeline.MixedEpoch(source, batch_size, seed=1, epoch=2)
    kinds = [epoch.locate(index)[0] for index in range(len(epoch))]
    for batch in range(len(epoch) // batch_size):
        rows = kinds[batch * batch_size : (batch + 1) * batch_size]
        assert rows == ["labelled"] * expected + ["pseudo"] * (batch_size - expected)
    assert input_pipeline.labelled_rows(list(range(40)), batch_size) == 0
