"""The TFDS builder's parts called one at a time (rdunet_jax/datasets/builder.py): the cache key's inputs,
each reader's refusals in whole, the read-ahead, and what a prepared folder records. The builds themselves,
split by split, are tested in test_datasets.py."""

import json
import re
import shutil
import time

import nibabel
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import data_config, make_ma2020, make_semiseg, refusal, save_nifti, save_png

from rdunet_jax.datasets import builder, layouts, readers

DATASET_NAMES = "['synthetic', 'semiseg', 'ma2020_2d', 'nifti']"


def phantom(tmp_path, **overrides):
    """A phantom of 4/2/2 slices of 8 px."""
    return data_config(
        tmp_path, "synthetic", num_train=4, num_validation=2, num_test=2, image_size=8, **overrides
    )


# --- The cache key ----------------------------------------------------------------------------------------


def test_cache_options_of_each_dataset_by_hand(tmp_path):
    assert builder.cache_options(phantom(tmp_path)) == {
        "dataset": "synthetic",
        "synthetic_sizes": [4, 2, 2],
        "synthetic_image_size": 8,
    }
    assert builder.cache_options(phantom(tmp_path, num_unlabelled=3))["synthetic_unlabelled"] == 3
    # A config saved before the unlabelled pool existed lacks the key: the same options as without a pool.
    saved_earlier = phantom(tmp_path).copy_and_resolve_references()
    del saved_earlier["num_unlabelled"]
    assert builder.cache_options(saved_earlier) == builder.cache_options(phantom(tmp_path))

    semiseg = make_semiseg(tmp_path / "semiseg")
    located = {"manual_dir": str(semiseg.resolve()), "fingerprint": readers.fingerprint(semiseg)}
    assert builder.cache_options(data_config(tmp_path, "semiseg", semiseg)) == {
        "dataset": "semiseg",
        **located,
        "unlabelled_split": 1,
    }

    ma2020 = make_ma2020(tmp_path / "ma")
    options = builder.cache_options(
        data_config(
            tmp_path, "ma2020_2d", ma2020, split_scheme="blocks", split_fractions=(1, 0, 0), split_seed=7
        )
    )
    assert options == {
        "dataset": "ma2020_2d",
        "manual_dir": str(ma2020.resolve()),
        "fingerprint": readers.fingerprint(ma2020),
        "split_scheme": "blocks",
        "split_fractions": [1.0, 0.0, 0.0],
        "split_seed": 7,
    }
    assert [type(value) for value in options["split_fractions"]] == [float] * 3


def test_nifti_cache_options_add_the_orientation_and_a_multiclass_label_count(tmp_path):
    volumes = tmp_path / "nifti"
    volumes.mkdir()
    save_nifti(volumes / "a_image.nii.gz", np.zeros((4, 4, 3), np.int16))
    save_nifti(volumes / "a_mask.nii.gz", np.zeros((4, 4, 3), np.uint8))
    expected = {
        "dataset": "nifti",
        "manual_dir": str(volumes.resolve()),
        "fingerprint": readers.fingerprint(volumes),
        "orientation": "PL",  # 'auto': the display orientation
        "split_scheme": "random",
        "split_fractions": [0.6, 0.2, 0.2],
        "split_seed": 0,
    }
    assert builder.cache_options(data_config(tmp_path, "nifti", volumes)) == expected
    three_classes = data_config(tmp_path, "nifti", volumes, classes=("ggo", "consolidation", "effusion"))
    assert builder.cache_options(three_classes) == {**expected, "num_classes": 3}


def test_an_unknown_dataset_is_refused_naming_the_choices(tmp_path):
    message = f"data.name: unknown dataset 'bogus'; choose one of {DATASET_NAMES}"
    assert refusal(builder.cache_options, data_config(tmp_path, "bogus")) == message
    # A builder made from a config by hand (not through cache_options) says the same.
    config = builder.CovidCtConfig(name="bogus-0", dataset="bogus")
    made = builder.CovidCtSlices(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
    assert refusal(made._split_generators, None) == message


def test_a_copy_of_the_folder_reuses_the_key(tmp_path):
    original = make_ma2020(tmp_path / "ma")
    copy = shutil.copytree(original, tmp_path / "elsewhere" / "ma")  # keeps sizes and modification times
    first = builder.builder_config(data_config(tmp_path, "ma2020_2d", original))
    second = builder.builder_config(data_config(tmp_path, "ma2020_2d", copy))
    assert first.name == second.name
    assert (first.manual_dir, second.manual_dir) == (str(original.resolve()), str(copy.resolve()))


def test_the_key_changes_with_the_builder_version_and_the_feature_schema(tmp_path, monkeypatch):
    data = phantom(tmp_path)
    name = builder.builder_config(data).name
    assert re.fullmatch(r"synthetic-[0-9a-f]{12}", name)

    with monkeypatch.context() as patch:
        patch.setattr(builder.CovidCtSlices, "VERSION", tfds.core.Version("1.0.1"))
        assert builder.builder_config(data).name != name

    features_for = builder.features_for

    def with_a_new_phantom_feature(dataset):
        features = dict(features_for(dataset))
        if dataset == "synthetic":
            features["new"] = tfds.features.Tensor(shape=(), dtype=np.int32)
        return tfds.features.FeaturesDict(features)

    monkeypatch.setattr(builder, "features_for", with_a_new_phantom_feature)
    assert builder.builder_config(data).name != name
    # Only the dataset whose features changed gets a new key.
    semiseg = data_config(tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"))
    changed_semiseg = builder.builder_config(semiseg).name
    monkeypatch.setattr(builder, "features_for", features_for)
    assert builder.builder_config(semiseg).name == changed_semiseg


def test_the_key_does_not_depend_on_the_order_of_the_options_or_of_the_features(tmp_path, monkeypatch):
    data = phantom(tmp_path)
    name = builder.builder_config(data).name
    cache_options, features_for = builder.cache_options, builder.features_for
    monkeypatch.setattr(
        builder, "cache_options", lambda config: dict(reversed(cache_options(config).items()))
    )
    assert builder.builder_config(data).name == name

    digests = {dataset: builder._schema_digest(dataset) for dataset in builder.DATASETS}
    # Each dataset's own features (the phantom's are semiseg's: image, masks, class mask and id).
    assert digests["synthetic"] == digests["semiseg"] and len(set(digests.values())) == 3
    monkeypatch.setattr(
        builder,
        "features_for",
        lambda dataset: tfds.features.FeaturesDict(dict(reversed(features_for(dataset).items()))),
    )
    assert {dataset: builder._schema_digest(dataset) for dataset in builder.DATASETS} == digests


def test_the_builder_config_holds_tuples_and_a_sorted_description_of_its_options(tmp_path):
    config = builder.builder_config(phantom(tmp_path))
    assert config.synthetic_sizes == (4, 2, 2)  # a tuple: the dataclass field's type
    assert (config.dataset, config.synthetic_image_size) == ("synthetic", 8)
    description = json.loads(config.description)
    assert description == {"dataset": "synthetic", "synthetic_image_size": 8, "synthetic_sizes": [4, 2, 2]}
    assert list(description) == sorted(description)  # the options are listed otherwise
    ma2020 = make_ma2020(tmp_path / "ma")
    config = builder.builder_config(data_config(tmp_path, "ma2020_2d", ma2020))
    assert config.split_fractions == (0.6, 0.2, 0.2)
    assert json.loads(config.description)["fingerprint"] == readers.fingerprint(ma2020)


# --- Reading ------------------------------------------------------------------------------------------------


def test_slices_are_yielded_in_order_reading_at_most_32_ahead():
    taken = []

    def items():
        for item in range(100):
            taken.append(item)
            yield item

    def square_slowly_for_early_items(item):
        # Early items finish after later ones: a result yielded as soon as it is ready would be out of order.
        time.sleep(0.02 if item < 4 else 0)
        return item * item

    results = builder._map_in_order(square_slowly_for_early_items, items())
    assert next(results) == 0
    assert len(taken) == 32  # a bounded read-ahead: the pool's 1,600 slices are never all in memory
    assert list(results) == [item * item for item in range(1, 100)]


def slice_files(folder, example_id, image_shape, mask_shape, extra_shape, class_palette):
    """A slice's image, {0,255} mask and class (palette) or lung ({0,255}) mask of the given shapes."""
    files = layouts.SliceFiles(
        example_id,
        folder / f"{example_id}.png",
        folder / f"{example_id}_mask.png",
        folder / f"{example_id}_extra.png",
    )
    save_png(files.image, np.full(image_shape, 90, np.uint8))
    save_png(files.mask, np.zeros(mask_shape, np.uint8))
    save_png(files.extra_mask, np.zeros(extra_shape, np.uint8), palette=class_palette)
    return files


@pytest.mark.parametrize(
    "read, class_palette", [(builder._read_semiseg, True), (builder._read_ma2020, False)]
)
def test_a_mask_of_another_size_names_the_mask_and_its_image(tmp_path, read, class_palette):
    files = slice_files(tmp_path, "7", (16, 12), (16, 10), (16, 12), class_palette)
    assert (
        refusal(read, files) == f"{files.mask}: size (10, 16) differs from its image {files.image} ((12, 16))"
    )
    files = slice_files(tmp_path, "8", (16, 12), (16, 12), (8, 12), class_palette)
    assert refusal(read, files) == (
        f"{files.extra_mask}: size (12, 8) differs from its image {files.image} ((12, 16))"
    )


def test_ma2020_index_is_the_numeric_id_or_minus_one(tmp_path):
    _, record = builder._read_ma2020(slice_files(tmp_path, "0012", (4, 4), (4, 4), (4, 4), False))
    assert record["index"] == 12
    example_id, record = builder._read_ma2020(slice_files(tmp_path, "a7", (4, 4), (4, 4), (4, 4), False))
    assert (example_id, record["id"], record["index"]) == ("a7", "a7", -1)


def test_unlabelled_records_have_uint8_zero_masks_whatever_the_image_type():
    image = np.full((3, 4), 0.5, np.float32)
    record = builder._without_labels(image, "volume1-12")
    assert record["image"] is image and record["id"] == "volume1-12"
    for key in ("mask", "class_mask"):
        assert record[key].dtype == np.uint8 and record[key].shape == (3, 4) and not record[key].any()


def split_ids(builder_config, data_dir) -> dict:
    """The example ids of each split the builder's generators yield (nothing written)."""
    made = builder.CovidCtSlices(config=builder_config, data_dir=str(data_dir), file_format="array_record")
    return {split: [key for key, _ in examples] for split, examples in made._split_generators(None).items()}


def test_ma2020_random_splits_follow_the_configured_seed(tmp_path):
    root = make_ma2020(tmp_path / "ma")

    def ids(seed, data_dir):
        return split_ids(
            builder.builder_config(data_config(tmp_path, "ma2020_2d", root, split_seed=seed)), data_dir
        )

    first = ids(0, tmp_path / "one")
    assert sorted(sum(first.values(), [])) == [f"{index:04d}" for index in range(10)]
    assert ids(0, tmp_path / "two") == first  # a fresh builder, not a reused cache
    assert ids(1, tmp_path / "three") != first


def test_too_few_ma2020_slices_to_split_is_one_line(tmp_path):
    config = builder.builder_config(data_config(tmp_path, "ma2020_2d", make_ma2020(tmp_path / "ma", count=2)))
    assert refusal(split_ids, config, tmp_path / "tfds") == (
        "data.split_fractions: 2 slices leave split(s) ['validation', 'test'] empty; at least 3 are needed"
    )


def nifti_pair(folder, case_id, shape, mask_shape=None) -> layouts.NiftiCase:
    """A case of zeros: image (int16) and mask (uint8) volumes."""
    image = save_nifti(folder / f"{case_id}_image.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    mask = save_nifti(folder / f"{case_id}_mask.nii.gz", np.zeros(mask_shape or shape, np.uint8), np.eye(4))
    return layouts.NiftiCase(case_id, image, mask)


def test_stacks_of_unrelated_slices_are_split_slice_by_slice_across_every_stack(tmp_path):
    cases = [
        layouts.NiftiCase(case.case_id, case.image, case.mask, independent_slices=True)
        for case in (nifti_pair(tmp_path, "a", (4, 4, 3)), nifti_pair(tmp_path, "b", (4, 4, 2)))
    ]
    config = builder.CovidCtConfig(name="nifti-0", dataset="nifti", split_scheme="blocks")
    generators = builder._nifti_split_generators(cases, config)
    ids = {split: [key for key, _ in examples] for split, examples in generators.items()}
    assert ids == {"train": ["a-0000", "a-0001", "a-0002"], "validation": ["b-0000"], "test": ["b-0001"]}


def test_nifti_random_splits_follow_the_configured_seed(tmp_path):
    cases = [nifti_pair(tmp_path, f"case{index}", (4, 4, 1)) for index in range(10)]

    def ids(seed):
        config = builder.CovidCtConfig(name="nifti-0", dataset="nifti", split_seed=seed)
        generators = builder._nifti_split_generators(cases, config)
        return {split: [key for key, _ in examples] for split, examples in generators.items()}

    first = ids(0)
    assert sorted(sum(first.values(), [])) == sorted(f"case{index}-0000" for index in range(10))
    assert ids(0) == first
    assert ids(1) != first


def test_too_few_nifti_cases_to_split_is_one_line(tmp_path):
    cases = [nifti_pair(tmp_path, "a", (4, 4, 3)), nifti_pair(tmp_path, "b", (4, 4, 3))]
    config = builder.CovidCtConfig(name="nifti-0", dataset="nifti")
    assert refusal(builder._nifti_split_generators, cases, config) == (
        "data.split_fractions: 2 cases leave split(s) ['validation', 'test'] empty; at least 3 are needed"
    )


def test_slice_counts_come_from_the_header_and_bad_volumes_are_one_line(tmp_path):
    assert builder._nifti_slice_count(save_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 7), np.int16))) == 7
    four_d = save_nifti(tmp_path / "b.nii.gz", np.zeros((2, 3, 4, 5), np.int16))
    assert refusal(builder._nifti_slice_count, four_d) == (
        f"{four_d}: expected a 3-D volume (x, y, slices), got an array of shape (2, 3, 4, 5)"
    )
    corrupt = tmp_path / "c.nii.gz"
    corrupt.write_bytes(b"not a volume" * 40)
    with pytest.raises(Exception) as nibabel_error:  # the trusted reader's own words
        nibabel.load(corrupt)
    error = nibabel_error.value
    assert refusal(builder._nifti_slice_count, corrupt) == (
        f"{corrupt}: corrupt or unreadable NIfTI file ({type(error).__name__}: {error})"
    )


def test_a_nifti_mask_of_another_shape_names_the_mask_and_its_image(tmp_path):
    case = nifti_pair(tmp_path, "a", (4, 4, 3), mask_shape=(4, 4, 2))
    assert refusal(builder._read_nifti_case, case, "voxel") == (
        f"{case.mask}: shape (4, 4, 2) differs from its image {case.image} ((4, 4, 3))"
    )


# --- Preparing ----------------------------------------------------------------------------------------------


def test_prepare_builds_into_data_dir_once_and_records_what_it_was_built_from(tmp_path, capsys):
    data = phantom(tmp_path)
    prepared = builder.prepare(data)
    name = builder.builder_config(data).name
    assert prepared.data_path == tmp_path / "tfds" / "covid_ct_slices" / name / "1.1.0"
    assert f"preparing dataset {name} in {prepared.data_path}\n" in capsys.readouterr().out
    info = json.loads((prepared.data_path / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    assert info["description"] == builder.__doc__.strip()
    assert json.loads(info["configDescription"]) == builder.cache_options(data)
    assert builder.prepare(data).data_path == prepared.data_path
    assert "preparing" not in capsys.readouterr().out  # the second call reuses the build


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    data = phantom(tmp_path)
    (tmp_path / "tfds").write_text("")
    assert refusal(builder.prepare, data) == f"data.data_dir: {tmp_path / 'tfds'} is a file, not a folder"


def test_only_an_empty_config_folder_is_removed_after_a_failed_build(tmp_path):
    builder._remove_if_empty(tmp_path / "never-made")  # nothing there: nothing to do
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "other-version").mkdir()
    builder._remove_if_empty(kept)
    assert (kept / "other-version").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    builder._remove_if_empty(empty)
    assert not empty.exists()


def test_a_data_dir_kept_inside_the_manual_dir_is_built_once(tmp_path):
    semiseg = make_semiseg(tmp_path / "semiseg")
    data = data_config(tmp_path, "semiseg", semiseg)
    data.data_dir = str(semiseg / "prepared")
    first = builder.prepare(data).data_path
    assert first.is_relative_to(semiseg / "prepared")
    assert builder.prepare(data).data_path == first  # the build itself changed nothing that is read
    built = [
        path
        for path in (semiseg / "prepared" / "covid_ct_slices").iterdir()
        if path.name.startswith("semiseg-")
    ]
    assert len(built) == 1


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    semiseg = make_semiseg(tmp_path / "semiseg")
    (tmp_path / "afile").write_text("x")
    data = data_config(tmp_path, "semiseg", semiseg)
    data.data_dir = str(tmp_path / "afile" / "cache")
    assert refusal(builder.prepare, data) == f"data.data_dir: {tmp_path / 'afile'} is a file, not a folder"
