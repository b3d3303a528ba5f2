"""The public datasets' folder layouts (rdunet_jax/datasets/layouts.py), called directly on folders of empty
files (nothing here decodes pixels): each entry point's missing-data error names its own dataset, every
refusal's whole message, file orders and split sizes by hand. test_datasets.py builds the same layouts
end to end, where the builder's own checks come first."""

import pathlib

import pytest
from helpers import refusal

from rdunet_jax.datasets import layouts

TRAIN = pathlib.Path("Dataset/TrainingSet")
BINARY = TRAIN / "LungInfection-Train/Doctor-label"
CLASSES = TRAIN / "MultiClassInfection-Train"


def _touch(root, *relatives):
    for relative in relatives:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


def _semiseg(root, train=("1", "2"), validation=("3",)):
    for example_id in (*train, *validation):
        _touch(root, BINARY / f"Imgs/{example_id}.jpg", BINARY / f"GT/{example_id}.png")
        _touch(root, CLASSES / f"GT/{example_id}.png")
    (root / CLASSES / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / CLASSES / "val.txt").write_text("".join(f"{i}\n" for i in validation))
    return root


def _missing(dataset, manual_dir, problem) -> str:
    """The missing-data error as the docs spell it: the folder, the problem, the dataset's layout, the key."""
    return (
        f"data.manual_dir={str(manual_dir)!r}: {problem}; data.name={dataset!r} expects "
        f"{layouts.EXPECTED_LAYOUT[dataset]}; set --config.data.manual_dir to the folder that holds it"
    )


def test_the_missing_data_error_names_the_folder_the_layout_and_the_key():
    message = str(layouts.missing_data_error("ma2020_2d", "/data/ma", "no such folder"))
    assert message == (
        "data.manual_dir='/data/ma': no such folder; data.name='ma2020_2d' expects ct/NNNN.png, "
        "covid/NNNN.png and lungs/NNNN.png: the 2-D slices of Ma et al.'s 20 volumes "
        "(zenodo.org/record/3757476); set --config.data.manual_dir to the folder that holds it"
    )


ENTRY_POINTS = [
    (layouts.semiseg_splits, "semiseg"),
    (layouts.ma2020_files, "ma2020_2d"),
    (layouts.nifti_cases, "nifti"),
]


@pytest.mark.parametrize(("entry_point", "dataset"), ENTRY_POINTS)
def test_each_layout_refuses_an_unset_absent_or_empty_folder_naming_its_own_dataset(
    tmp_path, entry_point, dataset
):
    assert refusal(entry_point, "") == _missing(dataset, "", "not set")
    assert refusal(entry_point, tmp_path / "absent") == _missing(
        dataset, tmp_path / "absent", "no such folder"
    )
    (tmp_path / "empty").mkdir()
    assert refusal(entry_point, tmp_path / "empty") == _missing(
        dataset, tmp_path / "empty", "the folder is empty"
    )


@pytest.mark.parametrize("folder", [BINARY / "Imgs", BINARY / "GT", CLASSES / "GT"])
def test_semiseg_names_a_missing_folder_as_missing_data(tmp_path, folder):
    root = _semiseg(tmp_path / "semiseg")
    for path in (root / folder).iterdir():
        path.unlink()
    (root / folder).rmdir()
    assert refusal(layouts.semiseg_splits, root) == _missing("semiseg", root, f"missing folder {folder}")


@pytest.mark.parametrize("list_name", ["train.txt", "val.txt"])
def test_semiseg_names_a_missing_split_list_as_missing_data(tmp_path, list_name):
    root = _semiseg(tmp_path / "semiseg")
    (root / CLASSES / list_name).unlink()
    assert refusal(layouts.semiseg_splits, root) == _missing(
        "semiseg", root, f"missing split list {CLASSES / list_name}"
    )


def test_semiseg_refuses_ids_in_both_split_lists_naming_up_to_five(tmp_path):
    root = _semiseg(tmp_path / "semiseg", train=("1", "2", "3"), validation=("3", "2"))
    message = f"{root / CLASSES}: train.txt and val.txt share ids ['2', '3']"
    assert refusal(layouts.semiseg_splits, root) == message
    root = _semiseg(tmp_path / "six", train=tuple("1234567"), validation=tuple("654321"))
    message = f"{root / CLASSES}: train.txt and val.txt share ids ['1', '2', '3', '4', '5']"
    assert refusal(layouts.semiseg_splits, root) == message


TEST = pathlib.Path("Dataset/TestingSet")
TEST_FOLDERS = [
    TEST / "LungInfection-Test/Imgs",
    TEST / "LungInfection-Test/GT",
    TEST / "MultiClassInfection-Test/GT",
]


@pytest.mark.parametrize("missing", TEST_FOLDERS)
def test_an_incomplete_test_split_is_missing_semiseg_data(tmp_path, missing):
    root = _semiseg(tmp_path / "semiseg")
    _touch(root, *(folder / "1.png" for folder in TEST_FOLDERS if folder != missing))
    assert refusal(layouts.semiseg_splits, root) == _missing("semiseg", root, f"missing folder {missing}")


def test_a_test_split_without_images_is_refused(tmp_path):
    root = _touch(_semiseg(tmp_path / "semiseg"), *(folder / "notes.txt" for folder in TEST_FOLDERS))
    message = f"{root / TEST_FOLDERS[0]}: no .jpg or .png images in the folder"
    assert refusal(layouts.semiseg_splits, root) == message


def test_semiseg_splits_by_hand_with_the_test_split_in_numeric_order(tmp_path):
    root = _semiseg(tmp_path / "semiseg", train=("10", "2"), validation=("9",))
    assert not (root / "Dataset/TestingSet").exists()
    splits = layouts.semiseg_splits(root)
    assert sorted(splits) == ["train", "train_full", "validation"]
    assert [files.example_id for files in splits["train"]] == ["10", "2"]  # as train.txt lists them
    assert [files.example_id for files in splits["train_full"]] == ["2", "9", "10"]
    assert splits["validation"][0] == layouts.SliceFiles(
        "9", root / BINARY / "Imgs/9.jpg", root / BINARY / "GT/9.png", root / CLASSES / "GT/9.png"
    )
    test = pathlib.Path("Dataset/TestingSet")
    for example_id, suffix in (("11", ".png"), ("3", ".jpg")):
        _touch(root, test / f"LungInfection-Test/Imgs/{example_id}{suffix}")
        _touch(root, test / f"LungInfection-Test/GT/{example_id}.png")
        _touch(root, test / f"MultiClassInfection-Test/GT/{example_id}.png")
    _touch(root, test / "LungInfection-Test/Imgs/notes.txt")  # not an image: not an example
    splits = layouts.semiseg_splits(root)
    assert [(files.example_id, files.image.name) for files in splits["test"]] == [
        ("3", "3.jpg"),
        ("11", "11.png"),
    ]
    _touch(root, test / "LungInfection-Test/Imgs/3.png")  # slice 3 twice: it would be scored twice
    assert refusal(layouts.semiseg_splits, root) == (
        f"{root / test / 'LungInfection-Test/Imgs/3.png'}: the same slice id as 3.jpg; keep one of the two"
    )


def test_an_unlabelled_slices_volume_is_its_name_less_the_prefix_and_slice_number():
    assert layouts.unlabelled_case_id("Data-1_coronacases_org_001_12") == "coronacases_org_001"
    for name in ("Data-1_volume_x", "12", "_12"):
        assert refusal(layouts.unlabelled_case_id, name) == (
            f"{name}: an unlabelled slice's name must end in _<slice number>"
        )


def test_the_unlabelled_pool_is_sorted_by_volume_then_slice_number(tmp_path):
    assert layouts.semiseg_unlabelled_files(tmp_path) is None  # the pool is optional
    folder = tmp_path / layouts.SEMISEG_UNLABELLED
    names = ["v_10.jpg", "v_2.jpg", "v_1.jpg", "v_0.png", "w_1.jpg", "readme.txt"]
    _touch(folder, *names)
    assert [path.name for path in layouts.semiseg_unlabelled_files(tmp_path)] == [
        "v_0.png",
        "v_1.jpg",
        "v_2.jpg",
        "v_10.jpg",
        "w_1.jpg",
    ]
    # Refused when the pool is listed (not when training first draws the slice), naming the file.
    _touch(folder, "v_x.jpg")
    assert refusal(layouts.semiseg_unlabelled_files, tmp_path) == (
        f"{folder / 'v_x.jpg'}: an unlabelled slice's name must end in _<slice number>"
    )
    (folder / "v_x.jpg").rename(folder / "v_1.png")  # two images of one slice: two pseudo-labels of one name
    assert refusal(layouts.semiseg_unlabelled_files, tmp_path) == (
        f"{folder / 'v_1.png'}: the same slice id as v_1.jpg; keep one of the two"
    )
    for name in [*names, "v_1.png"]:
        (folder / name).unlink(missing_ok=True)
    _touch(folder, "readme.txt")
    assert refusal(layouts.semiseg_unlabelled_files, tmp_path) == (
        f"{folder}: no .jpg or .png images in the unlabelled pool's folder"
    )


def test_ma2020_slices_in_numeric_order_and_a_folder_without_slices_refused(tmp_path):
    root = _touch(
        tmp_path / "ma",
        *(f"{folder}/{i}.png" for folder in ("ct", "covid", "lungs") for i in ("b", 10, "a", 9)),
    )
    files = layouts.ma2020_files(root)
    assert [slice_files.example_id for slice_files in files] == [
        "9",
        "10",
        "a",
        "b",
    ]  # numbers first, by value
    assert files[0] == layouts.SliceFiles("9", root / "ct/9.png", root / "covid/9.png", root / "lungs/9.png")
    (root / "ct/9.png").rename(root / "ct/9.PNG")  # an upper-case suffix is a slice too, its masks .png
    files = layouts.ma2020_files(root)
    assert files[0] == layouts.SliceFiles("9", root / "ct/9.PNG", root / "covid/9.png", root / "lungs/9.png")
    assert len(files) == 4
    _touch(root, "ct/9.png")
    assert refusal(layouts.ma2020_files, root) == (
        f"{root / 'ct/9.png'}: the same slice id as 9.PNG; keep one of the two"
    )
    for path in (root / "ct").iterdir():
        path.rename(path.with_suffix(".jpg"))
    assert refusal(layouts.ma2020_files, root) == f"{root / 'ct'}: no .png slices in the folder"


@pytest.mark.parametrize(
    ("count", "fractions", "sizes"),
    [
        (10, (0.5, 0.3, 0.2), (5, 3, 2)),  # validation from fractions[1], test the rest of round(0.5 x 10)
        (3, (0.6, 0.2, 0.2), (1, 1, 1)),  # from 3 units on, every split gets at least one
        (2, (0.6, 0.2, 0.2), (2, 0, 0)),  # below that, all are training units
        (1, (0.6, 0.2, 0.2), (1, 0, 0)),
    ],
)
def test_split_sizes_by_hand(count, fractions, sizes):
    assert layouts.split_sizes(count, fractions) == sizes


def test_split_assignment_is_seeded_and_in_file_order_within_each_split():
    units = list("abcdefghij")
    first = layouts.assign_splits(units, "random", (0.6, 0.2, 0.2), seed=3)
    assert first == layouts.assign_splits(units, "random", (0.6, 0.2, 0.2), seed=3)
    assert first != layouts.assign_splits(units, "random", (0.6, 0.2, 0.2), seed=4)
    assert sorted(sum(first.values(), [])) == units
    assert all(split == sorted(split) for split in first.values())
    assert layouts.assign_splits(units, "blocks", (0.6, 0.2, 0.2), seed=3) == {
        "train": list("abcdef"),
        "validation": list("gh"),
        "test": list("ij"),
    }
    assert refusal(layouts.assign_splits, units, "volumes", (0.6, 0.2, 0.2), 0) == (
        "data.split_scheme: must be 'random' or 'blocks', got 'volumes'"
    )


def test_nifti_cases_of_each_layout_uncompressed_too(tmp_path):
    root = _touch(tmp_path / "nifti", "tr_im.nii", "tr_mask.nii", "sub/b_image.nii", "sub/b_mask.nii")
    _touch(root, "COVID-19-CT-Seg_20cases/ma_1.nii.gz", "Infection_Mask/ma_1.nii.gz")
    assert layouts.nifti_cases(root) == [
        layouts.NiftiCase("medseg_tr", root / "tr_im.nii", root / "tr_mask.nii", independent_slices=True),
        layouts.NiftiCase(
            "ma_1", root / "COVID-19-CT-Seg_20cases/ma_1.nii.gz", root / "Infection_Mask/ma_1.nii.gz"
        ),
        layouts.NiftiCase("b", root / "sub/b_image.nii", root / "sub/b_mask.nii"),
    ]


def test_nifti_refusals_are_one_line_each(tmp_path):
    root = _touch(tmp_path / "nifti", "notes.txt")
    assert refusal(layouts.nifti_cases, root) == _missing("nifti", root, "no NIfTI image/mask pairs found")
    (root / "COVID-19-CT-Seg_20cases").mkdir()
    assert refusal(layouts.nifti_cases, root) == (
        f"{root / 'COVID-19-CT-Seg_20cases'}: no .nii or .nii.gz volumes in the folder"
    )
    (root / "COVID-19-CT-Seg_20cases").rmdir()
    _touch(root, "x/a_image.nii.gz", "x/a_mask.nii.gz", "y/a_image.nii.gz", "y/a_mask.nii.gz")
    assert (
        refusal(layouts.nifti_cases, root)
        == f"{root / 'y/a_image.nii.gz'}: case id 'a' appears twice in {root}"
    )
