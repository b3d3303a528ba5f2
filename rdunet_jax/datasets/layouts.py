"""The manual-directory layouts of the public datasets: which files make up each example and split.

Nothing here decodes pixels; it finds files, checks that each layout is complete, and assigns examples
to splits (seeded, so a split is a pure function of the file list and the config).
"""

import dataclasses
import pathlib

import numpy as np

from rdunet_jax.datasets import readers
from rdunet_jax.errors import UserError

SEMISEG_TRAIN = pathlib.Path("Dataset/TrainingSet")
SEMISEG_BINARY = SEMISEG_TRAIN / "LungInfection-Train/Doctor-label"
SEMISEG_MULTICLASS = SEMISEG_TRAIN / "MultiClassInfection-Train"
SEMISEG_TEST = pathlib.Path("Dataset/TestingSet")
SEMISEG_TEST_BINARY = SEMISEG_TEST / "LungInfection-Test"
SEMISEG_TEST_MULTICLASS = SEMISEG_TEST / "MultiClassInfection-Test"
# The release's unlabelled pool: 1,600 slices of Ma et al.'s 20 volumes, images only (Inf-Net's pseudo-labels
# beside them, `Pseudo-label/GT`, are never read: ours come from our own models).
SEMISEG_UNLABELLED = SEMISEG_TRAIN / "LungInfection-Train/Pseudo-label/Imgs"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# What each dataset's manual directory must hold and where to get it, for the missing-data error.
EXPECTED_LAYOUT = {
    "semiseg": (
        "the COVID-SemiSeg layout Dataset/TrainingSet/LungInfection-Train/Doctor-label/{Imgs,GT} and "
        "Dataset/TrainingSet/MultiClassInfection-Train/{GT,train.txt,val.txt} (optional Dataset/TestingSet/"
        "LungInfection-Test/{Imgs,GT} and MultiClassInfection-Test/GT); download the COVID-SemiSeg release "
        "(github.com/DengPingFan/Inf-Net) of MedSeg's data (medicalsegmentation.com/covid19)"
    ),
    "ma2020_2d": (
        "ct/NNNN.png, covid/NNNN.png and lungs/NNNN.png: the 2-D slices of Ma et al.'s 20 volumes "
        "(zenodo.org/record/3757476)"
    ),
    "nifti": (
        "NIfTI volumes with lesion masks: MedSeg's tr_im.nii.gz and tr_mask.nii.gz "
        "(medicalsegmentation.com/covid19), Ma et al.'s COVID-19-CT-Seg_20cases/*.nii.gz with "
        "Infection_Mask/*.nii.gz (zenodo.org/record/3757476), or <case>_image.nii.gz with <case>_mask.nii.gz"
    ),
}


def missing_data_error(dataset: str, manual_dir, problem: str) -> UserError:
    """The one-line error for a missing or incomplete manual directory: layout, source and config key."""
    return UserError(
        f"data.manual_dir={str(manual_dir)!r}: {problem}; data.name={dataset!r} expects "
        f"{EXPECTED_LAYOUT[dataset]}; set --config.data.manual_dir to the folder that holds it"
    )


def check_manual_dir(dataset: str, manual_dir) -> pathlib.Path:
    """The manual directory as a path, or the missing-data error when unset, absent or empty."""
    if not manual_dir:
        raise missing_data_error(dataset, "", "not set")
    path = pathlib.Path(manual_dir).expanduser()
    if not path.is_dir():
        raise missing_data_error(dataset, manual_dir, "no such folder")
    if not any(path.iterdir()):
        raise missing_data_error(dataset, manual_dir, "the folder is empty")
    return path


def _require_folder(dataset: str, manual_dir: pathlib.Path, relative: pathlib.Path) -> pathlib.Path:
    """`manual_dir / relative`, which must be a folder holding at least one file."""
    folder = manual_dir / relative
    if not folder.is_dir():
        raise missing_data_error(dataset, manual_dir, f"missing folder {relative}")
    if not any(child.is_file() for child in folder.iterdir()):
        raise UserError(f"{folder}: folder is empty")
    return folder


def _require_file(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise UserError(f"{path}: file missing (incomplete manual directory)")
    return path


@dataclasses.dataclass(frozen=True)
class SliceFiles:
    """The files of one 2-D example: image, lesion mask and an optional class or lung mask."""

    example_id: str
    image: pathlib.Path
    mask: pathlib.Path
    extra_mask: pathlib.Path | None = None


def _numeric_first(example_id: str):
    """Sort key: numeric ids in numeric order ('2' before '10'), others after, by name."""
    return (0, int(example_id), "") if example_id.isdigit() else (1, 0, example_id)


def semiseg_splits(manual_dir) -> dict[str, list[SliceFiles]]:
    """COVID-SemiSeg: train (train.txt), validation (val.txt), train_full (both), test (when present)."""
    manual_dir = check_manual_dir("semiseg", manual_dir)
    images = _require_folder("semiseg", manual_dir, SEMISEG_BINARY / "Imgs")
    masks = _require_folder("semiseg", manual_dir, SEMISEG_BINARY / "GT")
    class_masks = _require_folder("semiseg", manual_dir, SEMISEG_MULTICLASS / "GT")
    lists = {}
    for split, list_name in (("train", "train.txt"), ("validation", "val.txt")):
        list_path = manual_dir / SEMISEG_MULTICLASS / list_name
        if not list_path.is_file():
            raise missing_data_error(
                "semiseg", manual_dir, f"missing split list {SEMISEG_MULTICLASS / list_name}"
            )
        lists[split] = readers.read_split_list(list_path, images, ".jpg")
    overlap = set(lists["train"]) & set(lists["validation"])
    if overlap:
        raise UserError(
            f"{manual_dir / SEMISEG_MULTICLASS}: train.txt and val.txt share ids {sorted(overlap)[:5]}"
        )

    def files(image, mask_folder, class_folder):
        return SliceFiles(
            image.stem,
            image,
            _require_file(mask_folder / f"{image.stem}.png"),
            _require_file(class_folder / f"{image.stem}.png"),
        )

    # The split lists name ids whose .jpg read_split_list found; the test split is whatever images it holds.
    splits = {
        split: [files(images / f"{i}.jpg", masks, class_masks) for i in ids] for split, ids in lists.items()
    }
    splits["train_full"] = sorted(
        splits["train"] + splits["validation"], key=lambda f: _numeric_first(f.example_id)
    )
    if (manual_dir / SEMISEG_TEST).exists():
        test_images = _require_folder("semiseg", manual_dir, SEMISEG_TEST_BINARY / "Imgs")
        test_masks = _require_folder("semiseg", manual_dir, SEMISEG_TEST_BINARY / "GT")
        test_class_masks = _require_folder("semiseg", manual_dir, SEMISEG_TEST_MULTICLASS / "GT")
        test_paths = sorted(
            (path for path in test_images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda path: (_numeric_first(path.stem), path.name),
        )
        if not test_paths:
            raise UserError(f"{test_images}: no .jpg or .png images in the folder")
        _check_one_file_an_id(test_paths)
        splits["test"] = [files(path, test_masks, test_class_masks) for path in test_paths]
    return splits


def _check_one_file_an_id(paths) -> None:
    """Refuses two images of one id (`13.jpg` and `13.png`): the slice would be scored, or its
    pseudo-label written, twice."""
    seen = {}
    for path in paths:
        if path.stem in seen:
            raise UserError(f"{path}: the same slice id as {seen[path.stem].name}; keep one of the two")
        seen[path.stem] = path


def unlabelled_case_id(example_id: str) -> str:
    """The volume of an unlabelled pool slice, from its file name `Data-1_<volume>_<n>`: Ma et al.'s volume
    name (`coronacases_org_001`, `radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm`)."""
    volume, _, number = example_id.rpartition("_")
    if not volume or not number.isdigit():
        raise UserError(f"{example_id}: an unlabelled slice's name must end in _<slice number>")
    return volume.removeprefix("Data-1_")


def semiseg_unlabelled_files(manual_dir) -> list[pathlib.Path] | None:
    """The unlabelled pool's images in name order (numeric within a volume), or None when the folder is
    absent (the pool is optional)."""
    folder = pathlib.Path(manual_dir).expanduser() / SEMISEG_UNLABELLED
    if not folder.is_dir():
        return None
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{folder}: no .jpg or .png images in the unlabelled pool's folder")
    _check_one_file_an_id(paths)
    for path in paths:  # checked here, when the pool is listed, not when training first draws the slice
        try:
            unlabelled_case_id(path.stem)
        except UserError:
            raise UserError(f"{path}: an unlabelled slice's name must end in _<slice number>") from None

    def volume_then_number(path):
        volume, _, number = path.stem.rpartition("_")
        return (volume, int(number), path.stem)  # every name ends in _<number> (checked above)

    return sorted(paths, key=volume_then_number)


def ma2020_files(manual_dir) -> list[SliceFiles]:
    """Ma et al.'s 2-D slices in file-number (volume) order, each with its infection and lung mask."""
    manual_dir = check_manual_dir("ma2020_2d", manual_dir)
    ct, covid, lungs = (
        _require_folder("ma2020_2d", manual_dir, pathlib.Path(name)) for name in ("ct", "covid", "lungs")
    )
    slices = sorted(
        (path for path in ct.iterdir() if path.suffix.lower() == ".png"),
        key=lambda path: (_numeric_first(path.stem), path.name),
    )
    if not slices:
        raise UserError(f"{ct}: no .png slices in the folder")
    _check_one_file_an_id(slices)
    # A mask of a slice named 3.PNG may be 3.png or 3.PNG.
    return [SliceFiles(path.stem, path, _mask_file(covid, path), _mask_file(lungs, path)) for path in slices]


def _mask_file(folder: pathlib.Path, slice_path: pathlib.Path) -> pathlib.Path:
    """The mask in `folder` of the slice at `slice_path`: the same name, or its stem with .png."""
    same = folder / slice_path.name
    return same if same.is_file() else _require_file(folder / f"{slice_path.stem}.png")


def split_sizes(count: int, fractions) -> tuple[int, int, int]:
    """Train/validation/test counts for `count` units; every split gets one unit when count >= 3."""
    validation = max(1, round(count * fractions[1])) if count >= 3 else 0
    test = max(1, count - round(count * fractions[0]) - validation) if count >= 3 else 0
    return count - validation - test, validation, test


def assign_splits(units: list, scheme: str, fractions, seed: int) -> dict[str, list]:
    """Splits `units` 'random'ly (seeded permutation) or in contiguous 'blocks' (original order)."""
    train, validation, _ = split_sizes(len(units), fractions)
    if scheme == "random":
        order = np.random.default_rng(seed).permutation(len(units))
        # Each split keeps the original order, so records are in file order within a split.
        chosen = {
            "train": sorted(order[:train]),
            "validation": sorted(order[train : train + validation]),
            "test": sorted(order[train + validation :]),
        }
        return {split: [units[i] for i in indices] for split, indices in chosen.items()}
    if scheme == "blocks":
        return {
            "train": units[:train],
            "validation": units[train : train + validation],
            "test": units[train + validation :],
        }
    raise UserError(f"data.split_scheme: must be 'random' or 'blocks', got {scheme!r}")


@dataclasses.dataclass(frozen=True)
class NiftiCase:
    """One image/mask pair of NIfTI volumes; `independent_slices` marks a stack of unrelated slices
    (MedSeg's tr_im: 100 slices from over 40 patients), split slice by slice."""

    case_id: str
    image: pathlib.Path
    mask: pathlib.Path
    independent_slices: bool = False


def _strip_nifti_suffix(name: str) -> str:
    return name.removesuffix(".gz").removesuffix(".nii")


def nifti_cases(manual_dir) -> list[NiftiCase]:
    """Every NIfTI image/mask pair in the manual directory, in any of the three known layouts."""
    manual_dir = check_manual_dir("nifti", manual_dir)
    cases = []
    for suffix in (".nii.gz", ".nii"):
        if (manual_dir / f"tr_im{suffix}").is_file():
            mask = _require_file(manual_dir / f"tr_mask{suffix}")
            cases.append(NiftiCase("medseg_tr", manual_dir / f"tr_im{suffix}", mask, independent_slices=True))
    ma_images = manual_dir / "COVID-19-CT-Seg_20cases"
    if ma_images.is_dir():
        volumes = sorted(ma_images.glob("*.nii*"))
        if not volumes:
            raise UserError(f"{ma_images}: no .nii or .nii.gz volumes in the folder")
        for volume in volumes:
            mask = _require_file(manual_dir / "Infection_Mask" / volume.name)
            cases.append(NiftiCase(_strip_nifti_suffix(volume.name), volume, mask))
    for volume in sorted(manual_dir.rglob("*_image.nii*")):
        case_id = _strip_nifti_suffix(volume.name).removesuffix("_image")
        mask = _require_file(volume.with_name(volume.name.replace("_image.nii", "_mask.nii")))
        cases.append(NiftiCase(case_id, volume, mask))
    if not cases:
        raise missing_data_error("nifti", manual_dir, "no NIfTI image/mask pairs found")
    seen = set()
    for case in cases:
        if case.case_id in seen:
            raise UserError(f"{case.image}: case id {case.case_id!r} appears twice in {manual_dir}")
        seen.add(case.case_id)
    return cases
