"""The builder on the real public datasets in ../shared/data (or $RDUNET_DATA_ROOT).

These tests fail, rather than skip, when the data is absent: a silently skipped integration test would
let a broken reader pass. Datasets are built into a temporary data_dir, never into the repository.
"""

import pathlib
import re

import numpy as np
import pytest
from helpers import DATA_ROOT

from rdunet_jax import config_lib, datasets, input_pipeline, steps

pytestmark = pytest.mark.real_data

MANUAL_DIRS = {"semiseg": DATA_ROOT / "covid-semiseg", "ma2020_2d": DATA_ROOT / "covid19-ct-seg-2d"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def real_data_config(name, data_dir, **overrides):
    """`config.data` for a real dataset; fails with where the data is expected when it is absent."""
    manual_dir = MANUAL_DIRS[name]
    if not manual_dir.is_dir():
        pytest.fail(
            f"real data for {name!r} not found at {manual_dir}: the tests expect ../shared/data beside the "
            f"repository (see ../shared/data/README.md and docs/datasets.md) or RDUNET_DATA_ROOT set"
        )
    data = config_lib.base_config().data
    data.name, data.manual_dir, data.data_dir = name, str(manual_dir), str(data_dir)
    data.update(overrides)
    return data


def all_records(source):
    return [source[index] for index in range(len(source))]


def check_slices(records, lesion_inside):
    """Shapes, dtypes and value ranges of real slices, and lesions lying inside `lesion_inside(record)`."""
    for record in records:
        image, mask = record["image"], record["mask"]
        assert image.ndim == 2 and image.dtype == np.uint8 and mask.shape == image.shape
        assert set(np.unique(mask)) == {0, 1}, record["id"]  # every released slice has a lesion
        assert image.std() > 10, record["id"]  # a real image, not a blank or constant one
        inside = lesion_inside(record)[mask > 0].mean()
        assert inside > 0.9, f"{record['id']}: only {inside:.0%} of lesion pixels lie inside the body/lungs"


def test_semiseg_splits_shapes_and_alignment(data_dir):
    data = real_data_config("semiseg", data_dir)
    sizes = {split: len(datasets.load_source(data, split)) for split in ("train", "validation", "train_full")}
    assert sizes == {"train": 45, "validation": 5, "train_full": 50}
    records = all_records(datasets.load_source(data, "train_full"))
    assert len({record["id"] for record in records}) == 50
    # Images are cropped to the body: lesion pixels lie on tissue, not on the black background.
    check_slices(records, lambda record: record["image"] > 20)
    for record in records:
        assert 150 <= min(record["image"].shape) and max(record["image"].shape) <= 512
        assert set(np.unique(record["class_mask"])) <= {0, 1, 2}
        np.testing.assert_array_equal(record["class_mask"] > 0, record["mask"] > 0)
    if (MANUAL_DIRS["semiseg"] / "Dataset/TestingSet").is_dir():
        assert len(datasets.load_source(data, "test")) == 48
    else:
        assert not datasets.has_split(data, "test")


def test_semiseg_unlabelled_pool_has_1600_images_of_20_volumes(data_dir):
    data = real_data_config("semiseg", data_dir)
    folder = MANUAL_DIRS["semiseg"] / "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs"
    if not folder.is_dir():
        pytest.fail(f"the unlabelled pool is not at {folder} (see ../shared/data/README.md)")
    pool = datasets.load_source(data, "unlabelled")
    records = all_records(pool)
    assert len(records) == 1600
    # Independent of the reader: the file names, and the volume as the name without "Data-1_" and "_<n>".
    names = sorted(path.stem for path in folder.glob("*.jpg"))
    assert sorted(record["id"] for record in records) == names
    expected_cases = {name: re.fullmatch(r"Data-1_(.+)_\d+", name).group(1) for name in names}
    assert {record["id"]: record["case_id"] for record in records} == expected_cases
    cases = set(expected_cases.values())
    assert len(cases) == 20 and sum(case.startswith("coronacases_org_") for case in cases) == 10
    for record in records[::40]:
        image = record["image"]
        assert image.ndim == 2 and image.dtype == np.uint8 and image.std() > 10, record["id"]
        assert 150 <= min(image.shape) and max(image.shape) <= 512
        assert not record["mask"].any()  # no labels: the release's Inf-Net pseudo-labels are never read


def test_ma2020_splits_shapes_and_alignment(data_dir):
    data = real_data_config("ma2020_2d", data_dir)
    sources = {split: datasets.load_source(data, split) for split in ("train", "validation", "test")}
    assert [len(source) for source in sources.values()] == [968, 323, 323]
    ids = [source[index]["id"] for source in sources.values() for index in range(len(source))]
    assert sorted(ids) == [f"{index:04d}" for index in range(1614)]
    records = all_records(sources["validation"])
    check_slices(records, lambda record: record["lung_mask"] > 0)  # infection lies inside the lungs
    assert all(record["image"].shape == (256, 256) for record in records)


def test_a_few_train_steps_on_real_slices_at_64_px(data_dir):
    import jax

    from rdunet_jax import models

    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.data = real_data_config("ma2020_2d", data_dir, image_size=64)
    config.batch_size, config.model.features, config.model.depth = 4, 4, 2
    config.model.skip_dilation_rates = ((1, 2, 1), (1, 2, 1))
    config.compilation_cache_dir = str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla")
    model = models.build_model(config.model)
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    source = datasets.load_source(config.data, "train")
    batches = iter(input_pipeline.train_dataset(source, config.data, config.batch_size, seed=0, epoch=0))
    losses = []
    for _ in range(3):
        state, metrics = steps.train_step(state, next(batches))
        losses.append(float(jax.device_get(metrics["loss"])))
    assert all(np.isfinite(losses)) and all(0.0 <= loss <= 1.0 for loss in losses)
    assert int(state.step) == 3


def test_semiseg_multiclass_labels_are_ggo_and_consolidation_and_cover_the_binary_mask(data_dir):
    # The release's palette masks hold 0 background, 1 ground-glass opacity, 2 consolidation, and their
    # lesion pixels are exactly the binary masks' (checked on all 50 slices).
    from rdunet_jax.datasets import labels as class_labels

    data = real_data_config("semiseg", data_dir, classes=("ggo", "consolidation"))
    source = class_labels.LabelledSource(datasets.load_source(data, "train_full"), data, "exclusive")
    present = []
    for index in range(len(source)):
        record = source[index]
        assert set(np.unique(record["labels"])) <= {0, 1, 2}, record["id"]
        np.testing.assert_array_equal(record["labels"] > 0, record["mask"] > 0, err_msg=record["id"])
        present.append([bool(np.any(record["labels"] == value)) for value in (1, 2)])
    assert len(source) == 50 and np.sum(present, axis=0).tolist() == [48, 39]


def test_ma2020_lungs_and_infection_channels_give_an_involvement_for_every_slice(data_dir):
    from rdunet_jax import involvement
    from rdunet_jax.datasets import labels as class_labels

    data = real_data_config("ma2020_2d", data_dir, classes=("lungs", "infection"))
    source = class_labels.LabelledSource(datasets.load_source(data, "validation"), data, "multilabel")
    channels = np.stack([source[index]["labels"] for index in range(len(source))]).astype(bool)
    lungs, infection = channels[..., 0], channels[..., 1]
    assert np.sum(lungs & infection) / np.sum(infection) > 0.999  # the infection masks lie inside the lungs
    percent = involvement.per_slice_percent(lungs, infection)
    assert np.all(np.isfinite(percent)) and 0 < percent.min() and percent.max() < 100
