"""DICOM CT series in: slices ordered by position (not file name or InstanceNumber), Hounsfield units from
the rescale, the same mask in world coordinates as the NIfTI of the same volume, and one-line errors
for folders and files that cannot be read as one CT series."""

import re

import nibabel
import numpy as np
import pytest
from helpers import (
    CANONICAL_AFFINE,
    EXACT_WINDOW,
    ImagePredictor,
    IntensityClassPredictor,
    class_phantom,
    in_canonical_voxels,
    make_tiny_config,
    real_display_slices,
    refusal,
)
from PIL import Image

from rdunet_jax import inference, predict, volumes
from rdunet_jax.errors import UserError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG2MPML,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

# Standard axial: along a row (columns) toward the patient's left, down a column (rows) toward posterior.
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
RESCALE_INTERCEPT = -1024.0
STUDY_UID, FRAME_UID = generate_uid(), generate_uid()


def _ct_file(path, pixels_hu, orientation, position, spacing, series_uid, instance, modality="CT"):
    """One single-frame CT image: stored values = HU - RescaleIntercept (uint16), explicit VR LE."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = Dataset()
    data.file_meta = meta
    data.SOPClassUID, data.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    data.Modality, data.Manufacturer = modality, "test"
    data.PatientName, data.PatientID, data.PatientBirthDate, data.PatientSex = "Test^Phantom", "P1", "", "O"
    data.StudyInstanceUID, data.SeriesInstanceUID, data.FrameOfReferenceUID = STUDY_UID, series_uid, FRAME_UID
    data.StudyID, data.StudyDate, data.StudyTime, data.AccessionNumber = "1", "20200101", "120000", ""
    data.ReferringPhysicianName, data.SeriesNumber, data.InstanceNumber = "", 1, instance
    data.SeriesDescription = f"series {series_uid[-6:]}"
    data.ImageOrientationPatient = [float(value) for value in orientation]
    data.ImagePositionPatient = [float(value) for value in position]
    data.PixelSpacing, data.SliceThickness = [float(value) for value in spacing], 2.5
    data.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    data.Rows, data.Columns = pixels_hu.shape
    data.SamplesPerPixel, data.PhotometricInterpretation = 1, "MONOCHROME2"
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
    data.RescaleIntercept, data.RescaleSlope, data.RescaleType = RESCALE_INTERCEPT, 1.0, "HU"
    data.PixelData = np.asarray(pixels_hu - RESCALE_INTERCEPT, np.uint16).tobytes()
    data.save_as(path, enforce_file_format=True)


def write_series(
    folder,
    hu_slices,
    orientation=AXIAL,
    origin=(-100.0, -60.0, -200.0),
    spacing=(0.8, 0.7),
    step=2.5,
    series_uid=None,
    order=None,
    modality="CT",
):
    """A CT series of the (rows, columns, n) pixel arrays in Hounsfield units, slice k at `origin` + k
    `step` along the normal; files named and numbered in a shuffled `order` (default: reversed)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    count = hu_slices.shape[2]
    order = list(range(count))[::-1] if order is None else order
    normal = np.cross(orientation[:3], orientation[3:])
    for rank, index in enumerate(order):
        position = np.asarray(origin) + index * step * normal
        _ct_file(
            folder / f"img{rank:03d}.dcm",
            hu_slices[:, :, index],
            orientation,
            position,
            spacing,
            series_uid,
            instance=(7 * rank) % count + 1,
            modality=modality,
        )
    return series_uid


def _phantom_hu(shape=(40, 48, 4)):
    """Air-filled lungs with a bright box that moves with the slice: HU, (rows, columns, slices)."""
    volume = np.full(shape, -950.0, np.float32)
    for index in range(shape[2]):
        volume[5 + 3 * index : 20 + 3 * index, 4 : 18 + index, index] = 60.0
    return volume


# --- Reading a series -------------------------------------------------------------------------------------


def test_a_series_is_ordered_by_position_and_read_in_hounsfield_units(tmp_path):
    from rdunet_jax import dicom

    volume = _phantom_hu()
    write_series(tmp_path / "series", volume, order=[2, 0, 3, 1])
    image = dicom.open_series(tmp_path / "series")
    # Voxel order (column, row, slice): slice k is pixel array k transposed, slices by position.
    assert image.shape == (48, 40, 4)
    for index in range(4):
        np.testing.assert_array_equal(np.asarray(image.dataobj[:, :, index]), volume[:, :, index].T)
    # By hand: column i -> LPS x + 0.7 i (RAS -x), row j -> LPS y + 0.8 j (RAS -y), slice k -> z + 2.5 k.
    expected = np.array([[-0.7, 0, 0, 100.0], [0, -0.8, 0, 60.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-6)
    assert image.header.get_zooms() == pytest.approx((0.7, 0.8, 2.5))
    assert image.dicom_geometry.zooms == pytest.approx((0.7, 0.8, 2.5))  # (column, row, slice) as well
    # What a viewer places a mask by: millimetres, and both transforms in scanner coordinates (code 1).
    assert_scanner_header(image.header, expected)


def assert_scanner_header(header, affine):
    """`header` is in millimetres with its qform and sform `affine`, each coded 1 (scanner)."""
    assert header.get_xyzt_units() == ("mm", "sec")
    for transform, code in (header.get_qform(coded=True), header.get_sform(coded=True)):
        assert code == 1
        np.testing.assert_allclose(transform, affine, atol=1e-5)


@pytest.mark.real_data
def test_a_series_gives_the_mask_of_its_nifti_in_world_coordinates(tiny_state, tmp_path):
    config = make_tiny_config(hu_window=EXACT_WINDOW)
    config.eval.num_overlays = 0
    canonical_hu = real_display_slices().astype(np.float32) * 5 - 1000  # (P rows, L columns, S slices)
    rows, columns, count = canonical_hu.shape
    nibabel.save(nibabel.Nifti1Image(canonical_hu.astype(np.int16), CANONICAL_AFFINE), tmp_path / "ref.nii")
    predict.predict_path(
        config, None, tmp_path / "ref.nii", tmp_path / "out", predictor=inference.JaxPredictor(tiny_state)
    )
    reference = np.asarray(nibabel.load(tmp_path / "out" / "ref_mask.nii").dataobj)
    assert 0 < reference.mean() < 1

    # CANONICAL_AFFINE in DICOM terms: rows 0.8 mm toward P, columns 0.7 mm toward L, origin RAS
    # (100, 60, -200) = LPS (-100, -60, -200).
    write_series(tmp_path / "axial", canonical_hu, order=[1, 2, 0])
    # The same slices as images whose rows run toward L and columns toward A: pixels[r, c] is the
    # canonical voxel (rows - 1 - c, r), and pixel (0, 0) sits at the canonical voxel (rows - 1, 0).
    turned = np.stack([canonical_hu[::-1, :, index].T for index in range(count)], axis=2)
    corner = CANONICAL_AFFINE @ np.array([rows - 1, 0, 0, 1.0])
    origin = (-corner[0], -corner[1], corner[2])
    write_series(
        tmp_path / "turned", turned, orientation=(0, -1, 0, 1, 0, 0), origin=origin, spacing=(0.7, 0.8)
    )
    for name in ("axial", "turned"):
        (summary,) = predict.predict_path(
            config, None, tmp_path / name, tmp_path / "out", predictor=inference.JaxPredictor(tiny_state)
        )
        written = nibabel.load(tmp_path / "out" / f"{name}_mask.nii.gz")
        mask = in_canonical_voxels(np.asarray(written.dataobj), written.affine, canonical_hu.shape)
        np.testing.assert_array_equal(mask, reference, err_msg=name)
        assert summary["series_uid"] and (tmp_path / "out" / f"{name}_summary.json").exists()


# --- Refusals and warnings --------------------------------------------------------------------------------


def _directory_file(path):
    """A DICOMDIR-like file: DICOM, but of no series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = Dataset()
    data.file_meta = meta
    data.FileSetID = "TEST"
    data.save_as(path, enforce_file_format=True)


def _refused_before_writing(input_path, output_dir, message) -> str:
    """Predicting `input_path` raises one UserError line matching `message` with nothing written to
    `output_dir`; returns the message."""
    with pytest.raises(UserError, match=message) as error:
        predict.predict_path(make_tiny_config(), None, input_path, output_dir, predictor=ImagePredictor(1))
    assert "\n" not in str(error.value)
    assert not output_dir.exists()
    return str(error.value)


def test_several_series_need_one_chosen(tmp_path, monkeypatch):
    first = write_series(tmp_path / "study" / "a", _phantom_hu())
    second = write_series(tmp_path / "study" / "b", _phantom_hu((40, 48, 3)))
    _directory_file(tmp_path / "study" / "DICOMDIR")  # not a third series
    error = _refused_before_writing(
        tmp_path / "study", tmp_path / "out", "holds 2 DICOM series, choose one with --series"
    )
    # Each series by UID (sorted), its description (or that it has none) and its number of files.
    data = pydicom.dcmread(tmp_path / "study" / "b" / "img000.dcm")
    del data.SeriesDescription
    data.save_as(tmp_path / "study" / "b" / "img000.dcm")
    described = {
        first: f"{first} (series {first[-6:]}, 4 files)",
        second: f"{second} (no description, 3 files)",
    }
    error = _refused_before_writing(tmp_path / "study", tmp_path / "out", "holds 2 DICOM series")
    assert error == (
        f"--input: {tmp_path / 'study'} holds 2 DICOM series, choose one with --series: "
        + "; ".join(described[uid] for uid in sorted(described))
    )
    with pytest.raises(UserError) as unknown:
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "study",
            tmp_path / "out",
            predictor=ImagePredictor(1),
            series="1.2.3",
        )
    assert str(unknown.value) == (
        f"--series: no series 1.2.3 in {tmp_path / 'study'}; it holds {', '.join(sorted(described))}"
    )
    assert not (tmp_path / "out").exists()
    (summary,) = predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "study",
        tmp_path / "out",
        predictor=ImagePredictor(1),
        series=second,
    )
    assert summary["series_uid"] == second and summary["num_slices"] == 3


def test_the_folder_scan_reads_dicom_files_at_any_depth_and_skips_the_rest(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "study" / "a", _phantom_hu(), order=[0, 1, 2, 3])
    image = (tmp_path / "study" / "a" / "img000.dcm").read_bytes()
    (tmp_path / "study" / ".hidden.dcm").write_bytes(image)  # hidden: skipped
    (tmp_path / "study" / "NOTES.TXT").write_bytes(image)  # a skipped suffix in capitals: skipped unread
    (tmp_path / "study" / "readme").write_bytes(b"not DICOM")  # no DICM marker at byte 128
    _directory_file(tmp_path / "study" / "DICOMDIR")
    expected = [
        tmp_path / "study" / "DICOMDIR",
        *(tmp_path / "study" / "a" / f"img00{k}.dcm" for k in range(4)),
    ]
    assert dicom.dicom_files(tmp_path / "study") == sorted(expected)
    # A path that cannot be opened (absent, or a folder) is not a DICOM file, and not an error.
    assert not dicom.is_dicom_file(tmp_path / "study" / "absent.dcm")
    assert not dicom.is_dicom_file(tmp_path / "study" / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as raised:
        dicom.find_series(tmp_path / "empty")
    assert str(raised.value) == f"--input: {tmp_path / 'empty'} holds no DICOM series"


def test_a_missing_slice_is_warned_and_the_series_still_read(tmp_path, monkeypatch, capsys):
    volume = _phantom_hu((40, 48, 5))
    write_series(tmp_path / "gap", volume, order=[0, 1, 2, 3, 4])
    (tmp_path / "gap" / "img003.dcm").unlink()  # the slice at index 3
    (summary,) = predict.predict_path(
        make_tiny_config(), None, tmp_path / "gap", tmp_path / "out", predictor=ImagePredictor(1)
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'gap' / 'img004.dcm'}: 5 mm from img002.dcm, the series steps 2.5 mm "
        "(1 missing slice(s)?)"
    ]
    assert summary["num_slices"] == 4


def _moved(path, along_normal_mm):
    data = pydicom.dcmread(path)
    data.ImagePositionPatient = [
        *data.ImagePositionPatient[:2],
        float(data.ImagePositionPatient[2]) + along_normal_mm,
    ]
    data.save_as(path)


def _shifted_in_plane(folder, count, rows_mm_per_slice):
    """File k (slice k) of an axial series moved k x `rows_mm_per_slice` along y: a tilted gantry's drift."""
    for index in range(count):
        data = pydicom.dcmread(folder / f"img{index:03d}.dcm")
        x, y, z = (float(value) for value in data.ImagePositionPatient)
        data.ImagePositionPatient = [x, y + index * rows_mm_per_slice, z]
        data.save_as(folder / f"img{index:03d}.dcm")


def test_an_output_folder_inside_a_series_folder_is_refused(tmp_path):
    # A series folder is read at any depth: a rerun would find the SEG written there among the CT files.
    write_series(tmp_path / "series", _phantom_hu())
    with pytest.raises(UserError) as refused:
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "series",
            tmp_path / "series" / "out",
            predictor=ImagePredictor(),
        )
    assert str(refused.value).startswith(
        f"--output: {tmp_path / 'series' / 'out'} is inside the input folder"
    )
    assert not (tmp_path / "series" / "out").exists()


def test_a_series_folder_with_an_image_beside_it_is_refused_naming_both(tmp_path):
    # It segmented the preview alone, saying "1 image(s)", and ignored the series.
    write_series(tmp_path / "series", _phantom_hu())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "series" / "preview.jpg")
    with pytest.raises(UserError) as refused:
        predict.predict_path(
            make_tiny_config(), None, tmp_path / "series", tmp_path / "out", predictor=ImagePredictor()
        )
    assert str(refused.value) == (
        f"--input: {tmp_path / 'series'} holds DICOM files (img000.dcm) beside NIfTI/PNG/JPEG files "
        "(preview.jpg); give a folder of the DICOM series alone, or of the other files alone"
    )
    assert not (tmp_path / "out").exists()
    # Files that are no series (notes, a DICOMDIR, a hidden or .txt copy of a DICOM file) and a series one
    # folder down do not make a folder of images another input.
    (tmp_path / "slices").mkdir()
    (tmp_path / "series" / "preview.jpg").rename(tmp_path / "slices" / "preview.jpg")
    (tmp_path / "slices" / "notes.txt").write_text("scanner export")
    _directory_file(tmp_path / "slices" / "DICOMDIR")
    for copy in (".img000.dcm", "img000.dcm.txt"):
        (tmp_path / "slices" / copy).write_bytes((tmp_path / "series" / "img000.dcm").read_bytes())
    write_series(tmp_path / "slices" / "series", _phantom_hu())
    predict.predict_path(
        make_tiny_config(), None, tmp_path / "slices", tmp_path / "out", predictor=ImagePredictor()
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "preview_mask.png",
        "preview_overlay.png",
    ]


def test_a_tilted_series_is_warned_that_its_nifti_affine_leaves_the_tilt_out(tmp_path):
    from rdunet_jax import dicom

    # 7 slices 2.5 mm apart along z, each 2.5 tan(20 deg) mm further along y: 5.46 mm of drift in all.
    write_series(tmp_path / "tilted", _phantom_hu((40, 48, 7)), order=list(range(7)))
    _shifted_in_plane(tmp_path / "tilted", 7, 2.5 * np.tan(np.radians(20.0)))
    (warning,) = dicom.open_series(tmp_path / "tilted").dicom_geometry.warnings
    assert warning.startswith(
        f"{tmp_path / 'tilted' / 'img006.dcm'}: the series is tilted 20.0 degrees (gantry tilt): its slices "
        "drift 5.5 mm in plane from the first to the last"
    )
    # 0.3 mm in all: under half of the 0.7 mm pixel, no warning.
    write_series(tmp_path / "straight", _phantom_hu((40, 48, 7)), order=list(range(7)))
    _shifted_in_plane(tmp_path / "straight", 7, 0.05)
    assert dicom.open_series(tmp_path / "straight").dicom_geometry.warnings == []


def test_uneven_steps_beyond_a_tenth_are_warned_and_duplicate_positions_refused(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "uneven", _phantom_hu((40, 48, 7)), order=list(range(7)))
    _moved(tmp_path / "uneven" / "img002.dcm", 0.2)  # steps 2.7 and 2.3: within a tenth of 2.5, no warning
    _moved(tmp_path / "uneven" / "img006.dcm", -1.5)  # 1 mm after img005: fewer than one step
    geometry = dicom.open_series(tmp_path / "uneven").dicom_geometry
    assert geometry.warnings == [
        f"{tmp_path / 'uneven' / 'img006.dcm'}: 1 mm from img005.dcm, the series steps 2.5 mm "
        "(uneven spacing)"
    ]
    # Exactly a tenth of the step off (2.75 and 2.25 mm, exact in binary) is still within it.
    write_series(tmp_path / "tenth", _phantom_hu((40, 48, 7)), order=list(range(7)))
    _moved(tmp_path / "tenth" / "img002.dcm", 0.25)
    assert dicom.open_series(tmp_path / "tenth").dicom_geometry.warnings == []
    write_series(tmp_path / "twice", _phantom_hu(), order=[0, 1, 2, 3])
    (tmp_path / "twice" / "img004.dcm").write_bytes((tmp_path / "twice" / "img001.dcm").read_bytes())
    with pytest.raises(UserError) as raised:
        dicom.open_series(tmp_path / "twice")
    assert str(raised.value) == f"{tmp_path / 'twice' / 'img004.dcm'}: same slice position as img001.dcm"
    # Two files at one position keep their path order whatever the others' (a stable sort): files in
    # reverse order, img002 a copy of img001. NumPy's default sort named img001 after img002 here.
    write_series(tmp_path / "twice_reversed", _phantom_hu((40, 48, 5)))
    (tmp_path / "twice_reversed" / "img002.dcm").write_bytes(
        (tmp_path / "twice_reversed" / "img001.dcm").read_bytes()
    )
    with pytest.raises(UserError) as raised:
        dicom.open_series(tmp_path / "twice_reversed")
    assert (
        str(raised.value)
        == f"{tmp_path / 'twice_reversed' / 'img002.dcm'}: same slice position as img001.dcm"
    )


def test_a_single_slice_takes_its_slice_thickness_as_the_step(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "one", _phantom_hu((40, 48, 1)))  # SliceThickness 2.5
    assert dicom.open_series(tmp_path / "one").header.get_zooms() == pytest.approx((0.7, 0.8, 2.5))
    _without(tmp_path / "one", ("SliceThickness",))  # absent, then present and empty: 1 mm
    assert dicom.open_series(tmp_path / "one").header.get_zooms() == pytest.approx((0.7, 0.8, 1.0))
    data = pydicom.dcmread(tmp_path / "one" / "img000.dcm")
    data.SliceThickness = None
    data.save_as(tmp_path / "one" / "img000.dcm")
    assert dicom.open_series(tmp_path / "one").header.get_zooms() == pytest.approx((0.7, 0.8, 1.0))


def _rescaled(path, stored, slope, intercept):
    """File `path` rewritten to hold the `stored` (rows, columns) values with this rescale (None: absent;
    '': present and empty)."""
    data = pydicom.dcmread(path)
    for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value is None:
            delattr(data, keyword)
        else:
            setattr(data, keyword, None if value == "" else value)
    data.PixelData = np.asarray(stored, np.uint16).tobytes()
    data.save_as(path)


@pytest.mark.filterwarnings("ignore:A value of 'None' for .*'Number of Frames' is invalid")  # pydicom's
def test_each_files_rescale_gives_hounsfield_units_in_float32(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "series", _phantom_hu(), order=[0, 1, 2, 3])  # img00k is slice k
    stored = np.arange(40 * 48).reshape(40, 48) % 700
    # (slope, intercept) per slice and the Hounsfield units by hand: HU = slope x stored + intercept, with
    # slope 1 and intercept 0 where a file leaves them out or empty.
    rescales = [(2.5, -1000.0), (None, None), ("", ""), (0.5, -1024.5)]
    expected = [2.5 * stored - 1000.0, stored, stored, 0.5 * stored - 1024.5]
    for index, (slope, intercept) in enumerate(rescales):
        _rescaled(tmp_path / "series" / f"img{index:03d}.dcm", stored, slope, intercept)
    data = pydicom.dcmread(tmp_path / "series" / "img003.dcm")
    data.NumberOfFrames = None  # present and empty: one frame, as some exporters write it
    data.save_as(tmp_path / "series" / "img003.dcm")
    proxy = dicom.open_series(tmp_path / "series").dataobj
    assert (proxy.shape, proxy.ndim, proxy.dtype) == ((48, 40, 4), 3, np.float32)
    for index, hounsfield in enumerate(expected):
        read = proxy[:, :, index]
        assert read.dtype == np.float32
        np.testing.assert_array_equal(read, hounsfield.T, err_msg=f"slice {index}")
    whole = np.asarray(proxy)  # every slice at once, as nibabel's get_fdata reads it
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(whole, np.stack(expected, axis=2).transpose(1, 0, 2))
    # nibabel's slicers: a range of slices, an index of the first axis alone, a negative slice index.
    np.testing.assert_array_equal(proxy[:, :, 1:3], whole[:, :, 1:3])
    np.testing.assert_array_equal(proxy[5:9], whole[5:9])
    np.testing.assert_array_equal(proxy[:, 2:4, -1], whole[:, 2:4, -1])


def test_a_compressed_series_that_pydicom_decodes_reads_as_the_uncompressed_one(tmp_path):
    from rdunet_jax import dicom

    volume = _phantom_hu()
    write_series(tmp_path / "series", volume, order=[0, 1, 2, 3])
    for path in (tmp_path / "series").iterdir():  # RLE Lossless: encapsulated, of undefined length
        data = pydicom.dcmread(path)
        data.compress(RLELossless)
        data.save_as(path)
    proxy = dicom.open_series(tmp_path / "series").dataobj
    np.testing.assert_array_equal(np.asarray(proxy), volume.transpose(1, 0, 2))


def test_pixels_that_cannot_be_decoded_are_one_line_naming_the_file_and_the_reason(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "series", _phantom_hu(), order=[0, 1, 2, 3])
    data = pydicom.dcmread(tmp_path / "series" / "img001.dcm")
    data.BitsAllocated, data.BitsStored, data.HighBit = 32, 32, 31  # half the bytes it now needs
    data.save_as(tmp_path / "series" / "img001.dcm")
    proxy = dicom.open_series(tmp_path / "series").dataobj
    with pytest.raises(UserError) as raised:
        proxy[:, :, 1]
    assert re.fullmatch(
        r".*img001\.dcm: corrupt or truncated DICOM file, pixels unreadable \(ValueError: .+\)",
        str(raised.value),
        flags=re.DOTALL,
    ), str(raised.value)


def _mixed_orientation(folder):
    write_series(folder, _phantom_hu())
    data = pydicom.dcmread(folder / "img002.dcm")
    data.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    data.save_as(folder / "img002.dcm")


def _mixed_spacing(folder):
    write_series(folder, _phantom_hu())
    data = pydicom.dcmread(folder / "img002.dcm")
    data.PixelSpacing = [1.6, 1.4]
    data.save_as(folder / "img002.dcm")


def _not_ct(folder):
    write_series(folder, _phantom_hu())
    data = pydicom.dcmread(folder / "img001.dcm")
    data.Modality = "MR"
    data.save_as(folder / "img001.dcm")


def _truncated(folder):
    write_series(folder, _phantom_hu())
    path = folder / "img002.dcm"
    path.write_bytes(path.read_bytes()[:-200])


def _encapsulated_as(syntax, frame: bytes):
    """A series breaker: img000.dcm's pixel data the encapsulated `frame`, labelled `syntax`."""

    def break_series(folder):
        from pydicom.encaps import encapsulate

        write_series(folder, _phantom_hu())
        data = pydicom.dcmread(folder / "img000.dcm")
        data.file_meta.TransferSyntaxUID = syntax
        data.PixelData = encapsulate([frame])
        data.save_as(folder / "img000.dcm")

    return break_series


def _without_pixels(folder):
    write_series(folder, _phantom_hu())
    data = pydicom.dcmread(folder / "img003.dcm")
    del data.PixelData
    data.save_as(folder / "img003.dcm")


def _without_everywhere(keyword):
    def break_series(folder):
        write_series(folder, _phantom_hu())
        _without(folder, (keyword,))

    return break_series


def _five_direction_cosines(folder):
    write_series(folder, _phantom_hu())
    for path in folder.iterdir():
        data = pydicom.dcmread(path)
        data.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0]
        data.save_as(path)


def _without_modality(folder):
    write_series(folder, _phantom_hu())
    _without_in(folder / "img001.dcm", "Modality")


def _without_rows_in_one(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    _without_in(folder / "img002.dcm", "Rows")


def _with_a_cut_sequence(folder):
    """The series plus a file whose sequence item says 16 bytes and holds 7: pydicom raises reading it."""
    write_series(folder, _phantom_hu())
    meta = b"\x02\x00\x10\x00UI\x14\x00" + ExplicitVRLittleEndian.encode() + b"\x00"
    sequence = (
        b"\x08\x00\x05\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x01" * 7
    )
    (folder / "img004.dcm").write_bytes(b"\x00" * 128 + b"DICM" + meta + sequence)


def _empty_columns_in_one(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    data = pydicom.dcmread(folder / "img002.dcm")
    data.Columns = None  # present, without a value
    data.save_as(folder / "img002.dcm")


def _multi_frame(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    data = pydicom.dcmread(folder / "img001.dcm")
    data.NumberOfFrames = 2
    data.save_as(folder / "img001.dcm")


def _other_columns(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    series_uid = str(pydicom.dcmread(folder / "img000.dcm").SeriesInstanceUID)
    narrower = _phantom_hu((40, 47, 4))[:, :, 2]  # slice 2, one column fewer
    _ct_file(
        folder / "img002.dcm", narrower, AXIAL, (-100.0, -60.0, -195.0), (0.8, 0.7), series_uid, instance=3
    )


def _without_orientation_in_one(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    _without_in(folder / "img002.dcm", "ImageOrientationPatient")


def _without_position_in_one(folder):
    write_series(folder, _phantom_hu(), order=[0, 1, 2, 3])
    _without_in(folder / "img003.dcm", "ImagePositionPatient")


def _without_in(path, *keywords):
    """File `path` rewritten without the attributes `keywords`."""
    data = pydicom.dcmread(path)
    for keyword in keywords:
        delattr(data, keyword)
    data.save_as(path)


def _without_rescale(folder):
    write_series(folder, _phantom_hu())
    for path in sorted(folder.iterdir()):
        data = pydicom.dcmread(path)
        del data.RescaleIntercept, data.RescaleSlope
        data.save_as(path)


@pytest.mark.parametrize(
    "break_series, message",
    [
        (
            _mixed_orientation,
            r"img002.dcm: ImageOrientationPatient \[1.0, 0.0, 0.0, 0.0, 0.0, -1.0\] differs from "
            r"img\d{3}.dcm's \[1.0, 0.0, 0.0, 0.0, 1.0, 0.0\] \(mixed orientations in one series\)$",
        ),
        (
            _mixed_spacing,
            r"img002.dcm: PixelSpacing \[1.6, 1.4\] differs from img\d{3}.dcm's \[0.8, 0.7\] \(mixed pixel "
            r"spacings in one series\)$",
        ),
        (_not_ct, "img001.dcm: modality MR, not CT"),
        (_truncated, r"img002.dcm: truncated DICOM file \(\d+ bytes, its pixel data end at \d+\)"),
        (
            _encapsulated_as(JPEGLosslessSV1, b"\xff\xd8\xff\xc3 not decoded \xff\xd9"),
            r"img000.dcm: pixel data compressed as JPEG Lossless, Non-Hierarchical, First-Order Prediction "
            r"\(Process 14 \[Selection Value 1\]\) \(1.2.840.10008.1.2.4.70\); install a decoder: "
            r"gdcm\b[^;]* or pylibjpeg\b[^;]*$",  # pydicom's list of plugins, joined by ' or '
        ),
        (
            _encapsulated_as(MPEG2MPML, b"not an MPEG-2 stream"),
            r"img000.dcm: pixel data in MPEG2 Main Profile / Main Level \(1.2.840.10008.1.2.4.100\), which "
            r"pydicom cannot decode$",
        ),
        (_without_everywhere("PixelSpacing"), r"/img\d{3}.dcm: DICOM file without PixelSpacing$"),
        (_without_everywhere("Rows"), r"/img\d{3}.dcm: DICOM file without Rows$"),
        (_without_everywhere("Columns"), r"/img\d{3}.dcm: DICOM file without Columns$"),
        (
            _without_everywhere("ImageOrientationPatient"),
            r"/img\d{3}.dcm: DICOM file without ImageOrientationPatient$",
        ),
        (_five_direction_cosines, r"/img\d{3}.dcm: ImageOrientationPatient must hold 6 numbers$"),
        (_without_modality, "img001.dcm: modality missing, not CT$"),
        (_without_rows_in_one, "img002.dcm: DICOM file without Rows$"),
        (_empty_columns_in_one, "img002.dcm: DICOM file without Columns$"),
        (_with_a_cut_sequence, r"img004.dcm: corrupt or unreadable DICOM file \(OSError: No tag to read at"),
        (_other_columns, r"img002.dcm: 40x47 pixels, img\d{3}.dcm \(40, 48\)$"),
        (_multi_frame, "img001.dcm: a multi-frame image; only single-frame CT series are read$"),
        (_without_position_in_one, "img003.dcm: DICOM file without ImagePositionPatient$"),
        (_without_orientation_in_one, "img002.dcm: DICOM file without ImageOrientationPatient$"),
        (_without_pixels, "img003.dcm: DICOM file without pixel data"),
        (_without_rescale, "series: values do not look like CT in Hounsfield units"),
    ],
)
def test_a_series_that_cannot_be_read_is_one_line_naming_the_file_and_nothing_is_written(
    tmp_path, monkeypatch, break_series, message
):
    break_series(tmp_path / "series")
    _refused_before_writing(tmp_path / "series", tmp_path / "out", message)


def test_orientations_and_positions_exactly_the_tolerance_apart_are_one_series_of_distinct_slices(tmp_path):
    from rdunet_jax import dicom

    assert dicom.ORIENTATION_TOLERANCE == 1e-4  # 0.0001 - 0.0 is exactly the float 1e-4
    # One file's row direction tilted by exactly the tolerance: still the series' orientation.
    write_series(tmp_path / "tilted", _phantom_hu(), order=[0, 1, 2, 3])
    data = pydicom.dcmread(tmp_path / "tilted" / "img002.dcm")
    data.ImageOrientationPatient = [1.0, 0.0001, 0.0, 0.0, 1.0, 0.0]
    data.save_as(tmp_path / "tilted" / "img002.dcm")
    assert dicom.open_series(tmp_path / "tilted").shape == (48, 40, 4)
    # Two slices exactly the tolerance apart are two slices, not one position twice.
    write_series(tmp_path / "close", _phantom_hu((40, 48, 2)), origin=(0.0, 0.0, 0.0), step=0.0001)
    assert dicom.open_series(tmp_path / "close").dicom_geometry.zooms[2] == 0.0001


def test_a_decoder_that_lists_no_missing_package_is_refused_asking_for_a_plugin(tmp_path, monkeypatch):
    import types

    import pydicom.pixels

    from rdunet_jax import dicom

    _encapsulated_as(JPEGLosslessSV1, b"\xff\xd8 not decoded \xff\xd9")(tmp_path / "series")
    path = tmp_path / "series" / "img000.dcm"
    unavailable = types.SimpleNamespace(is_available=False, missing_dependencies=[])
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda syntax: unavailable)
    with pytest.raises(UserError) as raised:
        dicom._check_decoder(path, pydicom.dcmread(path))
    assert str(raised.value).endswith("(1.2.840.10008.1.2.4.70); install a decoder: a decoder plugin")


def test_the_completeness_check_passes_over_pixel_data_read_already(tmp_path):
    from rdunet_jax import dicom

    write_series(tmp_path / "series", _phantom_hu())
    path = tmp_path / "series" / "img001.dcm"
    header = pydicom.dcmread(path)
    header.PixelData  # noqa: B018 (read: no offset or length left to check against the file's size)
    dicom._check_complete(path, header)
    deferred = pydicom.dcmread(path, defer_size=1024)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"img001.dcm: truncated DICOM file \(\d+ bytes"):
        dicom._check_complete(path, deferred)


def test_without_highdicom_a_series_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    write_series(tmp_path / "series", _phantom_hu())
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)
    _refused_before_writing(
        tmp_path / "series", tmp_path / "out", r"^--input: writing DICOM SEG needs highdicom, not installed"
    )


def test_without_pydicom_a_series_is_refused_naming_the_extra(tmp_path, monkeypatch):
    write_series(tmp_path / "series", _phantom_hu())
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # `import pydicom` raises ImportError
    with pytest.raises(
        UserError,
        match=r'^--input: reading DICOM needs pydicom, not installed: pip install -e "\.\[dicom\]"$',
    ):
        predict.predict_path(
            make_tiny_config(), None, tmp_path / "series", tmp_path / "out", predictor=ImagePredictor(1)
        )


# --- DICOM SEG out ----------------------------------------------------------------------------------------


def test_the_segmentation_references_the_series_and_reads_back_to_the_mask(tmp_path, monkeypatch):
    import highdicom

    volume = _phantom_hu()
    series_uid = write_series(tmp_path / "series", volume, order=[2, 0, 3, 1])
    (summary,) = predict.predict_path(
        make_tiny_config(), None, tmp_path / "series", tmp_path / "out", predictor=ImagePredictor(1)
    )
    written = nibabel.load(tmp_path / "out" / "series_mask.nii.gz")
    mask = np.asarray(written.dataobj)  # (column, row, slice)
    assert 0 < mask.mean() < 1
    affine = np.array([[-0.7, 0, 0, 100.0], [0, -0.8, 0, 60.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1.0]])
    assert_scanner_header(written.header, affine)  # the mask opens over the series in a viewer
    assert summary["segmentation"] == str(tmp_path / "out" / "series_seg.dcm")

    segmentation = highdicom.seg.segread(tmp_path / "out" / "series_seg.dcm")
    assert segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert summary["series_uid"] == series_uid and segmentation.SoftwareVersions == "1"  # the model's step
    assert segmentation.StudyInstanceUID == STUDY_UID and segmentation.FrameOfReferenceUID == FRAME_UID
    (segment,) = segmentation.SegmentSequence
    assert (
        segment.SegmentLabel == "COVID-19 lesion"
        and segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    )
    # Each source image, found by its own position (not the file order), gets the frame of its slice.
    sources = {}
    for path in (tmp_path / "series").iterdir():
        data = pydicom.dcmread(path, stop_before_pixels=True)
        sources[data.SOPInstanceUID] = round((float(data.ImagePositionPatient[2]) + 200.0) / 2.5)
    uids = sorted(sources)
    frames = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0]
    for uid, frame in zip(uids, frames, strict=True):
        np.testing.assert_array_equal(frame, mask[:, :, sources[uid]].T)
    # And the mask is the stand-in model's: the phantom's bright box, where each slice put it.
    np.testing.assert_array_equal(mask.transpose(1, 0, 2), (volume > 0).astype(np.uint8))


def test_a_series_is_scored_against_a_nifti_mask_in_its_geometry_and_no_other(tmp_path, monkeypatch):
    volume = _phantom_hu()
    write_series(tmp_path / "series", volume)
    # By hand, as in the ordering test: (column, row, slice) voxels, the series' RAS affine.
    affine = np.array([[-0.7, 0, 0, 100.0], [0, -0.8, 0, 60.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1.0]])
    truth = (volume > 0).transpose(1, 0, 2).astype(np.uint8)
    truth[:, :, 3] = 0  # the expert drew no lesion on the last slice
    nibabel.save(nibabel.Nifti1Image(truth, affine), tmp_path / "truth.nii.gz")
    (summary,) = predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "series",
        tmp_path / "out",
        predictor=ImagePredictor(1),
        ground_truth=tmp_path / "truth.nii.gz",
    )
    # The stand-in model predicts every box (volume > 0), the truth holds all but the last.
    predicted = int((volume > 0).sum())
    assert summary["dice_with_ground_truth"] == pytest.approx(2 * truth.sum() / (predicted + truth.sum()))

    moved = affine.copy()
    moved[0, 3] += 5.0  # the same grid 5 mm to the side
    nibabel.save(nibabel.Nifti1Image(truth, moved), tmp_path / "moved.nii.gz")
    for ground_truth, message in (
        (tmp_path / "moved.nii.gz", r"moved.nii.gz is not in the geometry of the series .*series"),
        (tmp_path / "series", r"series\) takes one NIfTI mask in the series' geometry"),
    ):
        with pytest.raises(UserError, match=message):
            predict.predict_path(
                make_tiny_config(),
                None,
                tmp_path / "series",
                tmp_path / "refused",
                predictor=ImagePredictor(1),
                ground_truth=ground_truth,
            )
        assert not (tmp_path / "refused").exists()


def test_a_nifti_mask_within_a_thousandth_of_the_series_affine_is_accepted_and_beyond_refused_in_whole(
    tmp_path,
):
    # An origin with a fourth decimal, to see the message's rounding to three.
    write_series(tmp_path / "series", _phantom_hu(), origin=(-100.1234, -60.0, -200.0))
    affine = np.array([[-0.7, 0, 0, 100.1234], [0, -0.8, 0, 60.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1.0]])
    truth = np.zeros((48, 40, 4), np.uint8)  # (columns, rows, slices)
    for shear, accepted in ((0.0005, True), (0.002, False)):
        # An off-diagonal entry of 0: no relative tolerance helps, only the absolute 1e-3.
        moved = affine.copy()
        moved[0, 1] = shear
        path = tmp_path / f"truth-{shear}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(truth, moved), path)
        if accepted:
            image, opened = volumes.open_volume_pair(tmp_path / "series", path)
            assert opened.shape == image.shape == (48, 40, 4)
            continue
        assert refusal(volumes.open_volume_pair, tmp_path / "series", path) == (
            f"--ground_truth: {path} is not in the geometry of the series {tmp_path / 'series'} (its affine "
            "differs from the input's [[-0.7, 0.0, 0.0, 100.123], [0.0, -0.8, 0.0, 60.0], "
            "[0.0, 0.0, 2.5, -200.0], [0.0, 0.0, 0.0, 1.0]])"
        )


def _without(folder, keywords):
    """Every file of the series at `folder` rewritten without the attributes `keywords` (as anonymisers
    that delete rather than empty them leave it)."""
    for path in folder.iterdir():
        _without_in(path, *keywords)


# Type 2 attributes of the patient and study modules that highdicom copies into a SEG, and SliceThickness.
ABSENT_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "SliceThickness",
)


def test_a_series_without_type_2_attributes_still_gets_its_segmentation(tmp_path, monkeypatch):
    import highdicom

    write_series(tmp_path / "series", _phantom_hu(), step=3.0)
    _without(tmp_path / "series", (*ABSENT_TYPE_2, "SeriesNumber"))
    predict.predict_path(
        make_tiny_config(), None, tmp_path / "series", tmp_path / "out", predictor=ImagePredictor(1)
    )
    segmentation = highdicom.seg.segread(tmp_path / "out" / "series_seg.dcm")
    # Present and empty in the SEG (type 2), the slice thickness the series' step, the sources untouched.
    assert all(keyword in segmentation and not segmentation.get(keyword) for keyword in ABSENT_TYPE_2[:-1])
    measures = segmentation.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(3.0)
    assert segmentation.SeriesNumber == 1000  # a series without a number counts as 0
    assert "PatientID" not in pydicom.dcmread(tmp_path / "series" / "img000.dcm")


@pytest.mark.parametrize(
    "head, classes, property_types",
    [
        ("exclusive", ("ggo", "consolidation"), ["52988006", "52988006"]),  # lesion, lesion
        ("multilabel", ("lungs", "infection"), ["39607008", "52988006"]),  # lung, lesion
    ],
)
def test_a_multi_class_model_writes_one_segment_per_class_each_frame_its_class(
    tmp_path, head, classes, property_types
):
    import highdicom

    volume, expected = class_phantom()  # (rows, columns, slices): HU in, the label map out
    write_series(tmp_path / "series", volume.astype(np.float64), order=[2, 0, 1])
    config = make_tiny_config()
    config.model.head, config.data.classes = head, classes
    config.loss = "dice_ce" if head == "exclusive" else "dice"
    predictor = IntensityClassPredictor(head)
    predict.predict_path(config, None, tmp_path / "series", tmp_path / "out", predictor=predictor)
    segmentation = highdicom.seg.segread(tmp_path / "out" / "series_seg.dcm")
    assert [segment.SegmentLabel for segment in segmentation.SegmentSequence] == list(classes)
    assert [
        segment.SegmentedPropertyTypeCodeSequence[0].CodeValue for segment in segmentation.SegmentSequence
    ] == property_types
    sources = {}
    for path in (tmp_path / "series").iterdir():
        data = pydicom.dcmread(path, stop_before_pixels=True)
        sources[data.SOPInstanceUID] = round((float(data.ImagePositionPatient[2]) + 200.0) / 2.5)
    uids = sorted(sources)
    for number in (1, 2):  # segment k: where the label map (the multilabel one: the last class on) is k
        frames = segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], ignore_spatial_locations=True
        )[..., 0]
        for uid, frame in zip(uids, frames, strict=True):
            np.testing.assert_array_equal(frame, expected[:, :, sources[uid]] == number)


def test_a_one_slice_series_gets_a_one_frame_segmentation(tmp_path):
    import highdicom

    from rdunet_jax import dicom

    write_series(tmp_path / "series", _phantom_hu((40, 48, 1)))
    geometry = dicom.open_series(tmp_path / "series").dicom_geometry
    mask = np.zeros(geometry.shape, np.uint8)
    mask[2:9, 3:7, 0] = 1
    dicom.write_segmentation(tmp_path / "seg.dcm", geometry, mask, step=7)
    segmentation = highdicom.seg.segread(tmp_path / "seg.dcm")
    assert (segmentation.NumberOfFrames, segmentation.SeriesNumber) == (1, 1001)
    np.testing.assert_array_equal(segmentation.pixel_array, mask[:, :, 0].T)


def test_a_one_slice_series_is_predicted_and_summarised_with_its_series_uid(tmp_path):
    series_uid = write_series(tmp_path / "series", _phantom_hu((40, 48, 1)))
    (summary,) = predict.predict_path(
        make_tiny_config(), None, tmp_path / "series", tmp_path / "out", predictor=ImagePredictor(1)
    )
    assert summary["series_uid"] == series_uid and summary["num_slices"] == 1
    assert (tmp_path / "out" / "series_seg.dcm").exists()


def test_the_segmentation_keeps_the_series_slice_thickness_and_leaves_its_headers_alone(tmp_path):
    import highdicom

    from rdunet_jax import dicom

    write_series(tmp_path / "series", _phantom_hu(), step=3.0)  # slices 2.5 mm thick, 3 mm apart
    _without(tmp_path / "series", ("PatientID",))
    geometry = dicom.open_series(tmp_path / "series").dicom_geometry
    mask = np.zeros(geometry.shape, np.uint8)
    mask[2:9, 3:7, 1] = 1
    dicom.write_segmentation(tmp_path / "seg.dcm", geometry, mask, step=7)
    segmentation = highdicom.seg.segread(tmp_path / "seg.dcm")
    # What a PACS shows of where the SEG came from: the model, the checkpoint's step, a series of its own.
    identification = (
        segmentation.Manufacturer,
        segmentation.ManufacturerModelName,
        segmentation.SoftwareVersions,
        segmentation.DeviceSerialNumber,
        segmentation.SeriesDescription,
        segmentation.SeriesNumber,
        segmentation.InstanceNumber,
    )
    assert identification == (
        "rdunet_jax",
        "Residual Dilated U-net",
        "7",
        "0",
        "COVID-19 lesion (rdunet_jax)",
        1001,
        1,
    )
    algorithm = segmentation.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("rdunet_jax Residual Dilated U-net", "7")
    assert segmentation.SeriesInstanceUID != geometry.files[0][1].SeriesInstanceUID
    assert pydicom.uid.UID(str(segmentation.SeriesInstanceUID)).is_valid  # a new series, not an empty one
    measures = segmentation.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5)
    # The SEG's completed copies (PatientID present and empty) are copies: the series' headers are unchanged.
    assert "PatientID" in segmentation and not segmentation.PatientID
    assert all("PatientID" not in header for _, header in geometry.files)


@pytest.mark.parametrize("emptied", [False, True])
@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_a_series_without_the_uids_a_segmentation_references_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, keyword, emptied
):
    write_series(tmp_path / "series", _phantom_hu())
    if emptied:  # present, as an empty string
        for path in (tmp_path / "series").iterdir():
            data = pydicom.dcmread(path)
            setattr(data, keyword, "")
            data.save_as(path)
    else:
        _without(tmp_path / "series", [keyword])
    _refused_before_writing(
        tmp_path / "series", tmp_path / "out", rf"img\d{{3}}\.dcm: DICOM file without {keyword}$"
    )


def test_a_series_given_as_the_current_folder_names_its_outputs_after_the_folder(tmp_path, monkeypatch):
    write_series(tmp_path / "chest", _phantom_hu())
    monkeypatch.chdir(tmp_path / "chest")
    (summary,) = predict.predict_path(
        make_tiny_config(), None, ".", tmp_path / "out", predictor=ImagePredictor(1)
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "chest_mask.nii.gz",
        "chest_overlays",
        "chest_seg.dcm",
        "chest_summary.json",
    ]


def test_window_matching_and_a_series_of_a_folder_without_dicom_are_refused(tmp_path):
    series = write_series(tmp_path / "series", _phantom_hu())
    assert series
    with pytest.raises(UserError) as error:
        predict.predict_path(
            make_tiny_config(), None, tmp_path / "series", tmp_path / "out", input_window="match"
        )
    assert str(error.value) == (
        f"--input_window=match: {tmp_path / 'series'} is a volume; it applies to PNG/JPEG slices only "
        "(a volume in Hounsfield units is windowed by data.hu_window)"
    )
    (tmp_path / "slices").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "slices" / "a.png")
    with pytest.raises(UserError) as error:
        predict.predict_path(make_tiny_config(), None, tmp_path / "slices", tmp_path / "out", series="1.2")
    assert str(error.value) == f"--series: {tmp_path / 'slices'} is not a folder of DICOM files"
    assert not (tmp_path / "out").exists()
