"""Reading a manual directory's files (rdunet_jax/datasets/readers.py), one reader at a time: grey levels of
colour, palette and 1-bit PNGs against the ITU-R 601 luma by hand, masks and NIfTI volumes, each refusal's
whole one-line message, split lists' ids and paths, and the folder fingerprint. test_datasets.py checks the
same refusals end to end, through a dataset build."""

import hashlib
import os

import nibabel
import numpy as np
import pytest
from helpers import refusal, save_nifti, save_png
from PIL import Image

from rdunet_jax.datasets import readers

# --- slices and masks ------------------------------------------------------------------------------------


def test_colour_and_palette_slices_are_read_as_their_luminance(tmp_path):
    # ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B: pure red, green and blue are 76.2, 149.7 and 29.1.
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0, 0], rgb[0, 1, 1], rgb[0, 2, 2] = 255, 255, 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(readers.read_grayscale_image(tmp_path / "rgb.png"), [[76, 150, 29]])
    # A palette slice's indices 0, 1, 2 show as those same colours: its grey levels, not its indices.
    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    image = readers.read_grayscale_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(image, [[76, 150, 29]])
    assert image.dtype == np.uint8


@pytest.mark.parametrize(
    "array, mode",
    [
        (np.array([[0, 1000, 4000]], np.uint16), "I;16"),  # a 16-bit PNG: Pillow's 8-bit conversion clips
        (np.array([[0, 1000, 4000]], np.int32), "I"),  # TIFF (PNG writes no 32-bit grey)
        (np.array([[0.0, 0.5, 1.0]], np.float32), "F"),
    ],
)
def test_a_slice_of_more_than_8_bits_a_pixel_is_refused_not_clipped(tmp_path, array, mode):
    path = tmp_path / ("slice.png" if mode == "I;16" else "slice.tif")
    Image.fromarray(array).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
    assert refusal(readers.read_grayscale_image, path) == (
        f"{path}: a {mode} image (more than 8 bits a pixel); slices must be 8-bit images in a display "
        "window (give CT in Hounsfield units as NIfTI or DICOM)"
    )


def test_masks_keep_palette_indices_and_read_1_bit_and_0_1_masks_as_lesion(tmp_path):
    save_png(tmp_path / "classes.png", np.array([[0, 1, 2]], np.uint8), palette=True)
    classes = readers.read_label_image(tmp_path / "classes.png", (0, 1, 2))
    np.testing.assert_array_equal(classes, [[0, 1, 2]])
    assert classes.dtype == np.uint8 and classes.shape == (1, 3)
    Image.fromarray(np.array([[False, True, True]])).save(tmp_path / "one_bit.png")  # mode "1"
    assert Image.open(tmp_path / "one_bit.png").mode == "1"
    np.testing.assert_array_equal(readers.read_binary_mask(tmp_path / "one_bit.png"), [[0, 1, 1]])
    save_png(tmp_path / "zero_one.png", np.array([[1, 0, 1]], np.uint8))
    np.testing.assert_array_equal(readers.read_binary_mask(tmp_path / "zero_one.png"), [[1, 0, 1]])
    save_png(tmp_path / "zero_255.png", np.array([[255, 0, 255]], np.uint8))
    np.testing.assert_array_equal(readers.read_binary_mask(tmp_path / "zero_255.png"), [[1, 0, 1]])


def test_a_missing_slice_is_refused_in_one_line(tmp_path):
    path = tmp_path / "1.png"
    assert refusal(readers.read_grayscale_image, path) == f"{path}: file not found"


def test_an_image_too_large_to_decode_is_refused_in_one_line(tmp_path, monkeypatch):
    # Pillow's guard against decompression bombs (2 x MAX_IMAGE_PIXELS) ended in a traceback.
    save_png(tmp_path / "huge.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 64 pixels: twice the limit
    assert refusal(readers.read_grayscale_image, tmp_path / "huge.png") == (
        f"{tmp_path / 'huge.png'}: too large an image to decode (Image size (64 pixels) exceeds limit of 32 "
        "pixels, could be decompression bomb DOS attack.)"
    )


def test_unknown_mask_values_are_listed_up_to_five():
    mask = np.array([[0, 3, 4, 5, 6, 7, 8, 1]], np.uint8)
    assert refusal(readers.check_labels, mask, (0, 1, 2), "m.png") == (
        "m.png: mask values {3, 4, 5, 6, 7} outside the known labels {0, 1, 2}"
    )
    assert refusal(readers.check_labels, np.array([[0.0, 9.0]]), (0, 1), "m.nii") == (
        "m.nii: mask values {9.0} outside the known labels {0, 1}"
    )


def test_a_mask_of_another_size_names_both_sizes_as_width_by_height():
    image, mask = np.zeros((3, 5)), np.zeros((4, 6))
    assert refusal(readers.check_same_size, image, mask, "i.png", "m.png") == (
        "m.png: size (6, 4) differs from its image i.png ((5, 3))"
    )


# --- NIfTI volumes ---------------------------------------------------------------------------------------


def test_a_single_frame_4d_volume_and_a_single_slice_are_read_as_3d_volumes(tmp_path):
    volume = np.arange(24, dtype=np.int16).reshape(4, 3, 2, 1)
    image = nibabel.Nifti1Image(volume, np.diag([0.8, 0.7, 5.0, 1.0]))
    image.header.set_zooms((0.8, 0.7, 5.0, 2.5))  # a time step as the fourth zoom
    nibabel.save(image, tmp_path / "frame.nii.gz")
    data, affine, spacing = readers.read_nifti(tmp_path / "frame.nii.gz")
    np.testing.assert_array_equal(data, volume[..., 0])
    assert data.dtype == np.float32 and affine.dtype == np.float64
    assert spacing == pytest.approx((0.8, 0.7, 5.0)) and len(spacing) == 3
    save_nifti(tmp_path / "slice.nii.gz", np.ones((4, 3, 1), np.int16))
    assert readers.read_nifti(tmp_path / "slice.nii.gz")[0].shape == (4, 3, 1)


def test_missing_empty_and_unreadable_volumes_are_refused_in_one_line(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    assert refusal(readers.read_nifti, missing) == f"{missing}: file not found"
    empty = save_nifti(tmp_path / "empty.nii", np.zeros((4, 3, 0), np.int16))  # gzipped, nibabel reads (0,)
    assert refusal(readers.read_nifti, empty) == f"{empty}: empty volume of shape (4, 3, 0)"
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a volume" * 20)
    assert refusal(readers.read_nifti, garbage).startswith(
        f"{garbage}: corrupt or unreadable NIfTI file (ImageFileError: "
    )


def test_affines_within_a_thousandth_are_the_same_volume_grid():
    affine = np.diag([0.8, 0.7, 5.0, 1.0])
    volume = np.zeros((2, 2, 2))
    readers.check_nifti_pair("i.nii", volume, affine, "m.nii", volume, affine + 5e-4)
    assert refusal(readers.check_nifti_pair, "i.nii", volume, affine, "m.nii", volume, affine + 2e-3) == (
        "m.nii: affine differs from its image i.nii"
    )


def test_mask_volumes_round_values_within_a_thousandth_and_refuse_fractions():
    labels = readers.nifti_label_volume(np.array([0.0, 1.0005, 1.9996]), "m.nii")
    np.testing.assert_array_equal(labels, [0, 1, 2])
    assert labels.dtype == np.uint8
    assert refusal(readers.nifti_label_volume, np.array([0.0, 0.5]), "m.nii", (0, 1)) == (
        "m.nii: mask has non-integer values; expected labels {0, 1}"
    )


# --- split lists -----------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "Imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "10.jpg", "a..b.jpg", "a\\b.jpg", "sub/3.jpg"):
        (folder / name).write_bytes(b"")
    (tmp_path / "outside.jpg").write_bytes(b"")
    os.symlink(tmp_path / "outside.jpg", folder / "link.jpg")
    return folder


def _split_list(folder, text):
    path = folder.parent / "train.txt"
    path.write_text(text)
    return path


def test_a_split_list_gives_its_ids_in_order_past_blank_lines(images):
    ids = readers.read_split_list(_split_list(images, "10\n\n  2  \n1\n"), images, ".jpg")
    assert ids == ["10", "2", "1"]


@pytest.mark.parametrize("example_id", ["a..b", "a\\b", "sub/3", "link"])
def test_an_id_that_is_a_path_is_refused_even_when_it_names_a_file_inside(images, example_id):
    # Each of these names a file: `a..b.jpg` and `a\b.jpg` in the folder, `sub/3.jpg` below it, and
    # `link.jpg`, a link to a file outside it. Only the last leaves the folder, but ids are file names.
    path = _split_list(images, f"1\n{example_id}\n")
    assert refusal(readers.read_split_list, path, images, ".jpg") == (
        f"{path}:2: {example_id!r} is a path, not an id of a file in {images}"
    )


def test_each_split_list_refusal_is_one_line_with_its_line_number(images):
    path = images.parent / "missing.txt"
    assert refusal(readers.read_split_list, path, images, ".jpg") == f"{path}: split list not found"
    cases = {
        "1\n\n99\n": ":3: id '99' has no file " + str(images / "99.jpg"),
        "2\na\tb\n": ":2: 'a\\tb' is not a valid id",
        "1\n2\n1\n": ": split list names an id twice",
        "\n \n": ": split list is empty",
    }
    for text, message in cases.items():
        path = _split_list(images, text)
        assert refusal(readers.read_split_list, path, images, ".jpg") == f"{path}{message}"
    path.write_bytes(b"1\n\xff\n")
    assert refusal(readers.read_split_list, path, images, ".jpg") == (
        f"{path}: split list is not UTF-8 text (byte 2)"
    )


# --- the fingerprint -------------------------------------------------------------------------------------


def test_the_fingerprint_is_sha256_of_each_files_path_size_and_time_and_sees_a_rename(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"12345")
    (tmp_path / "a.txt").write_bytes(b"1")
    stats = {name: (tmp_path / name).stat() for name in ("a.txt", "b/x.png")}  # os.walk's order, sorted
    text = "".join(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n" for name, stat in stats.items())
    assert readers.fingerprint(tmp_path) == hashlib.sha256(text.encode()).hexdigest()[:12]
    before = readers.fingerprint(tmp_path)
    os.rename(tmp_path / "b" / "x.png", tmp_path / "b" / "y.png")  # same size and time, another name
    assert readers.fingerprint(tmp_path) != before


def test_the_fingerprint_follows_linked_folders_and_leaves_out_hidden_files_broken_links_and_the_cache(
    tmp_path,
):
    release = tmp_path / "release"
    (release / "Imgs").mkdir(parents=True)
    (release / "Imgs" / "1.jpg").write_bytes(b"12345")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "Dataset").symlink_to(release)  # a manual_dir holding only a link to the release
    (linked / "loop").symlink_to(linked)  # a link back up the tree is read once
    before = readers.fingerprint(linked)
    stat = (release / "Imgs" / "1.jpg").stat()
    expected = f"Dataset/Imgs/1.jpg\0{stat.st_size}\0{stat.st_mtime_ns}\n"
    assert before == hashlib.sha256(expected.encode()).hexdigest()[:12]
    (release / "Imgs" / "1.jpg").write_bytes(b"54321 edited")  # an edit behind the link shows
    assert readers.fingerprint(linked) != before
    before = readers.fingerprint(linked)
    (linked / ".#train.txt").symlink_to(tmp_path / "gone")  # an editor's lock: a broken link, hidden
    (linked / ".DS_Store").write_bytes(b"x")
    (linked / "broken.png").symlink_to(tmp_path / "gone")
    (linked / "prepared" / "semiseg-1").mkdir(parents=True)  # data.data_dir kept inside manual_dir
    (linked / "prepared" / "semiseg-1" / "data.array_record").write_bytes(b"built")
    assert readers.fingerprint(linked, skipped=[str(linked / "prepared"), ""]) == before
