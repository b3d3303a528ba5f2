"""Volumes for prediction one function at a time (rdunet_jax/volumes.py): what a path is, the mask file's
header and bytes, a volume's and its expert mask's refusals in whole, the Hounsfield-unit check at its
edges, and slices turned to the model and back. Whole prediction runs are in test_predict.py."""

import gzip

import nibabel
import numpy as np
import pytest
from helpers import refusal, save_nifti

from rdunet_jax import orientation, volumes


def test_input_kind_of_each_path(tmp_path):
    (tmp_path / "series").mkdir()
    assert volumes.input_kind(tmp_path / "series") == "dicom"
    kinds = {
        "a.nii.gz": "nifti",
        "A.NII.GZ": "nifti",
        "b.nii": "nifti",
        "c.PNG": "image",
        "d.jpeg": "image",
        "e.Jpg": "image",
        "f.dcm": None,
        "g.nii.gz.txt": None,
        "h.gz": None,
    }
    assert {name: volumes.input_kind(tmp_path / name) for name in kinds} == kinds


# --- The mask file --------------------------------------------------------------------------------------


def source_header(header_class):
    """A scanner's header: a 4-D single-frame shape, anisotropic voxels, mm/ms, distinct qform and sform."""
    header = header_class()
    header.set_data_shape((4, 3, 2, 1))
    header.set_zooms((0.7, 0.8, 2.5, 1.0))
    header.set_xyzt_units("mm", "msec")
    header.set_qform(np.diag([-0.7, -0.8, 2.5, 1.0]), code=1)
    sform = np.diag([0.7, 0.8, 2.5, 1.0])
    sform[:3, 3] = (-10.0, 20.0, -300.0)
    header.set_sform(sform, code=2)
    return header


@pytest.mark.parametrize(
    "name, header_class, compressed",
    [("case_mask.nii.gz", nibabel.Nifti1Header, True), ("case_mask.NII", nibabel.Nifti2Header, False)],
)
def test_the_mask_file_has_the_source_geometry_and_its_slices_in_order(
    tmp_path, name, header_class, compressed
):
    source = source_header(header_class)
    path = tmp_path / name
    slices = [np.arange(12, dtype=np.uint8).reshape(4, 3) + 12 * index for index in range(2)]
    with volumes.nifti_mask_writer(path, source, (4, 3, 2)) as write:
        for mask_slice in slices:
            write(mask_slice.astype(np.int64))  # written as uint8 whatever it comes as
    written = nibabel.load(path)
    assert type(written.header) is header_class  # NIfTI-2 stays NIfTI-2
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.stack(slices, axis=2))
    assert written.get_data_dtype() == np.uint8 and written.shape == (4, 3, 2)
    assert written.header.get_zooms() == pytest.approx((0.7, 0.8, 2.5))
    assert written.header.get_xyzt_units() == ("mm", "msec")
    for form in ("qform", "sform"):
        stored, code = getattr(written.header, f"get_{form}")(coded=True)
        expected, expected_code = getattr(source, f"get_{form}")(coded=True)
        np.testing.assert_allclose(stored, expected, atol=1e-5)
        assert code == expected_code
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" if compressed else raw[:2] != b"\x1f\x8b"
    if compressed:
        # No file name (flags 0) and no time in the gzip header: the same mask gives the same bytes.
        assert raw[3] == 0 and raw[4:8] == bytes(4)
        assert len(gzip.decompress(raw)) == 352 + 24  # NIfTI-1's header and extension flag, then the voxels
    else:
        assert len(raw) == 544 + 24  # NIfTI-2's header and extension flag, then the voxels


# --- Opening a volume and its expert mask ---------------------------------------------------------------


def test_a_file_nibabel_cannot_read_is_one_line_in_its_words(tmp_path):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"not a volume" * 40)
    with pytest.raises(Exception) as raised:  # the trusted reader's own words
        nibabel.load(path)
    error = raised.value
    expected = f"{path}: corrupt or unreadable NIfTI file ({type(error).__name__}: {error})"
    assert refusal(volumes.open_volume, path) == expected


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 2, 2), (4, 3, 0), (0, 3, 2, 1)])
def test_only_3d_or_single_frame_volumes_with_voxels_are_opened(tmp_path, shape):
    path = save_nifti(tmp_path / "ct.nii", np.zeros(shape, np.int16))
    expected = f"{path}: expected a 3-D volume (x, y, slices), got an array of shape {shape}"
    assert refusal(volumes.open_volume, path) == expected


def test_single_frame_4d_volumes_open_and_give_their_slices(tmp_path):
    volume = np.arange(24, dtype=np.int16).reshape(4, 3, 2, 1) - 1000
    image = volumes.open_volume(save_nifti(tmp_path / "ct.nii", volume))
    for index in range(2):
        slice_ = volumes.volume_slice(image, index, tmp_path / "ct.nii")
        assert slice_.dtype == np.float32
        np.testing.assert_array_equal(slice_, volume[:, :, index, 0])


def test_an_uncompressed_file_shorter_than_its_voxels_is_refused_with_both_sizes(tmp_path):
    path = save_nifti(tmp_path / "ct.nii", np.zeros((4, 3, 2), np.int16))
    assert path.stat().st_size == 352 + 4 * 3 * 2 * 2  # header, extension flag, 24 int16 voxels
    assert volumes.open_volume(path).shape == (4, 3, 2)  # exactly long enough
    path.write_bytes(path.read_bytes()[:-1])
    expected = f"{path}: truncated NIfTI file (399 bytes, its header needs 400)"
    assert refusal(volumes.open_volume, path) == expected


def test_a_cut_gzip_volume_opens_and_names_the_slice_it_cannot_read(tmp_path):
    volume = np.random.default_rng(0).integers(-1000, 400, (64, 64, 6)).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", volume)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    image = volumes.open_volume(path, keep_file_open=False)
    np.testing.assert_array_equal(volumes.volume_slice(image, 0, path), volume[:, :, 0])
    with pytest.raises(volumes.READ_ERRORS) as raised:  # what reading the same slice raises
        np.asarray(nibabel.load(path).dataobj[:, :, 5])
    error = raised.value
    expected = (
        f"{path}: corrupt or truncated NIfTI file, slice 5 unreadable ({type(error).__name__}: {error})"
    )
    assert refusal(volumes.volume_slice, image, 5, path) == expected


def test_an_expert_mask_of_another_shape_names_both_files(tmp_path):
    image = save_nifti(tmp_path / "ct.nii", np.zeros((4, 3, 2), np.int16))
    truth = save_nifti(tmp_path / "truth.nii", np.zeros((4, 3, 1), np.uint8))
    expected = f"--ground_truth: {truth} has shape (4, 3, 1), {image} (4, 3, 2)"
    assert refusal(volumes.open_volume_pair, image, truth) == expected
    opened, no_truth = volumes.open_volume_pair(image, None)
    assert opened.shape == (4, 3, 2) and no_truth is None


# --- The units check ------------------------------------------------------------------------------------


def test_units_check_samples_nine_slices_evenly_by_hand():
    assert volumes.sampled_slice_indices(1) == [0]
    assert volumes.sampled_slice_indices(2) == [0, 1]
    assert volumes.sampled_slice_indices(9) == list(range(9))
    # 0 to 9 in eight equal steps of 1.125, rounded half to even: 4.5 -> 4.
    assert volumes.sampled_slice_indices(10) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    # 0 to 99 in steps of 12.375: 24.75 -> 25, 49.5 -> 50, 86.625 -> 87.
    assert volumes.sampled_slice_indices(100) == [0, 12, 25, 37, 50, 62, 74, 87, 99]


def units_volume(tmp_path, values, num_slices=1, name="ct.nii"):
    """A (10, 10, num_slices) volume, each slice holding the 100 `values`."""
    volume = np.repeat(np.asarray(values, np.float32).reshape(10, 10, 1), num_slices, axis=2)
    path = save_nifti(tmp_path / name, volume)
    return volumes.open_volume(path), path


@pytest.mark.parametrize("air, passes", [(-800.0, True), (-799.0, False)])
def test_hounsfield_units_need_the_darkest_percent_at_or_below_minus_800(tmp_path, air, passes):
    # Two voxels of 100 at `air`, the rest soft tissue: numpy's 1st percentile lies between the two darkest.
    image, path = units_volume(tmp_path, [air, air] + [40.0] * 98)
    if passes:
        assert volumes.display_scale(image, path, "hu") is None
        return
    assert refusal(volumes.display_scale, image, path, "hu") == (
        f"{path}: values do not look like CT in Hounsfield units (no air near -1000: the darkest 1% of the "
        "sampled voxels reach down only to -799, not -800; range [-799, 40]); pass --input_units display "
        "for already-windowed images"
    )


def test_one_dark_voxel_in_a_hundred_is_not_air(tmp_path):
    # numpy's 1st percentile of 100 values lies 0.99 of the way from the darkest value to the next: one voxel
    # at -1000 among 99 at 40 gives -1000 + 0.99 * 1040 = 29.6.
    image, path = units_volume(tmp_path, [-1000.0] + [40.0] * 99)
    message = refusal(volumes.display_scale, image, path, "hu")
    assert "reach down only to 29.6, not -800; range [-1000, 40])" in message


@pytest.mark.parametrize(
    "low, high, scale", [(0.0, 1.0, 255.0), (0.0, 1.5, 1.0), (0.0, 255.0, 1.0), (0.2, 0.6, 255.0)]
)
def test_display_units_scale_zero_to_one_images_by_255_and_keep_zero_to_255(tmp_path, low, high, scale):
    image, path = units_volume(tmp_path, np.linspace(low, high, 100))
    assert volumes.display_scale(image, path, "display") == scale


@pytest.mark.parametrize("low, high", [(-0.5, 3.0), (0.0, 255.5)])
def test_display_units_refuse_values_outside_zero_to_255(tmp_path, low, high):
    image, path = units_volume(tmp_path, np.linspace(low, high, 100))
    assert refusal(volumes.display_scale, image, path, "display") == (
        f"--input_units display: {path} holds values in [{low:g}, {high:g}], "
        "not display intensities in [0, 255] or [0, 1]"
    )


def test_units_check_reads_only_the_sampled_slices(tmp_path):
    # 20 slices: sampled 0, 2, 5, 7, 10, 12, 14, 17, 19 (9.5 -> 10). A value out of range elsewhere passes.
    volume = np.full((10, 10, 20), 100.0, np.float32)
    volume[0, 0, 1] = 300.0
    path = save_nifti(tmp_path / "display.nii", volume)
    assert volumes.display_scale(volumes.open_volume(path), path, "display") == 1.0
    volume[0, 0, 19] = 300.0
    path = save_nifti(tmp_path / "display.nii", volume)
    assert "holds values in [100, 300]" in refusal(
        volumes.display_scale, volumes.open_volume(path), path, "display"
    )


def test_display_slices_round_half_to_even_and_clip_to_uint8():
    values = np.array([[-3.0, 0.4, 0.5, 1.5], [254.5, 255.4, 300.0, 127.5]], np.float32)
    expected = np.array([[0, 0, 0, 2], [254, 255, 255, 128]], np.uint8)
    result = volumes.display_slice(values, 1.0)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(volumes.display_slice(np.array([0.5, 1.0]), 255.0), [128, 255])


# --- Slices turned to the model and back ----------------------------------------------------------------

SAGITTAL = np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])  # stored axis 0: superior


@pytest.mark.parametrize("affine, per_slice, num_slices", [(np.eye(4), True, 4), (SAGITTAL, False, 6)])
def test_slices_written_back_land_on_the_voxels_they_were_read_from(tmp_path, affine, per_slice, num_slices):
    volume = np.random.default_rng(1).integers(-1000, 400, (6, 5, 4)).astype(np.int16)
    image_path = save_nifti(tmp_path / "ct.nii", volume, affine)
    truth_path = save_nifti(tmp_path / "truth.nii", (volume > 0).astype(np.uint8), affine)
    image, truth = volumes.open_volume_pair(image_path, truth_path)
    layout = orientation.volume_layout(image.affine, "PL")
    assert layout.per_slice is per_slice
    slices = volumes.VolumeSlices(image, truth, image_path, truth_path, layout)
    assert slices.num_slices == num_slices  # along the stored axis nearest superior-inferior
    other_axes = sorted(size for axis, size in enumerate(volume.shape) if axis != (2 if per_slice else 0))
    with slices.mask_writer(tmp_path / "mask.nii") as write:
        for index in range(num_slices):
            model_slice = slices.image_slice(index)
            assert sorted(model_slice.shape) == other_axes  # one 2-D slice, not a stack
            np.testing.assert_array_equal(slices.truth_slice(index), model_slice > 0)
            write(index, model_slice > 0)
    assert (tmp_path / "mask.nii").stat().st_size == 352 + volume.size  # the header and one byte a voxel
    written = nibabel.load(tmp_path / "mask.nii")
    np.testing.assert_array_equal(np.asarray(written.dataobj), volume > 0)
    np.testing.assert_allclose(written.affine, affine)


def cut_volume(path, affine):
    """A .nii.gz of 6 noisy slices cut in half: its first slices read, its last do not."""
    volume = np.random.default_rng(2).integers(-1000, 400, (64, 60, 6)).astype(np.int16)
    save_nifti(path, volume, affine)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("affine", [np.eye(4), SAGITTAL])
@pytest.mark.parametrize("cut", ["image", "truth"])
def test_a_cut_volume_or_mask_read_through_its_slices_is_named(tmp_path, affine, cut):
    good = save_nifti(tmp_path / "good.nii.gz", np.zeros((64, 60, 6), np.int16), affine)
    damaged = cut_volume(tmp_path / "cut.nii.gz", affine)
    image_path, truth_path = (damaged, good) if cut == "image" else (good, damaged)
    image, truth = volumes.open_volume_pair(image_path, truth_path)
    layout = orientation.volume_layout(image.affine, "PL")

    def read_every_slice():
        # Sagittal: the whole volume is read and turned when the slices are made; axial: slice by slice.
        # The cut file holds CT values: as the mask they are labels here, so the read, not them, fails.
        labels = range(-1024, 1025)
        slices = volumes.VolumeSlices(image, truth, image_path, truth_path, layout, truth_labels=labels)
        for index in range(slices.num_slices):
            slices.image_slice(index)
            slices.truth_slice(index)

    message = refusal(read_every_slice)
    assert message.startswith(f"{damaged}: corrupt or truncated NIfTI file, slice ")


def test_a_volume_and_its_mask_are_each_opened_once_for_all_their_slices(tmp_path, monkeypatch):
    import nibabel.openers

    volume = np.random.default_rng(3).integers(-1000, 400, (16, 16, 5)).astype(np.int16)
    image_path = save_nifti(tmp_path / "ct.nii.gz", volume)
    truth_path = save_nifti(tmp_path / "truth.nii.gz", (volume > 0).astype(np.uint8))
    opened = []

    class CountingOpener(nibabel.openers.ImageOpener):
        def __init__(self, *args, **kwargs):
            opened.append(str(args[0]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(nibabel.openers, "ImageOpener", CountingOpener)
    image, truth = volumes.open_volume_pair(image_path, truth_path)
    opened.clear()  # reading the headers
    for index in range(5):
        volumes.volume_slice(image, index, image_path)
        volumes.volume_slice(truth, index, truth_path)
    # A .nii.gz reopened for each slice is decompressed from its start each time.
    assert sorted(opened) == sorted([str(image_path), str(truth_path)])
    opened.clear()
    single = volumes.open_volume(image_path)
    for index in range(5):
        volumes.volume_slice(single, index, image_path)
    assert opened == [str(image_path)]
    # Prediction's check of a folder's inputs opens each without keeping it open: then each read opens it.
    image, truth = volumes.open_volume_pair(image_path, truth_path, keep_file_open=False)
    opened.clear()
    for index in range(5):
        volumes.volume_slice(image, index, image_path)
        volumes.volume_slice(truth, index, truth_path)
    assert sorted(opened) == sorted([str(image_path), str(truth_path)] * 5)
