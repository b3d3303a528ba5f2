"""The TFDS builder on small files written here: layouts, splits, NIfTI, cache keys and every bad input."""

import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import nibabel
import numpy as np
import pytest
from helpers import (
    DOCTOR_LABEL,
    MULTICLASS,
    data_config,
    lesion_slice,
    make_ma2020,
    make_semiseg,
    refusal,
    save_png,
    write_pseudo_label_folder,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rdunet_jax import config_lib, config_validation, datasets, heads, input_pipeline, involvement
from rdunet_jax.datasets import builder, pseudo_labels, synthetic
from rdunet_jax.datasets import labels as class_labels
from rdunet_jax.errors import UserError


def save_nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(
        nibabel.Nifti1Image(array, np.diag([0.7, 0.7, 5.0, 1.0]) if affine is None else affine), path
    )


def nifti_case(seed, shape=(12, 10, 3)):
    """Hounsfield-unit volume and label volume {0,1,2,3}."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 400, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[3:6, 2:5, :] = 1
    labels[7:9, 6:8, 1] = 2
    labels[0, 0, 0] = 3
    return volume, labels


def make_nifti(root, cases=("a", "b", "c", "d")):
    """Generic <case>_image/_mask pairs."""
    for seed, case in enumerate(cases):
        volume, labels = nifti_case(seed)
        save_nifti(root / f"{case}_image.nii.gz", volume)
        save_nifti(root / f"{case}_mask.nii.gz", labels)
    return root


def assert_no_dataset_left(tmp_path):
    """Nothing in the data_dir loads as a prepared dataset, and no half-written folder remains."""
    data_dir = tmp_path / "tfds"
    assert not list(data_dir.rglob("dataset_info.json"))
    assert not [path for path in data_dir.rglob("*") if path.name.startswith("incomplete")]


def test_synthetic_goes_through_the_builder_and_matches_its_source(tmp_path):
    data = data_config(tmp_path, "synthetic", num_train=16, num_validation=2, num_test=1, image_size=32)
    source = datasets.load_source(data, "train")
    assert len(source) == 16
    expected = synthetic.SyntheticSource("train", 16, 32)[7]
    record = source[7]
    assert record["id"] == expected["id"] == "phantom-train-00007"
    for key in ("image", "mask", "class_mask"):
        np.testing.assert_array_equal(record[key], expected[key])
    # A test split of one slice is there (evaluation would otherwise score the validation split).
    assert datasets.has_split(data, "test") and not datasets.has_split(data, "train_full")
    with pytest.raises(UserError, match="train_full"):
        datasets.load_source(data, "train_full")


def test_semiseg_splits_and_features(tmp_path):
    data = data_config(tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"))
    sizes = {split: len(datasets.load_source(data, split)) for split in ("train", "validation", "train_full")}
    assert sizes == {"train": 4, "validation": 2, "train_full": 6}
    assert not datasets.has_split(data, "test")  # no Dataset/TestingSet
    record = datasets.load_source(data, "validation")[0]
    assert record["id"] == "4" and isinstance(record["id"], str)
    assert record["image"].shape == (24, 20) and record["image"].dtype == np.uint8
    _, class_mask = lesion_slice(4)
    np.testing.assert_array_equal(record["class_mask"], class_mask)
    np.testing.assert_array_equal(record["mask"], (class_mask > 0).astype(np.uint8))


def test_semiseg_reads_the_testing_set_when_present(tmp_path):
    root = make_semiseg(tmp_path / "semiseg")
    testing = root / "Dataset/TestingSet"
    for example_id in ("100", "101", "102"):
        image, class_mask = lesion_slice(int(example_id), 30, 26)
        save_png(testing / "LungInfection-Test/Imgs" / f"{example_id}.png", image)
        save_png(
            testing / "LungInfection-Test/GT" / f"{example_id}.png", (class_mask > 0).astype(np.uint8) * 255
        )
        save_png(testing / "MultiClassInfection-Test/GT" / f"{example_id}.png", class_mask, palette=True)
    data = data_config(tmp_path, "semiseg", root)
    test = datasets.load_source(data, "test")
    assert [test[i]["id"] for i in range(len(test))] == ["100", "101", "102"]
    assert test[0]["image"].shape == (30, 26)


@pytest.mark.parametrize("scheme", ["random", "blocks"])
def test_ma2020_splits_partition_the_slices(tmp_path, scheme):
    data = data_config(tmp_path, "ma2020_2d", make_ma2020(tmp_path / "ma"), split_scheme=scheme)
    ids = {
        split: [r["id"] for r in datasets.load_source(data, split)]
        for split in ("train", "validation", "test")
    }
    assert [len(ids[split]) for split in ("train", "validation", "test")] == [6, 2, 2]
    assert sorted(sum(ids.values(), [])) == [f"{i:04d}" for i in range(10)]
    if scheme == "blocks":
        assert ids["train"] == [f"{i:04d}" for i in range(6)] and ids["test"] == ["0008", "0009"]
    record = datasets.load_source(data, "train")[0]
    assert set(np.unique(record["lung_mask"])) == {0, 1} and record["index"] == int(record["id"])


def test_ma2020_random_split_is_seeded(tmp_path):
    root = make_ma2020(tmp_path / "ma")

    def test_ids(seed):
        source = datasets.load_source(data_config(tmp_path, "ma2020_2d", root, split_seed=seed), "test")
        return [record["id"] for record in source]

    assert test_ids(0) == test_ids(0)
    assert test_ids(0) != test_ids(1) or test_ids(0) != test_ids(2)


def test_nifti_splits_by_case_and_keeps_hounsfield_units_and_geometry(tmp_path):
    root = make_nifti(tmp_path / "nifti", cases=("a", "b", "c", "d", "e"))
    data = data_config(tmp_path, "nifti", root, orientation="voxel")  # the stored order, unturned
    cases_by_split = {}
    for split in ("train", "validation", "test"):
        source = datasets.load_source(data, split)
        cases_by_split[split] = {record["case_id"] for record in source}
        assert len(source) == 3 * len(cases_by_split[split])  # every slice of a case in one split
    assert sorted(set().union(*cases_by_split.values())) == ["a", "b", "c", "d", "e"]
    assert sum(len(cases) for cases in cases_by_split.values()) == 5
    record = next(r for r in datasets.load_source(data, "train") if r["slice_index"] == 1)
    volume, labels = nifti_case("abcde".index(record["case_id"]))
    assert record["image"].dtype == np.float32
    np.testing.assert_array_equal(record["image"], volume[:, :, 1])
    np.testing.assert_array_equal(record["class_mask"], labels[:, :, 1])
    np.testing.assert_array_equal(
        record["mask"], np.isin(labels[:, :, 1], (1, 2))
    )  # effusion (3) is no lesion
    np.testing.assert_allclose(record["spacing"], (0.7, 0.7, 5.0))
    np.testing.assert_allclose(record["affine"], np.diag([0.7, 0.7, 5.0, 1.0]))
    assert tuple(record["volume_shape"]) == (12, 10, 3) and record["id"] == f"{record['case_id']}-0001"
    np.testing.assert_allclose(record["hu_window"], data.hu_window)


def test_nifti_reads_medseg_and_ma_layouts(tmp_path):
    root = tmp_path / "nifti"
    stack, stack_labels = nifti_case(0, shape=(12, 10, 5))
    save_nifti(root / "tr_im.nii.gz", stack)
    save_nifti(root / "tr_mask.nii.gz", stack_labels)
    volume, labels = nifti_case(1)
    save_nifti(root / "COVID-19-CT-Seg_20cases/coronacases_001.nii.gz", volume)
    save_nifti(root / "Infection_Mask/coronacases_001.nii.gz", (labels > 0).astype(np.uint8))
    data = data_config(tmp_path, "nifti", root)
    records = [r for split in ("train", "validation", "test") for r in datasets.load_source(data, split)]
    # The stack's slices are no volume: no case id (evaluation stacked them into one), named by their id.
    assert sorted({r["case_id"] for r in records}) == ["", "coronacases_001"]
    assert sorted(r["id"] for r in records if not r["case_id"]) == [f"medseg_tr-{i:04d}" for i in range(5)]
    assert len(records) == 5 + 3
    # MedSeg's stack holds unrelated slices: they are split one by one, into all three splits.
    splits_with_stack_slices = [
        split
        for split in ("train", "validation", "test")
        if any(r["id"].startswith("medseg_tr-") for r in datasets.load_source(data, split))
    ]
    assert len(splits_with_stack_slices) >= 2


def test_preprocess_windows_hounsfield_units():
    record = {
        "image": np.array([[-2000.0, -1350.0], [-600.0, 150.0]], np.float32),
        "mask": np.zeros((2, 2), np.uint8),
    }
    image = input_pipeline.preprocess(record, 2)["image"][..., 0]
    np.testing.assert_allclose(image, [[0.0, 0.0], [0.5, 1.0]])
    custom = input_pipeline.preprocess(record, 2, hu_window=(-1000.0, 0.0))["image"][..., 0]
    np.testing.assert_allclose(custom, [[0.0, 0.0], [0.4, 1.0]])


def test_unchanged_files_reuse_the_cache_and_changed_files_rebuild(tmp_path):
    root = make_ma2020(tmp_path / "ma")
    data = data_config(tmp_path, "ma2020_2d", root, split_scheme="blocks")
    first = builder.prepare(data)
    assert builder.prepare(data).data_path == first.data_path  # same files: same cache
    repaired = np.zeros((16, 16), np.uint8)
    repaired[1:3, 1:3] = 255
    save_png(root / "covid" / "0000.png", repaired)
    os.utime(root / "covid" / "0000.png", ns=(1, 1))  # a different time even on coarse-mtime filesystems
    second = builder.prepare(data)
    assert second.data_path != first.data_path
    np.testing.assert_array_equal(datasets.load_source(data, "train")[0]["mask"], repaired > 0)
    # Split options are part of the key too.
    data.split_scheme = "random"
    assert builder.prepare(data).data_path not in (first.data_path, second.data_path)


def test_failed_build_leaves_nothing_and_a_repaired_folder_builds(tmp_path):
    root = make_ma2020(tmp_path / "ma")
    good = (root / "ct/0007.png").read_bytes()
    (root / "ct/0007.png").write_bytes(good[: len(good) // 2])
    data = data_config(tmp_path, "ma2020_2d", root)
    with pytest.raises(UserError, match="0007.png"):
        datasets.load_source(data, "train")
    assert_no_dataset_left(tmp_path)
    (root / "ct/0007.png").write_bytes(good)
    assert len(datasets.load_source(data, "train")) == 6


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _garbage(path):
    path.write_bytes(b"this is not an image at all" * 10)


def _resize(path):
    Image.open(path).resize((11, 9), Image.Resampling.NEAREST).save(path)


def _unknown_binary_label(path):
    array = np.asarray(Image.open(path)).copy()
    array[0, 0] = 128
    save_png(path, array)


def _unknown_class_label(path):
    array = np.asarray(Image.open(path)).copy()
    array[0, 0] = 7
    save_png(path, array, palette=True)


def _rgba_mask(path):
    Image.open(path).convert("RGBA").save(path)


def _append_line(text):
    def append(path):
        path.write_text(path.read_text() + text)

    return append


BAD_2D_FILES = {
    "truncated jpeg": ("semiseg", DOCTOR_LABEL / "Imgs/2.jpg", _truncate, "corrupt or truncated"),
    "corrupt png": ("ma2020_2d", "ct/0003.png", _garbage, "corrupt or truncated"),
    "image and mask sizes differ": ("ma2020_2d", "covid/0004.png", _resize, "differs from its image"),
    "class mask size differs": ("semiseg", MULTICLASS / "GT/1.png", _resize, "differs from its image"),
    "binary mask value 128": (
        "ma2020_2d",
        "lungs/0002.png",
        _unknown_binary_label,
        "outside the known labels",
    ),
    "class mask value 7": (
        "semiseg",
        MULTICLASS / "GT/3.png",
        _unknown_class_label,
        "outside the known labels",
    ),
    "colour mask": ("semiseg", DOCTOR_LABEL / "GT/0.png", _rgba_mask, "single-channel"),
    "missing mask": ("ma2020_2d", "covid/0005.png", pathlib.Path.unlink, "file missing"),
    "split list names a missing id": (
        "semiseg",
        MULTICLASS / "train.txt",
        _append_line("99\n"),
        "has no file",
    ),
    "split list escapes the folder": (
        "semiseg",
        MULTICLASS / "val.txt",
        _append_line("../../../../../../etc/hostname\n"),
        "is a path, not an id",
    ),
    "split list names an absolute path": (
        "semiseg",
        MULTICLASS / "train.txt",
        _append_line("/etc/hostname\n"),
        "is a path, not an id",
    ),
    "split list id with '..' that stays inside": (
        "semiseg",
        MULTICLASS / "train.txt",
        _append_line("x/../1\n"),
        "is a path, not an id",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_2D_FILES))
def test_bad_2d_input_is_one_line_naming_the_file(tmp_path, case):
    name, relative, damage, problem = BAD_2D_FILES[case]
    make = make_semiseg if name == "semiseg" else make_ma2020
    root = make(tmp_path / "data")
    damage(root / relative)
    with pytest.raises(UserError) as error:
        datasets.load_source(data_config(tmp_path, name, root), "train")
    message = str(error.value)
    assert "\n" not in message and problem in message and pathlib.Path(relative).name in message
    assert_no_dataset_left(tmp_path)


def _nifti_shapes_differ(root):
    save_nifti(root / "b_mask.nii.gz", np.zeros((12, 10, 4), np.uint8))


def _nifti_affines_differ(root):
    save_nifti(root / "b_mask.nii.gz", nifti_case(1)[1], affine=np.diag([0.8, 0.7, 5.0, 1.0]))


def _nifti_4d(root):
    save_nifti(root / "b_image.nii.gz", np.zeros((12, 10, 3, 2), np.int16))


def _nifti_1d(root):
    save_nifti(root / "b_image.nii.gz", np.zeros((12,), np.int16))


def _nifti_2d(root):
    save_nifti(root / "b_mask.nii.gz", np.zeros((12, 10), np.uint8))


def _nifti_unknown_label(root):
    labels = nifti_case(1)[1]
    labels[1, 1, 1] = 9
    save_nifti(root / "b_mask.nii.gz", labels)


def _nifti_truncated(root):
    _truncate(root / "b_image.nii.gz")


def _nifti_missing_mask(root):
    (root / "b_mask.nii.gz").unlink()


BAD_NIFTI = {
    "shapes differ": (_nifti_shapes_differ, "b_mask.nii.gz", "differs from its image"),
    "affines differ": (_nifti_affines_differ, "b_mask.nii.gz", "affine differs"),
    "4-D volume": (_nifti_4d, "b_image.nii.gz", "expected a 3-D volume"),
    "1-D volume": (_nifti_1d, "b_image.nii.gz", "expected a 3-D volume"),
    "2-D mask": (_nifti_2d, "b_mask.nii.gz", "expected a 3-D volume"),
    "unknown label": (_nifti_unknown_label, "b_mask.nii.gz", "outside the known labels"),
    "truncated volume": (_nifti_truncated, "b_image.nii.gz", "corrupt or unreadable"),
    "missing mask": (_nifti_missing_mask, "b_mask.nii.gz", "file missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_NIFTI))
def test_bad_nifti_input_is_one_line_naming_the_file(tmp_path, case):
    damage, file_name, problem = BAD_NIFTI[case]
    root = make_nifti(tmp_path / "nifti")
    damage(root)
    with pytest.raises(UserError) as error:
        datasets.load_source(data_config(tmp_path, "nifti", root), "train")
    message = str(error.value)
    assert "\n" not in message and problem in message and file_name in message
    assert_no_dataset_left(tmp_path)


SOURCES = {
    "semiseg": ("Doctor-label/{Imgs,GT}", "COVID-SemiSeg", "medicalsegmentation.com/covid19"),
    "ma2020_2d": ("ct/NNNN.png", "zenodo.org/record/3757476"),
    "nifti": ("tr_im.nii.gz", "medicalsegmentation.com/covid19", "zenodo.org/record/3757476"),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("state", ["unset", "missing", "empty"])
def test_missing_manual_dir_names_layout_source_and_config_key(tmp_path, name, state):
    manual_dir = {"unset": "", "missing": tmp_path / "nowhere", "empty": tmp_path / "empty"}[state]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as error:
        datasets.load_source(data_config(tmp_path, name, manual_dir), "train")
    message = str(error.value)
    assert "\n" not in message and "data.manual_dir" in message
    for expected in SOURCES[name]:
        assert expected in message


@pytest.mark.parametrize(
    "name, make, folder",
    [("ma2020_2d", make_ma2020, "covid"), ("semiseg", make_semiseg, DOCTOR_LABEL / "GT")],
)
def test_missing_or_empty_subfolder(tmp_path, name, make, folder):
    root = make(tmp_path / "data")
    for path in (root / folder).iterdir():
        path.unlink()
    with pytest.raises(UserError, match="folder is empty"):
        datasets.load_source(data_config(tmp_path, name, root), "train")
    (root / folder).rmdir()
    with pytest.raises(UserError, match="missing folder"):
        datasets.load_source(data_config(tmp_path, name, root), "train")
    assert_no_dataset_left(tmp_path)


def test_too_few_nifti_cases_to_split(tmp_path):
    data = data_config(tmp_path, "nifti", make_nifti(tmp_path / "nifti", cases=("a", "b")))
    with pytest.raises(UserError, match="at least 3"):
        datasets.load_source(data, "train")


@pytest.mark.parametrize(
    "key, value",
    [
        ("split_scheme", "volumes"),
        ("split_fractions", (0.5, 0.5)),
        ("split_fractions", (0.6, 0.3, 0.3)),
        ("split_seed", -1),
        ("hu_window", (100.0, -100.0)),
    ],
)
def test_config_validation_of_data_keys(key, value):
    config = config_lib.base_config()
    config.data[key] = value
    with pytest.raises(UserError, match=f"data.{key}"):
        config_validation.validate(config)


def test_cli_exits_2_with_one_line_for_a_corrupt_file(tmp_path):
    root = make_ma2020(tmp_path / "ma")
    _garbage(root / "lungs/0001.png")
    command = [
        sys.executable, "-m", "rdunet_jax.main", "--config", "configs/rdunet.py",
        f"--config.data.manual_dir={root}", f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "lungs/0001.png" in last_line and "corrupt" in last_line
    assert_no_dataset_left(tmp_path)


# --- fuzz: malformed files ------------------------------------------------------------------------

CORRUPTIBLE = [
    DOCTOR_LABEL / "Imgs" / "1.jpg",
    DOCTOR_LABEL / "GT" / "1.png",
    MULTICLASS / "GT" / "1.png",
    MULTICLASS / "train.txt",
]


def _corrupt(path: pathlib.Path, how: str, data) -> None:
    """Damages one file the way real files get damaged: cut short, overwritten, resized, mislabelled."""
    content = path.read_bytes()
    if how == "truncate":
        path.write_bytes(content[: data.draw(st.integers(0, len(content) - 1), label="length")])
    elif how == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
    elif how == "resize":
        image = Image.open(path)
        image.resize((image.width + data.draw(st.integers(1, 5), label="grow"), image.height)).save(path)
    elif how == "labels":
        array = np.asarray(Image.open(path)).copy()
        array[0, 0] = data.draw(st.integers(3, 254), label="label")
        Image.fromarray(array).save(path)
    else:  # a split list naming something outside its folder or missing
        line = data.draw(st.sampled_from(["../1", "/etc/passwd", "99", "1/../../x", ""]), label="line")
        path.write_text(content.decode() + line + "\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_malformed_files_end_in_one_line_naming_the_file(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    root = make_semiseg(tmp_path / "manual")
    target = data.draw(st.sampled_from(CORRUPTIBLE), label="file")
    ways = {".txt": ["truncate", "garbage", "list"], ".jpg": ["truncate", "garbage", "resize"]}
    how = data.draw(st.sampled_from(ways.get(target.suffix, ["truncate", "garbage", "resize", "labels"])))
    _corrupt(root / target, how, data)
    config = data_config(tmp_path, "semiseg", root)
    try:
        source = datasets.load_source(config, "train")
    except UserError as error:
        message = str(error)
        assert "\n" not in message
        assert target.name in message or target.parent.name in message, message
        assert_no_dataset_left(tmp_path)
    else:
        # Some damage leaves a file readable (a list cut short or naming an existing id, a JPEG cut in
        # its tail padding): then every slice the list names is there and intact.
        assert 1 <= len(source) <= 4
        for index in range(len(source)):
            assert set(np.unique(source[index]["mask"])) <= {0, 1}


# --- cross-validation folds ------------------------------------------------------------------------------


def _ids(source) -> list[str]:
    return [source[index]["id"] for index in range(len(source))]


def test_cross_validation_folds_partition_the_ids_and_depend_only_on_the_seed():
    ids = [f"slice-{index:02d}" for index in range(23)]
    folds = datasets.cross_validation_folds(ids, 5, seed=3)
    assert sorted(len(fold) for fold in folds) == [4, 4, 5, 5, 5]
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    # Same seed, same folds, whatever the record order; another seed, other folds.
    reversed_folds = datasets.cross_validation_folds(ids[::-1], 5, seed=3)
    as_ids = [sorted(ids[i] for i in fold) for fold in folds]
    assert as_ids == [sorted(ids[::-1][i] for i in fold) for fold in reversed_folds]
    other = datasets.cross_validation_folds(ids, 5, seed=4)
    assert as_ids != [sorted(ids[i] for i in fold) for fold in other]
    assert refusal(datasets.cross_validation_folds, ids[:3], 5, 0) == (
        "data.cv_folds: 5 folds need at least as many slices, the pool has 3"
    )
    # Leave one out: as many folds as slices.
    assert sorted(len(fold) for fold in datasets.cross_validation_folds(ids[:5], 5, seed=0)) == [1] * 5
    assert refusal(datasets.cross_validation_folds, ["a", "a", "b"], 2, 0) == (
        "data.cv_folds: the cross-validation pool has duplicate ids"
    )


def test_semiseg_cross_validation_folds_partition_train_full(tmp_path):
    root = make_semiseg(tmp_path / "semiseg", ids=range(11), validation=(9, 10))
    validation_ids, train_ids = [], []
    for fold in range(3):
        data = data_config(tmp_path, "semiseg", root, cv_folds=3, cv_fold=fold, cv_seed=7)
        held_out, rest = (
            _ids(datasets.load_source(data, "validation")),
            _ids(datasets.load_source(data, "train")),
        )
        assert not set(held_out) & set(rest)
        assert sorted(held_out + rest, key=int) == [str(i) for i in range(11)]
        validation_ids.append(held_out)
        train_ids.append(rest)
        record = datasets.load_source(data, "validation")[0]
        assert record["image"].shape == (24, 20) and set(record) >= {"image", "mask", "class_mask", "id"}
    assert sorted(sum(validation_ids, []), key=int) == [str(i) for i in range(11)]
    assert sorted(len(ids) for ids in validation_ids) == [3, 4, 4]
    again = data_config(tmp_path, "semiseg", root, cv_folds=3, cv_fold=1, cv_seed=7)
    assert _ids(datasets.load_source(again, "validation")) == validation_ids[1]
    with pytest.raises(UserError, match="train_full"):
        datasets.load_source(again, "train_full")
    # A caller that skips config validation (an experiments script) still gets the fold checked.
    for fold in (3, -1):
        outside = data_config(tmp_path, "semiseg", root, cv_folds=3, cv_fold=fold, cv_seed=7)
        assert refusal(datasets.load_source, outside, "validation") == (
            f"data.cv_fold: must be an integer in [0, 2], got {fold}"
        )
    # Another pool in the same process (its ids cached by its own folder) has its own folds.
    other_root = make_semiseg(tmp_path / "other", ids=range(100, 106), validation=(105,))
    other = data_config(tmp_path, "semiseg", other_root, cv_folds=3, cv_fold=0, cv_seed=7)
    other_ids = _ids(datasets.load_source(other, "validation")) + _ids(datasets.load_source(other, "train"))
    assert sorted(other_ids, key=int) == [str(i) for i in range(100, 106)]


def test_ma2020_cross_validation_pools_train_and_validation_and_keeps_test(tmp_path):
    root = make_ma2020(tmp_path / "ma")
    plain = data_config(tmp_path, "ma2020_2d", root)
    pool = _ids(datasets.load_source(plain, "train")) + _ids(datasets.load_source(plain, "validation"))
    data = data_config(tmp_path, "ma2020_2d", root, cv_folds=4, cv_fold=2)
    held_out, rest = _ids(datasets.load_source(data, "validation")), _ids(datasets.load_source(data, "train"))
    assert sorted(held_out + rest) == sorted(pool) and len(held_out) == 2
    assert _ids(datasets.load_source(data, "test")) == _ids(datasets.load_source(plain, "test"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"cv_folds": 1}, "data.cv_folds"),
        ({"cv_folds": -2}, "data.cv_folds"),
        ({"cv_folds": 5, "cv_fold": 5}, "data.cv_fold"),
        ({"cv_folds": 5, "cv_fold": -1}, "data.cv_fold"),
        ({"cv_fold": -1}, "data.cv_fold"),
        ({"cv_seed": -1}, "data.cv_seed"),
        ({"cv_folds": 5, "train_split": "train_full"}, "data.train_split"),
    ],
)
def test_config_validation_of_cross_validation_keys(overrides, key):
    config = config_lib.base_config()
    config.data.update(overrides)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config_validation.validate(config)


def test_cross_validation_keys_accept_valid_values():
    config = config_lib.base_config()
    config.data.update(cv_folds=5, cv_fold=4, cv_seed=11)
    config_validation.validate(config)


# One volume (x toward the patient's right, y anterior, z superior; 0.6 x 0.8 x 5 mm) stored four ways:
# (voxel array, affine) as RAS, LPS (both in-plane axes flipped), with x and y swapped, and with the
# slices stored inferior-first. The affines are written out by hand, not by nibabel's reorientation.
ORIENTED_SHAPE = (12, 10, 3)


def _stored_orientations(volume):
    nx, ny, nz = volume.shape
    return {
        "ras": (volume, np.diag([0.6, 0.8, 5.0, 1.0])),
        "lps": (
            volume[::-1, ::-1, :],
            np.array(
                [[-0.6, 0, 0, 0.6 * (nx - 1)], [0, -0.8, 0, 0.8 * (ny - 1)], [0, 0, 5, 0], [0, 0, 0, 1]]
            ),
        ),
        "swapped": (
            volume.transpose(1, 0, 2),
            np.array([[0, 0.6, 0, 0], [0.8, 0, 0, 0], [0, 0, 5, 0], [0, 0, 0, 1]]),
        ),
        "inferior": (
            volume[:, :, ::-1],
            np.array([[0.6, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, -5, 5 * (nz - 1)], [0, 0, 0, 1]]),
        ),
    }


def _oriented_nifti(root):
    """The four stored orientations of one volume and its labels as <case>_image/_mask pairs."""
    volume, labels = nifti_case(7, ORIENTED_SHAPE)
    for case, (stored, affine) in _stored_orientations(volume).items():
        save_nifti(root / f"{case}_image.nii.gz", np.ascontiguousarray(stored), affine=affine)
    for case, (stored, affine) in _stored_orientations(labels).items():
        save_nifti(root / f"{case}_mask.nii.gz", np.ascontiguousarray(stored), affine=affine)
    return root, volume, labels


def test_nifti_volumes_in_any_stored_orientation_give_the_same_training_slices(tmp_path):
    root, volume, labels = _oriented_nifti(tmp_path / "nifti")
    data = data_config(tmp_path, "nifti", root)  # auto: radiological display, PL
    records = [r for split in ("train", "validation", "test") for r in datasets.load_source(data, split)]
    by_case = {}
    for record in records:
        by_case.setdefault(record["case_id"], {})[int(record["slice_index"])] = record
    assert sorted(by_case) == ["inferior", "lps", "ras", "swapped"]
    for case, slices in by_case.items():
        assert sorted(slices) == [0, 1, 2], case
        for index, record in slices.items():
            # Stored index k of the inferior-first copy is the RAS copy's slice 2 - k.
            ras_index = 2 - index if case == "inferior" else index
            # By hand: PL rows run anterior to posterior (y descending), columns right to left (x descending).
            np.testing.assert_array_equal(record["image"], volume[::-1, ::-1, ras_index].T, err_msg=case)
            np.testing.assert_array_equal(record["class_mask"], labels[::-1, ::-1, ras_index].T, err_msg=case)
            np.testing.assert_allclose(record["spacing"], (0.8, 0.6, 5.0))
            assert tuple(record["volume_shape"]) == (10, 12, 3)
            # The recorded affine puts every turned voxel where the RAS copy has it in the world.
            rows, columns = np.meshgrid(*(np.arange(n) for n in record["image"].shape), indexing="ij")
            turned = np.stack([rows.ravel(), columns.ravel(), np.full(rows.size, index), np.ones(rows.size)])
            ras_voxels = np.rint(np.linalg.inv(np.diag([0.6, 0.8, 5.0, 1.0])) @ record["affine"] @ turned)
            x, y, z = ras_voxels[:3].astype(int)
            np.testing.assert_array_equal(record["image"].ravel(), volume[x, y, z], err_msg=case)


def test_nifti_orientation_is_part_of_the_prepared_dataset_key(tmp_path):
    root, volume, _ = _oriented_nifti(tmp_path / "nifti")
    display = builder.prepare(data_config(tmp_path, "nifti", root)).data_path
    assert builder.prepare(data_config(tmp_path, "nifti", root, orientation="PL")).data_path == display
    voxel_data = data_config(tmp_path, "nifti", root, orientation="voxel")
    assert builder.prepare(voxel_data).data_path != display
    record = next(
        r
        for split in ("train", "validation", "test")
        for r in datasets.load_source(voxel_data, split)
        if r["case_id"] == "lps" and r["slice_index"] == 0
    )
    np.testing.assert_array_equal(record["image"], volume[::-1, ::-1, 0])  # as stored


def test_a_medseg_stack_resliced_by_its_affine_is_refused(tmp_path):
    root = tmp_path / "nifti"
    stack, stack_labels = nifti_case(0, shape=(12, 10, 5))
    sagittal = np.array([[0, 0, 5.0, 0], [0, 0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 runs S-I
    save_nifti(root / "tr_im.nii.gz", stack, affine=sagittal)
    save_nifti(root / "tr_mask.nii.gz", stack_labels, affine=sagittal)
    with pytest.raises(
        UserError, match=r"tr_im.nii.gz: a stack of unrelated slices.*data.orientation='voxel'"
    ):
        datasets.load_source(data_config(tmp_path, "nifti", root), "train")
    assert_no_dataset_left(tmp_path)
    assert len(datasets.load_source(data_config(tmp_path, "nifti", root, orientation="voxel"), "train")) > 0


# --- Class labels for the multi-class heads -------------------------------------------------------------


def labelled(source, data, head):
    return [class_labels.LabelledSource(source, data, head)[index] for index in range(len(source))]


def test_semiseg_labels_are_the_palette_classes_as_a_map_or_as_channels(tmp_path):
    data = data_config(
        tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"), classes=("ggo", "consolidation")
    )
    source = datasets.load_source(data, "train_full")
    for head in ("exclusive", "multilabel"):
        for record in labelled(source, data, head):
            _, class_mask = lesion_slice(int(record["id"]))
            if head == "exclusive":
                np.testing.assert_array_equal(record["labels"], class_mask)
            else:
                assert record["labels"].shape == (24, 20, 2)
                np.testing.assert_array_equal(record["labels"][..., 0], class_mask == 1)
                np.testing.assert_array_equal(record["labels"][..., 1], class_mask == 2)
    binary = class_labels.LabelledSource(source, data, "binary")[0]
    assert "labels" not in binary and set(binary) == set(source[0])


def test_ma2020_labels_are_lungs_and_infection(tmp_path):
    data = data_config(tmp_path, "ma2020_2d", make_ma2020(tmp_path / "ma"), classes=("lungs", "infection"))
    source = datasets.load_source(data, "train")
    record = source[0]
    _, class_mask = lesion_slice(int(record["id"]), 16, 16)
    lungs = np.zeros((16, 16), bool)
    lungs[2:15, 2:14] = True
    channels = class_labels.LabelledSource(source, data, "multilabel")[0]["labels"]
    np.testing.assert_array_equal(channels[..., 0], lungs)
    np.testing.assert_array_equal(channels[..., 1], class_mask > 0)
    # As one label map infection takes precedence over the lungs around it.
    label_map = class_labels.LabelledSource(source, data, "exclusive")[0]["labels"]
    np.testing.assert_array_equal(label_map, np.where(class_mask > 0, 2, np.where(lungs, 1, 0)))


def test_a_dataset_with_fixed_classes_refuses_another_number_of_names(tmp_path):
    data = data_config(tmp_path, "semiseg", "", classes=("ggo", "consolidation", "effusion"))
    with pytest.raises(
        UserError, match=r"^data.classes: data.name='semiseg' has 2 classes \['ggo', 'consolidation'\]"
    ):
        class_labels.check_classes(data, "exclusive")
    assert class_labels.check_classes(data, "binary") == ("ggo", "consolidation", "effusion")


def test_a_label_map_with_values_above_the_classes_is_refused_naming_the_record():
    record = {"id": "7", "image": np.zeros((4, 4), np.uint8), "mask": np.zeros((4, 4), np.uint8)}
    record["class_mask"] = np.array([[0, 1], [2, 3]], np.uint8)
    assert class_labels.with_labels(record, "nifti", "exclusive", ("a", "b", "c"))["labels"].max() == 3
    for head in ("exclusive", "multilabel"):
        with pytest.raises(UserError, match=r"^record 7.*label values \{3\} outside data.classes \(0..2\)$"):
            class_labels.with_labels(record, "nifti", head, ("a", "b"))


def test_a_nifti_label_maps_lungs_channel_holds_its_infection_as_ma2020s_does():
    # By hand: 1 is lung, 2 infection drawn over it; as channels the lungs are every lung pixel, 3 of 4,
    # and the involvement 1 of 3 (it was 0: the lungs channel was the value-1 pixels only).
    record = {"id": "1", "class_mask": np.array([[0, 1], [2, 1]], np.uint8)}
    channels = class_labels.with_labels(record, "nifti", "multilabel", ("lungs", "infection"))["labels"]
    assert channels[..., 0].tolist() == [[0, 1], [1, 1]] and channels[..., 1].tolist() == [[0, 0], [1, 0]]
    lungs, infection = heads.lungs_and_infection(channels > 0, "multilabel", ("lungs", "infection"))
    assert involvement.per_slice_percent(lungs[None], infection[None]).tolist() == [pytest.approx(100 / 3)]
    # Other names (and the exclusive head's label map) keep one class a pixel.
    other = class_labels.with_labels(record, "nifti", "multilabel", ("ggo", "consolidation"))["labels"]
    assert other[..., 0].tolist() == [[0, 1], [0, 1]]
    exclusive = class_labels.with_labels(record, "nifti", "exclusive", ("lungs", "infection"))["labels"]
    assert exclusive.tolist() == [[0, 1], [2, 1]]


def test_label_maps_and_channels_are_uint8_and_errors_name_the_dataset_record_and_values():
    # By hand: class values 0..3 of int64 input, as uint8 map and as one-hot channels 1..3.
    class_mask = np.array([[0, 1], [2, 3]], np.int64)
    record = {"class_mask": class_mask}
    label_map = class_labels.label_map(record, "nifti")
    assert label_map.dtype == np.uint8 and label_map.tolist() == [[0, 1], [2, 3]]
    channels = class_labels.label_channels(record, "nifti", ("a", "b", "c"))
    assert channels.dtype == np.uint8
    assert channels.tolist() == [[[0, 0, 0], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]]
    ma2020 = {"lung_mask": np.array([[0, 255], [255, 255]]), "mask": np.array([[0, 0], [0, 1]])}
    assert class_labels.label_map(ma2020, "ma2020_2d").dtype == np.uint8
    assert class_labels.label_channels(ma2020, "ma2020_2d", ("lungs", "infection")).dtype == np.uint8
    # A record without class labels, through either head, names the dataset; one without an id says "?".
    no_classes = {"mask": np.zeros((2, 2), np.uint8)}
    for head in ("exclusive", "multilabel"):
        with pytest.raises(UserError) as error:
            class_labels.with_labels(no_classes, "nifti", head, ("a", "b"))
        assert str(error.value) == "data.name='nifti': records have no class labels for a multi-class head"
    with pytest.raises(UserError, match="data.name='nifti': records have no class labels"):
        class_labels.label_channels(no_classes, "nifti", ("a", "b"))
    many = {"class_mask": np.arange(9, dtype=np.uint8).reshape(3, 3)}
    for head, where in (("exclusive", "record ? of data.name='nifti'"), ("multilabel", "record ?")):
        with pytest.raises(UserError) as error:
            class_labels.with_labels(many, "nifti", head, ("a", "b"))
        assert str(error.value) == f"{where}: label values {{3, 4, 5, 6, 7}} outside data.classes (0..2)"
    with pytest.raises(UserError) as error:
        class_labels.with_labels(record, "nifti", "softmax", ("a", "b", "c"))
    assert str(error.value) == "model.head: must be 'binary', 'exclusive' or 'multilabel', got 'softmax'"


def test_a_labelled_source_keeps_the_name_and_split_of_its_source_and_binary_heads_skip_it():
    data = config_lib.base_config().data
    data.name, data.classes = "nifti", ("ggo", "consolidation")
    records = [{"id": "0", "class_mask": np.zeros((2, 2), np.uint8)}]
    plain = class_labels.LabelledSource(records, data, "exclusive")
    assert (plain.name, plain.split) == ("nifti", None)

    class Split(list):
        name, split = "prepared", "validation"

    named = class_labels.LabelledSource(Split(records), data, "exclusive")
    assert (named.name, named.split) == ("prepared", "validation")
    # Without data.classes a config is binary: one class, "lesion".
    assert class_labels.check_classes(ml_collections.ConfigDict({"name": "semiseg"}), "binary") == ("lesion",)
    config = config_lib.base_config()
    config.data = data
    assert class_labels.for_head(records, config) is records  # the default head, binary
    with config.model.unlocked():
        del config.model["head"]  # a config saved before the multi-class heads is binary
    assert class_labels.for_head(records, config) is records
    with config.model.unlocked():
        config.model.head = "exclusive"
    assert class_labels.for_head(records, config)[0]["labels"].tolist() == [[0, 0], [0, 0]]


def test_nifti_label_maps_with_any_number_of_classes_named_by_the_config(tmp_path):
    root = make_nifti(tmp_path / "nifti")
    labels = nifti_case(1)[1]
    labels[9:11, 0:3, 2] = 5  # a fifth class in case b
    save_nifti(root / "b_mask.nii.gz", labels)
    names = ("ggo", "consolidation", "effusion", "nodule", "emphysema")
    data = data_config(tmp_path, "nifti", root, orientation="voxel", classes=names, split_scheme="blocks")
    train = datasets.load_source(data, "train")  # blocks: cases a and b train
    index = next(i for i, r in enumerate(train) if r["case_id"] == "b" and r["slice_index"] == 2)
    np.testing.assert_array_equal(train[index]["class_mask"], labels[:, :, 2])
    label_map = class_labels.LabelledSource(train, data, "exclusive")[index]["labels"]
    np.testing.assert_array_equal(label_map, labels[:, :, 2])
    assert label_map.max() == 5
    # Fewer configured classes than the files hold (case a has effusion, 3), or the binary default
    # (MedSeg's labels 0..3, case b has a 5): one line naming the file, nothing prepared.
    for classes, file_name, value in (
        (("ggo", "consolidation"), "a_mask.nii.gz", "3"),
        (("lesion",), "b_mask.nii.gz", "5"),
    ):
        other = data_config(tmp_path / str(len(classes)), "nifti", root, orientation="voxel", classes=classes)
        with pytest.raises(UserError) as error:
            datasets.load_source(other, "train")
        message = str(error.value)
        assert "\n" not in message and file_name in message and f"mask values {{{value}" in message
        assert "outside the known labels" in message
        assert_no_dataset_left(tmp_path / str(len(classes)))


def test_binary_configs_keep_their_prepared_dataset_key(tmp_path):
    root = make_nifti(tmp_path / "nifti")
    binary = data_config(tmp_path, "nifti", root)
    before_classes_existed = binary.copy_and_resolve_references()
    del before_classes_existed["classes"]
    assert builder.builder_config(binary).name == builder.builder_config(before_classes_existed).name
    multiclass = data_config(tmp_path, "nifti", root, classes=("ggo", "consolidation", "effusion"))
    assert builder.builder_config(multiclass).name != builder.builder_config(binary).name
    semiseg = data_config(tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"))
    semiseg_multiclass = data_config(
        tmp_path, "semiseg", tmp_path / "semiseg", classes=("ggo", "consolidation")
    )
    assert builder.builder_config(semiseg).name == builder.builder_config(semiseg_multiclass).name


def test_semiseg_test_labels_come_from_the_multiclass_testing_masks(tmp_path):
    root = make_semiseg(tmp_path / "semiseg")
    testing = root / "Dataset/TestingSet"
    written = {}
    for example_id in ("100", "101"):
        image, class_mask = lesion_slice(int(example_id), 30, 26)
        class_mask[20:25, 10:20] = 2  # a consolidation patch only the testing masks have
        written[example_id] = class_mask
        save_png(testing / "LungInfection-Test/Imgs" / f"{example_id}.png", image)
        save_png(
            testing / "LungInfection-Test/GT" / f"{example_id}.png", (class_mask > 0).astype(np.uint8) * 255
        )
        save_png(testing / "MultiClassInfection-Test/GT" / f"{example_id}.png", class_mask, palette=True)
    data = data_config(tmp_path, "semiseg", root, classes=("ggo", "consolidation"))
    test = class_labels.LabelledSource(datasets.load_source(data, "test"), data, "exclusive")
    for index in range(len(test)):
        np.testing.assert_array_equal(test[index]["labels"], written[test[index]["id"]])


UNLABELLED = pathlib.Path("Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs")


def test_semiseg_reads_the_unlabelled_pool_as_its_own_split_with_volume_case_ids(tmp_path):
    root = make_semiseg(tmp_path / "semiseg")
    data = data_config(tmp_path, "semiseg", root)
    assert not datasets.has_split(data, "unlabelled")  # the pool is optional
    names = {
        "Data-1_coronacases_org_001_10": 10,
        "Data-1_coronacases_org_001_2": 2,
        "Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_7": 7,
    }
    images = {}
    for name, seed in names.items():
        images[name], _ = lesion_slice(seed, 18, 22)
        save_png(root / UNLABELLED / f"{name}.png", images[name])  # PNG: lossless, compared exactly
    data = data_config(tmp_path / "second", "semiseg", root)
    pool = datasets.load_source(data, "unlabelled")
    records = [pool[index] for index in range(len(pool))]
    # Name order, slice numbers numerically within a volume (2 before 10).
    assert [record["id"] for record in records] == [
        "Data-1_coronacases_org_001_2",
        "Data-1_coronacases_org_001_10",
        "Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm_7",
    ]
    assert [record["case_id"] for record in records] == [
        "coronacases_org_001",
        "coronacases_org_001",
        "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm",
    ]
    for record in records:
        np.testing.assert_array_equal(record["image"], images[record["id"]])
        assert not record["mask"].any() and record["mask"].shape == record["image"].shape
    # The labelled splits are unchanged by the pool beside them.
    assert len(datasets.load_source(data, "train_full")) == 6


def test_phantom_unlabelled_split_is_the_phantom_of_its_own_seeds_without_masks(tmp_path):
    data = data_config(tmp_path, "synthetic", num_train=4, num_validation=2, num_test=2, image_size=32)
    assert not datasets.has_split(data, "unlabelled")
    data.num_unlabelled = 3
    pool = datasets.load_source(data, "unlabelled")
    assert len(pool) == 3
    expected = synthetic.SyntheticSource("unlabelled", 3, 32)[1]
    assert pool[1]["id"] == expected["id"] == "phantom-unlabelled-00001"
    np.testing.assert_array_equal(pool[1]["image"], expected["image"])
    assert expected["mask"].any() and not pool[1]["mask"].any()
    train = datasets.load_source(data, "train")[0]
    assert not np.array_equal(train["image"], pool[0]["image"])  # other seeds than the train split's


def test_joint_training_mixes_every_ma2020_slice_into_the_semiseg_training_split(tmp_path):
    from rdunet_jax.datasets import pseudo_labels

    data = data_config(tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"))
    data.extra_labelled_dir = str(make_ma2020(tmp_path / "ma2020"))
    source = datasets.load_source(data, "train")
    assert isinstance(source, pseudo_labels.MixedSource) and source.extra_fraction == 0.5
    assert [source[i]["id"] for i in range(len(source))] == ["0", "1", "2", "3"]  # the labelled split
    extra_ids = sorted(source.extra[i]["id"] for i in range(len(source.extra)))
    assert extra_ids == sorted(f"{i:04d}" for i in range(10))  # all ten, whatever split ma2020 put them in
    ma2020 = data_config(tmp_path, "ma2020_2d", tmp_path / "ma2020")
    by_id = {
        record["id"]: record
        for split in ("train", "validation", "test")
        for record in _records(ma2020, split)
    }
    for index in range(len(source.extra)):
        record = source.extra[index]
        np.testing.assert_array_equal(record["mask"], by_id[record["id"]]["mask"])
    assert len(datasets.load_source(data, "validation")) == 2  # validation is never mixed


def test_joint_training_keeps_only_the_ma2020_slices_with_enough_lesion(tmp_path, capsys):
    data = data_config(tmp_path, "semiseg", make_semiseg(tmp_path / "semiseg"))
    ma2020 = make_ma2020(tmp_path / "ma2020")
    data.extra_labelled_dir = str(ma2020)
    for index in (2, 5, 6):  # a 2-pixel lesion: 1/128 of the slice, below the others' 45/256
        mask = np.zeros((16, 16), np.uint8)
        mask[0, :2] = 255
        save_png(ma2020 / "covid" / f"{index:04d}.png", mask)
    shares = {path.stem: np.mean(np.asarray(Image.open(path)) > 0) for path in (ma2020 / "covid").glob("*")}
    data.extra_min_lesion_fraction = float(np.median(list(shares.values())))
    extra = datasets.load_source(data, "train").extra
    kept = sorted(extra[index]["id"] for index in range(len(extra)))
    assert kept == sorted(name for name, share in shares.items() if share >= data.extra_min_lesion_fraction)
    assert kept == ["0000", "0001", "0003", "0004", "0007", "0008", "0009"]
    assert f"extra_min_lesion_fraction={data.extra_min_lesion_fraction:g}: 7 of 10 extra slices kept" in (
        capsys.readouterr().out
    )
    data.extra_min_lesion_fraction = max(shares.values()) + 0.01
    with pytest.raises(UserError, match=r"^data.extra_min_lesion_fraction: none of the 10 extra slices has"):
        datasets.load_source(data, "train")


def test_a_lesion_filter_with_nothing_to_filter_is_refused():
    config = config_lib.base_config()
    config.data.extra_min_lesion_fraction = 0.05
    with pytest.raises(UserError, match=r"^data.extra_min_lesion_fraction: it filters the pseudo-labelled"):
        config_validation.validate(config)
    config.data.extra_labelled_dir, config.loss = "somewhere", "dice_weighted"
    config_validation.validate(config)


def _records(data, split):
    source = datasets.load_source(data, split)
    return [source[index] for index in range(len(source))]


def test_mixed_training_needs_a_weighted_loss_and_one_extra_source(tmp_path):
    config = config_lib.base_config()
    config.data.extra_labelled_dir = "somewhere"
    with pytest.raises(UserError, match=r"^loss: training on mixed batches needs a weighted loss"):
        config_validation.validate(config)
    config.loss = "dice_weighted"
    config_validation.validate(config)
    config.data.pseudo_label_dir = "elsewhere"
    with pytest.raises(UserError, match="^data.extra_labelled_dir: cannot be mixed in together"):
        config_validation.validate(config)


def test_a_build_another_process_finished_first_is_reused(tmp_path, monkeypatch, capsys):
    """Two runs preparing one dataset at once (e.g. cross-validation folds started together): the one whose
    rename comes second reuses the winner's build instead of failing."""
    data = data_config(tmp_path, "synthetic", num_train=4, num_validation=2, num_test=2, image_size=16)
    real_split_generators = builder.CovidCtSlices._split_generators
    raced = []

    def finished_by_another_process_meanwhile(self, dl_manager):
        if not raced:
            raced.append(True)
            other = builder.CovidCtSlices(
                config=self.builder_config, data_dir=data.data_dir, file_format="array_record"
            )
            other.download_and_prepare(file_format="array_record")
        return real_split_generators(self, dl_manager)

    monkeypatch.setattr(builder.CovidCtSlices, "_split_generators", finished_by_another_process_meanwhile)
    prepared = builder.prepare(data)
    assert raced and prepared.data_path.is_dir()
    assert len(datasets.load_source(data, "train")) == 4
    leftovers = [path.name for path in prepared.data_path.parent.iterdir() if path != prepared.data_path]
    assert leftovers == []


# --- Pseudo-label folders and the sources that mix extra slices in --------------------------------------


def test_a_pseudo_label_folder_gives_records_by_hand_and_names_every_mismatch(tmp_path):
    pool = [{"id": f"p{index}", "image": np.full((2, 3), index, np.uint8)} for index in range(3)]
    mask = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    weight = np.array([[0, 128, 255], [7, 0, 255]], np.uint8)
    folder = write_pseudo_label_folder(
        tmp_path / "round1", [("p2", 2, mask, weight), ("p0", 0, mask, weight)]
    )
    source = pseudo_labels.PseudoLabelSource(folder, pool)
    record = source[0]
    assert record["id"] == "p2" and record["image"].tolist() == [[2, 2, 2], [2, 2, 2]]
    assert record["mask"].tolist() == [[0, 1, 1], [0, 0, 1]] and record["weight"].tolist() == weight.tolist()
    assert source.lesion_fraction(1) == 0.5
    assert repr(source) == f"PseudoLabelSource(directory={str(folder)!r}, num_records=2)"
    # Labels made from the pool matched one way, read with another: refused, naming both.
    matched = write_pseudo_label_folder(
        tmp_path / "window", [("p1", 1, mask, weight)], intensity_matching="window"
    )
    assert len(pseudo_labels.PseudoLabelSource(matched, pool, intensity_matching="window")) == 1
    with pytest.raises(UserError) as error:
        pseudo_labels.PseudoLabelSource(matched, pool)
    assert str(error.value) == (
        f"data.unlabelled_intensity_matching: {matched} was predicted from the pool matched with 'window', "
        "the config reads it with 'none'"
    )
    # The pool changed under the labels: the slice at that index is another one.
    moved = pseudo_labels.PseudoLabelSource(
        write_pseudo_label_folder(tmp_path / "moved", [("p0", 1, mask, weight)]), pool
    )
    with pytest.raises(UserError) as error:
        moved[0]
    assert str(error.value) == (
        f"data.pseudo_label_dir: {tmp_path / 'moved'} labels slice 'p0' at index 1, where the unlabelled "
        "split now holds 'p1'; predict it again"
    )
    for name, bad_mask, bad_weight in (("mask", mask[:1], weight), ("weight", mask, weight[:, :2])):
        bad = write_pseudo_label_folder(tmp_path / name, [("p1", 1, bad_mask, bad_weight)])
        with pytest.raises(UserError) as error:
            pseudo_labels.PseudoLabelSource(bad, pool)[0]
        shape = (bad_mask if name == "mask" else bad_weight).shape
        assert str(error.value) == f"{bad}: the {name} of p1 is {shape}, its image (2, 3)"
    with pytest.raises(UserError) as error:
        pseudo_labels.read_summary(tmp_path / "empty")
    assert str(error.value) == (
        f"data.pseudo_label_dir: {tmp_path / 'empty'} holds no summary.json "
        "(not a complete pseudo-label folder)"
    )
    # A summary edited by hand that no longer parses: one line naming it.
    (folder / pseudo_labels.SUMMARY).write_text('{"slices": [],}')
    with pytest.raises(UserError) as error:
        pseudo_labels.read_summary(folder)
    assert str(error.value) == (
        f"{folder / pseudo_labels.SUMMARY}: not valid JSON (Expecting property name enclosed in double "
        "quotes, line 1)"
    )
    # Labels of a pool of 3 slices, which now holds 2 (or 4): refused before any slice is drawn.
    summary = json.loads((matched / pseudo_labels.SUMMARY).read_text())
    summary["totals"] = {"num_slices": 3}
    (matched / pseudo_labels.SUMMARY).write_text(json.dumps(summary))
    assert len(pseudo_labels.PseudoLabelSource(matched, pool, intensity_matching="window")) == 1
    for changed in (pool[:2], [*pool, pool[0]]):
        with pytest.raises(UserError) as error:
            pseudo_labels.PseudoLabelSource(matched, changed, intensity_matching="window")
        assert str(error.value) == (
            f"data.pseudo_label_dir: {matched} labels a pool of 3 slices, the unlabelled split now holds "
            f"{len(changed)}; remove the folder (and the students trained on it) to predict it again"
        )


def test_unlabelled_slices_without_labels_the_lesion_filter_and_the_mix_by_hand():
    pool = [{"id": "u7", "image": np.ones((2, 2), np.uint8)}]
    record = pseudo_labels.WithoutLabels(pool)[0]
    assert record["id"] == "u7" and record["mask"].dtype == record["weight"].dtype == np.uint8
    assert record["mask"].tolist() == record["weight"].tolist() == [[0, 0], [0, 0]]

    class FractionsOnly(list):
        """Answers the lesion filter from its fractions; reading a record's mask would be an error."""

        def lesion_fraction(self, index):
            return [0.05, 0.2, 0.01][index]

        def __getitem__(self, index):
            raise AssertionError("the filter read a record")

    kept = pseudo_labels.WithLesion(FractionsOnly([None] * 3), 0.05)
    assert kept.kept == [0, 1]
    labelled = [{"id": "a"}, {"id": "b"}]
    mixed = pseudo_labels.MixedSource(labelled, pool, 0.2)
    assert (mixed.name, mixed.split, len(mixed), mixed[1]) == ("", "train", 2, {"id": "b"})
    assert repr(mixed) == f"MixedSource(labelled={labelled!r}, extra={pool!r}, fraction=0.2)"

    class Named(list):
        name, split = "semiseg", "train_full"

    named = pseudo_labels.MixedSource(Named(labelled), pool, 0.5)
    assert (named.name, named.split) == ("semiseg", "train_full")


def _digest(pool):
    return pseudo_labels.pool_ids_and_digest(pool)[1]


def test_the_pool_digest_tells_every_id_pixel_and_shape_and_only_those():
    def pool(*changes):
        slices = [{"id": f"p{index}", "image": np.full((2, 4), index, np.uint8)} for index in range(3)]
        for change in changes:
            change(slices)
        return slices

    ids, digest = pseudo_labels.pool_ids_and_digest(pool())
    assert ids == ["p0", "p1", "p2"]
    assert re.fullmatch("[0-9a-f]{16}", digest)
    # The same slices read again, or with other record fields (a case id, a mask): the same pool.
    assert _digest(pool(lambda s: s[1].update(mask=np.ones((2, 4)), case_id="x"))) == digest
    others = {
        "a pixel": lambda s: s[2]["image"].__setitem__((1, 3), 7),
        "an id": lambda s: s[0].update(id="q0"),
        "the order": lambda s: s.reverse(),
        "a shape, same bytes": lambda s: s[1].update(image=s[1]["image"].reshape(4, 2)),
        "a dtype, same bytes": lambda s: s[0].update(image=s[0]["image"].astype(np.int8)),
    }
    digests = {what: _digest(pool(change)) for what, change in others.items()}
    assert digest not in digests.values() and len(set(digests.values())) == len(others)
    # A transposed (non-contiguous) view reads as the image it shows.
    transposed = pool(lambda s: s[1].update(image=np.full((4, 2), 1, np.uint8).T))
    assert _digest(transposed) == digest


def test_the_phantom_splits_hold_different_slices_and_lesions_look_as_documented():
    """Each split its own slices (a split seed shared by two splits would make validation or the pool the
    test images), and what the module docstring promises: one or more lesions a slice, a small share of
    it, brighter than the dark lungs, consolidation denser than ground glass."""
    splits = ("train", "validation", "test", "unlabelled")
    images = {
        split: [synthetic.SyntheticSource(split, 3, 32)[i]["image"] for i in range(3)] for split in splits
    }
    fingerprints = {image.tobytes() for split in splits for image in images[split]}
    assert len(fingerprints) == 12
    source = synthetic.SyntheticSource("train", 40, 64)
    records = [source[index] for index in range(40)]
    assert all(record["mask"].any() for record in records)
    assert all(set(np.unique(record["class_mask"])) <= {0, 1, 2} for record in records)
    for record in records:
        np.testing.assert_array_equal(record["mask"], record["class_mask"] > 0)
    assert np.mean([record["mask"].mean() for record in records]) < 0.1  # measured 0.046
    ggo = np.mean([r["image"][r["class_mask"] == 1].mean() for r in records if (r["class_mask"] == 1).any()])
    consolidation = np.mean(
        [r["image"][r["class_mask"] == 2].mean() for r in records if (r["class_mask"] == 2).any()]
    )
    # The lungs are 0.12 * 255 = 31 before vessels, lesions and noise; measured 83 and 137.
    assert 60 < ggo < consolidation - 30
