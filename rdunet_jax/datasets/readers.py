"""Reading and checking the files of a manual directory: PNG/JPEG slices, NIfTI volumes, split lists.

Every problem a user can fix (a corrupt or truncated file, mismatched sizes, unknown mask labels, a
wrong number of dimensions, a split list naming a missing file) raises `UserError` with one line that
names the file and the problem, so a build fails before anything is written as complete.
"""

import hashlib
import os
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from rdunet_jax.errors import UserError

# Binary masks are released as {0, 255}; {0, 1} is accepted too. Class masks: 0 background,
# 1 ground-glass opacity, 2 consolidation (and 3 pleural effusion in MedSeg's NIfTI masks).
BINARY_LABELS = (0, 1, 255)
SEMISEG_CLASS_LABELS = (0, 1, 2)
NIFTI_LABELS = (0, 1, 2, 3)
NIFTI_LESION_LABELS = (1, 2)


def _open_image(path: pathlib.Path) -> Image.Image:
    """Opens and fully decodes an image, turning decoder failures into a UserError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Image.DecompressionBombError as error:  # far beyond any CT slice: refused before decoding
        raise UserError(f"{path}: too large an image to decode ({error})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: corrupt or truncated image ({error})") from None


def read_grayscale_image(path) -> np.ndarray:
    """A slice image as (H, W) uint8; colour and palette images are converted to luminance."""
    path = pathlib.Path(path)
    image = _open_image(path)
    if image.mode == "F" or image.mode.startswith("I"):
        # Pillow's conversion to 8 bits clips (a 16-bit slice becomes white), it does not rescale.
        raise UserError(
            f"{path}: a {image.mode} image (more than 8 bits a pixel); slices must be 8-bit images in a "
            "display window (give CT in Hounsfield units as NIfTI or DICOM)"
        )
    if image.mode != "L":
        # A palette slice's indices are not intensities: its displayed grey levels are.
        image = image.convert("L")
    # An L image is one 8-bit channel of at least 1x1 pixels (Pillow neither writes nor reads empty images).
    return np.asarray(image)


def read_label_image(path, labels) -> np.ndarray:
    """A mask image as (H, W) uint8 raw values (palette indices for palette PNGs), checked against
    the known `labels`."""
    path = pathlib.Path(path)
    image = _open_image(path)
    if image.mode == "1":
        image = image.convert("L")
    if image.mode not in ("L", "P"):
        raise UserError(
            f"{path}: a mask must be a single-channel (L or palette) image, got mode {image.mode}"
        )
    array = np.asarray(image)  # L or P: (H, W) uint8, as in read_grayscale_image
    check_labels(array, labels, path)
    return array


def check_labels(array: np.ndarray, labels, path) -> None:
    """Raises UserError naming `path` when `array` has values outside `labels`."""
    if array.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(array.ravel()))  # far faster than np.unique
    else:
        values = np.unique(array)
    unknown = np.setdiff1d(values, np.asarray(labels))
    if unknown.size:
        shown = ", ".join(str(value) for value in unknown[:5].tolist())
        raise UserError(f"{path}: mask values {{{shown}}} outside the known labels {set(labels)}")


def read_binary_mask(path) -> np.ndarray:
    """A lesion mask as (H, W) uint8 in {0, 1}."""
    return (read_label_image(path, BINARY_LABELS) > 0).astype(np.uint8)


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path, mask_path) -> None:
    """Raises UserError when an image and its mask differ in size."""
    if image.shape != mask.shape:
        raise UserError(
            f"{mask_path}: size {mask.shape[::-1]} differs from its image {image_path} ({image.shape[::-1]})"
        )


def read_nifti(path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A 3-D NIfTI volume as (float32 voxel values after scaling, the 4x4 affine, voxel spacing)."""
    import nibabel

    path = pathlib.Path(path)
    try:
        volume = nibabel.load(path)
        data = np.asarray(volume.dataobj, dtype=np.float32)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as error:  # nibabel raises many types for truncated or non-NIfTI files
        raise UserError(
            f"{path}: corrupt or unreadable NIfTI file ({type(error).__name__}: {error})"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # a single-frame 4-D volume is still one volume
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3-D volume (x, y, slices), got an array of shape {data.shape}")
    if min(data.shape) == 0:
        raise UserError(f"{path}: empty volume of shape {data.shape}")
    spacing = tuple(float(zoom) for zoom in volume.header.get_zooms()[:3])
    return data, np.asarray(volume.affine, np.float64), spacing


def check_nifti_pair(image_path, image_volume, image_affine, mask_path, mask_volume, mask_affine) -> None:
    """Raises UserError when a NIfTI image and mask differ in shape or in affine."""
    if image_volume.shape != mask_volume.shape:
        raise UserError(
            f"{mask_path}: shape {mask_volume.shape} differs from its image {image_path} "
            f"({image_volume.shape})"
        )
    if not np.allclose(image_affine, mask_affine, atol=1e-3):
        raise UserError(f"{mask_path}: affine differs from its image {image_path}")


def nifti_label_volume(volume: np.ndarray, path, labels=NIFTI_LABELS) -> np.ndarray:
    """A NIfTI mask volume as uint8 labels, rejecting non-integer values or values outside `labels`."""
    rounded = np.rint(volume)
    if not np.allclose(rounded, volume, atol=1e-3):
        raise UserError(f"{path}: mask has non-integer values; expected labels {set(labels)}")
    # As integers (named as such in the error), uint8 where they fit: check_labels bincounts those.
    fits = rounded.size and 0 <= rounded.min() and rounded.max() <= 255
    check_labels(rounded.astype(np.uint8 if fits else np.int64), labels, path)
    return rounded.astype(np.uint8)


def read_split_list(list_path, folder, suffix: str) -> list[str]:
    """The ids of a split list (one per line); each must name a file `<id><suffix>` inside `folder`."""
    list_path, folder = pathlib.Path(list_path), pathlib.Path(folder)
    if not list_path.is_file():
        raise UserError(f"{list_path}: split list not found")
    root = folder.resolve()
    ids = []
    try:
        lines = list_path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{list_path}: split list is not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        example_id = line.strip()
        if not example_id:
            continue
        if not example_id.isprintable():
            raise UserError(f"{list_path}:{number}: {example_id!r} is not a valid id")
        # An id is a file name, never a path: absolute paths, separators and '..' are refused outright.
        candidate = (folder / f"{example_id}{suffix}").resolve()
        if (
            "/" in example_id
            or "\\" in example_id
            or ".." in example_id
            or not candidate.is_relative_to(root)
        ):
            raise UserError(
                f"{list_path}:{number}: {example_id!r} is a path, not an id of a file in {folder}"
            )
        if not candidate.is_file():
            raise UserError(
                f"{list_path}:{number}: id {example_id!r} has no file {folder / (example_id + suffix)}"
            )
        ids.append(example_id)
    if not ids:
        raise UserError(f"{list_path}: split list is empty")
    if len(set(ids)) != len(ids):
        raise UserError(f"{list_path}: split list names an id twice")
    return ids


def fingerprint(directory, skipped=()) -> str:
    """A short hash of every file's relative path, size and modification time under `directory`: it
    changes when files are added, removed, replaced or edited, without reading their contents. Linked
    folders are followed (their files are read too); hidden entries (editor locks, .DS_Store), broken
    links and the `skipped` folders (a data_dir kept inside) are left out, since no layout reads them."""
    directory = pathlib.Path(directory)
    skipped = {os.path.realpath(folder) for folder in skipped if folder}
    digest, visited = hashlib.sha256(), set()
    for root, subdirectories, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in visited or real in skipped:  # a link back up the tree, or the prepared data
            subdirectories.clear()
            continue
        visited.add(real)
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(files):
            path = pathlib.Path(root) / name
            if name.startswith(".") or not path.exists():
                continue
            stat = path.stat()
            relative = path.relative_to(directory).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
