"""DICOM CT series in: a folder of single-frame CT images read as a volume in Hounsfield units.

A series is found by reading every file's header (pixel data deferred, so memory does not grow with the
images), grouped by SeriesInstanceUID; a folder holding several asks for one (`--series UID`). Slices
are ordered along the slice normal (the cross product of ImageOrientationPatient's row and column
directions) by the projection of ImagePositionPatient on it, never by file name or InstanceNumber. The
volume's voxel order is (column, row, slice), so each stored slice is a file's pixel array transposed,
and its affine (NIfTI's RAS world) comes from the orientation, PixelSpacing, the first position and the
median step between positions; a gap or uneven steps between positions are warned on stderr. Pixels are
read one file at a time, when a slice is asked for, and mapped to Hounsfield units by RescaleSlope and
RescaleIntercept. Needs the optional `dicom` extra (pydicom, highdicom).
"""

import dataclasses
import pathlib
import sys

import numpy as np

from rdunet_jax.errors import UserError

INSTALL_HINT = 'pip install -e ".[dicom]"'
# Files with these names are never DICOM images: skipped without being opened.
SKIPPED_SUFFIXES = (".txt", ".json", ".md", ".csv", ".xml", ".html", ".pdf", ".zip", ".nii", ".gz")
# Cosines and positions equal within this tolerance belong to one orientation / slice.
ORIENTATION_TOLERANCE = 1e-4
# Steps between slice positions further than this fraction from their median are uneven.
SPACING_TOLERANCE = 0.1
# Pixel spacings of one series' files agree within this many mm.
SPACING_TOLERANCE_MM = 1e-3


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError(f"--input: reading DICOM needs pydicom, not installed: {INSTALL_HINT}") from None
    return pydicom


def is_dicom_file(path: pathlib.Path) -> bool:
    """Whether `path` carries the DICOM file preamble's 'DICM' marker."""
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_file(path: pathlib.Path) -> bool:
    """Whether `path` is a DICOM file worth reading: not hidden, not of a known other kind, marked DICM."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and not path.name.lower().endswith(SKIPPED_SUFFIXES)
        and is_dicom_file(path)
    )


def dicom_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The DICOM files under `folder` (any depth), sorted by path."""
    return sorted(path for path in folder.rglob("*") if dicom_file(path))


def read_header(path: pathlib.Path):
    """A file's data set with its pixel data deferred (read later, from the file, only when asked)."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, defer_size=1024)
    except Exception as error:  # pydicom raises many types for damaged files
        raise UserError(
            f"{path}: corrupt or unreadable DICOM file ({type(error).__name__}: {error})"
        ) from None


def find_series(folder: pathlib.Path) -> dict[str, list[tuple[pathlib.Path, object]]]:
    """{SeriesInstanceUID: [(file, header), ...]} of the DICOM files under `folder` (files of no series,
    such as a DICOMDIR, are left out)."""
    series = {}
    for path in dicom_files(folder):
        header = read_header(path)
        uid = str(header.get("SeriesInstanceUID", ""))
        if uid:
            series.setdefault(uid, []).append((path, header))
    if not series:
        raise UserError(f"--input: {folder} holds no DICOM series")
    return series


def choose_series(folder: pathlib.Path, series: dict, uid: str | None) -> list:
    """The files of the one series of `folder`, or of `uid`; several without `uid` is a UserError
    listing them."""
    if uid:
        if uid not in series:
            raise UserError(f"--series: no series {uid} in {folder}; it holds {', '.join(sorted(series))}")
        return series[uid]
    if len(series) > 1:
        described = "; ".join(
            f"{key} ({str(files[0][1].get('SeriesDescription', '')) or 'no description'}, {len(files)} files)"
            for key, files in sorted(series.items())
        )
        raise UserError(
            f"--input: {folder} holds {len(series)} DICOM series, choose one with --series: {described}"
        )
    return next(iter(series.values()))


def _check_decoder(path: pathlib.Path, header) -> None:
    """Refuses a compressed transfer syntax that no installed package decodes, naming what to install."""
    from pydicom.pixels import get_decoder

    syntax = header.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UserError(
            f"{path}: pixel data in {syntax.name} ({syntax}), which pydicom cannot decode"
        ) from None
    if not decoder.is_available:
        options = " or ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UserError(
            f"{path}: pixel data compressed as {syntax.name} ({syntax}); install a decoder: {options}"
        )


def _check_complete(path: pathlib.Path, header) -> None:
    """Refuses a file shorter than its (uncompressed) pixel data says."""
    if "PixelData" not in header:
        raise UserError(f"{path}: DICOM file without pixel data")
    element = header.get_item("PixelData", keep_deferred=True)  # its offset and length, not its value
    length, offset = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or offset is None or length == 0xFFFFFFFF:  # read already, or encapsulated
        return
    size = path.stat().st_size
    if size < offset + length:
        raise UserError(
            f"{path}: truncated DICOM file ({size} bytes, its pixel data end at {offset + length})"
        )


def _required(path: pathlib.Path, header, keyword: str):
    value = header.get(keyword)
    if value is None or value == "":
        raise UserError(f"{path}: DICOM file without {keyword}")
    return value


def _pixel_grid(path: pathlib.Path, header) -> tuple[int, int]:
    """(Rows, Columns) of a file; either absent or empty is a UserError naming the file."""
    return int(_required(path, header, "Rows")), int(_required(path, header, "Columns"))


@dataclasses.dataclass
class SeriesGeometry:
    """The sorted files of a series and the RAS affine of its (column, row, slice) voxel order."""

    files: list
    affine: np.ndarray
    shape: tuple
    zooms: tuple
    warnings: list


def series_geometry(files: list) -> SeriesGeometry:
    """Checks a series (CT, one orientation and pixel grid, decodable, complete) and orders its slices
    along the slice normal; warns of gaps and uneven steps between positions."""
    first_path, first = files[0]
    orientation = np.asarray(_required(first_path, first, "ImageOrientationPatient"), float)
    if orientation.shape != (6,):
        raise UserError(f"{first_path}: ImageOrientationPatient must hold 6 numbers")
    grid = _pixel_grid(first_path, first)
    spacing = np.asarray(_required(first_path, first, "PixelSpacing"), float)  # (between rows, columns)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = []
    for path, header in files:
        modality = str(header.get("Modality", ""))
        if modality != "CT":
            raise UserError(f"{path}: modality {modality or 'missing'}, not CT")
        other = np.asarray(_required(path, header, "ImageOrientationPatient"), float)
        if other.shape != (6,) or np.abs(other - orientation).max() > ORIENTATION_TOLERANCE:
            raise UserError(
                f"{path}: ImageOrientationPatient {other.tolist()} differs from {first_path.name}'s "
                f"{orientation.tolist()} (mixed orientations in one series)"
            )
        if _pixel_grid(path, header) != grid:
            raise UserError(f"{path}: {header.Rows}x{header.Columns} pixels, {first_path.name} {grid}")
        other_spacing = np.asarray(_required(path, header, "PixelSpacing"), float)
        # One spacing makes the volume's affine and the SEG's shared pixel measures: a slice at another
        # would be drawn and measured at the wrong size.
        if (
            other_spacing.shape != spacing.shape
            or np.abs(other_spacing - spacing).max() > SPACING_TOLERANCE_MM
        ):
            raise UserError(
                f"{path}: PixelSpacing {other_spacing.tolist()} differs from {first_path.name}'s "
                f"{spacing.tolist()} (mixed pixel spacings in one series)"
            )
        if int(header.get("NumberOfFrames", 1) or 1) != 1:
            raise UserError(f"{path}: a multi-frame image; only single-frame CT series are read")
        _check_decoder(path, header)
        _check_complete(path, header)
        positions.append(
            float(np.dot(np.asarray(_required(path, header, "ImagePositionPatient"), float), normal))
        )
    order = np.argsort(positions, kind="stable")
    files = [files[index] for index in order]
    positions = np.asarray(positions)[order]
    steps = np.diff(positions)
    warnings = []
    if len(steps) and np.min(steps) < ORIENTATION_TOLERANCE:
        index = int(np.argmin(steps))
        raise UserError(f"{files[index + 1][0]}: same slice position as {files[index][0].name}")
    slice_step = float(np.median(steps)) if len(steps) else float(first.get("SliceThickness", 1.0) or 1.0)
    for index, step in enumerate(steps):
        if abs(step - slice_step) > SPACING_TOLERANCE * slice_step:
            missing = int(round(step / slice_step)) - 1
            what = f"{missing} missing slice(s)?" if missing >= 1 else "uneven spacing"
            warnings.append(
                f"{files[index + 1][0]}: {step:.3g} mm from {files[index][0].name}, the series steps "
                f"{slice_step:.3g} mm ({what})"
            )
    warnings += _tilt_warning(files, normal, float(np.min(spacing)))
    # Voxel (i, j, k): column i, row j, slice k. DICOM's patient coordinates are LPS; NIfTI's are RAS.
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]
    lps[:3, 1] = orientation[3:] * spacing[0]
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = np.asarray(files[0][1].ImagePositionPatient, float)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape = (grid[1], grid[0], len(files))
    return SeriesGeometry(files, affine, shape, (float(spacing[1]), float(spacing[0]), slice_step), warnings)


def _tilt_warning(files: list, normal: np.ndarray, pixel_mm: float) -> list[str]:
    """A warning when the sorted files' positions drift in plane by over half a pixel (gantry tilt)."""
    if len(files) < 2:
        return []
    travel = np.subtract(
        np.asarray(files[-1][1].ImagePositionPatient, float),
        np.asarray(files[0][1].ImagePositionPatient, float),
    )
    along = float(np.dot(travel, normal))
    drift = float(np.linalg.norm(travel - along * normal))
    if drift <= 0.5 * pixel_mm:
        return []
    # The affine steps along the slice normal, as ITK's series reader does; a sheared sform would be exact
    # but is refused or squared off by viewers, and resampling is dcm2niix's job.
    tilt = np.degrees(np.arctan2(drift, abs(along)))
    return [
        f"{files[-1][0]}: the series is tilted {tilt:.1f} degrees (gantry tilt): its slices drift "
        f"{drift:.1f} mm in plane from the first to the last, which the NIfTI mask's affine (stepping "
        "along the slice normal) leaves out; the DICOM SEG places each frame at its file's position. "
        "For a NIfTI in exact geometry, resample the series first (dcm2niix corrects tilt)"
    ]


class SeriesPixels:
    """An array proxy (nibabel's protocol) over the files of a series: `proxy[:, :, k]` reads file k's
    pixels, in Hounsfield units, as a (column, row) float32 slice."""

    is_proxy = True
    dtype = np.dtype(np.float32)

    def __init__(self, geometry: SeriesGeometry):
        self.geometry = geometry
        self.shape = geometry.shape
        self.ndim = 3

    def hounsfield_slice(self, index: int) -> np.ndarray:
        path, _ = self.geometry.files[index]
        pydicom = _pydicom()
        try:
            data = pydicom.dcmread(path)
            pixels = data.pixel_array
        except Exception as error:  # pydicom and its decoders raise many types for damaged files
            reason = f"{type(error).__name__}: {error}"
            raise UserError(
                f"{path}: corrupt or truncated DICOM file, pixels unreadable ({reason})"
            ) from None
        slope = float(data.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(data.get("RescaleIntercept", 0.0) or 0.0)
        return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T

    def __getitem__(self, region):
        """Basic indexing; only the slices the third index names are read."""
        region = region if isinstance(region, tuple) else (region,)
        region = region + (slice(None),) * (3 - len(region))
        in_plane, which = region[:2], region[2]
        if isinstance(which, (int, np.integer)):
            return self.hounsfield_slice(range(self.shape[2])[which])[in_plane]
        indices = range(self.shape[2])[which]
        stacked = np.stack([self.hounsfield_slice(index) for index in indices], axis=2)
        return stacked[(*in_plane, slice(None))]

    def __array__(self, dtype=None, copy=None):
        volume = np.stack([self.hounsfield_slice(index) for index in range(self.shape[2])], axis=2)
        return volume if dtype is None else volume.astype(dtype)


def open_series(folder: pathlib.Path, series_uid: str | None = None):
    """The chosen series of `folder` as a nibabel image whose slices are read on demand; its warnings
    (gaps, uneven steps) are printed once, on stderr."""
    import nibabel

    geometry = series_geometry(choose_series(folder, find_series(folder), series_uid))
    image = nibabel.Nifti1Image(SeriesPixels(geometry), geometry.affine)
    image.header.set_zooms(geometry.zooms)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(geometry.affine, code=1)  # scanner coordinates
    image.header.set_sform(geometry.affine, code=1)
    image.dicom_geometry = geometry
    return image


def print_warnings(geometry: SeriesGeometry) -> None:
    for warning in geometry.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


SEGMENT_LABEL = "COVID-19 lesion"


# What a DICOM SEG copies from its source images: type 1 UIDs it cannot do without, and type 2 attributes
# (required, but may be empty) that anonymisers often delete and highdicom reads unguarded.
SEGMENTATION_REFERENCES = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID")
SEGMENTATION_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
)


def check_segmentation_references(geometry: SeriesGeometry) -> None:
    """Refuses a series whose files lack a UID its SEG must reference (checked before anything is written)."""
    for path, header in geometry.files:
        for keyword in SEGMENTATION_REFERENCES:
            _required(path, header, keyword)


def _completed_for_segmentation(header, slice_step: float):
    """A copy of `header` with the SEGMENTATION_TYPE_2 attributes it lacks present and empty, and a missing
    SliceThickness (which the SEG's pixel measures need a value for) the series' step between slices."""
    import copy

    completed = copy.deepcopy(header)
    for keyword in SEGMENTATION_TYPE_2:
        if keyword not in completed:
            setattr(completed, keyword, None)
    if completed.get("SliceThickness") is None:
        completed.SliceThickness = slice_step
    return completed


def segmentation_writer():
    """highdicom, or a UserError naming the extra (checked before anything of a series is written)."""
    try:
        import highdicom
    except ImportError:
        raise UserError(
            f"--input: writing DICOM SEG needs highdicom, not installed: {INSTALL_HINT}"
        ) from None
    return highdicom


def _segment_codes(class_name: str, codes) -> tuple:
    """(category, type) of a segment: the lungs are anatomy, every other class a lesion."""
    if class_name.lower() in ("lung", "lungs"):
        return codes.SCT.AnatomicalStructure, codes.SCT.Lung
    return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion


def write_segmentation(
    path: pathlib.Path, geometry: SeriesGeometry, mask_volume: np.ndarray, step: int, class_names=None
) -> None:
    """Writes the (column, row, slice) mask as a binary DICOM SEG of the series (highdicom), each frame
    referencing its source image; written to a temporary name and renamed. A {0, 1} mask is one segment,
    SEGMENT_LABEL; with `class_names` (a multi-class head) the mask is its label map and value k becomes
    segment k, labelled with the k-th class name."""
    highdicom = segmentation_writer()
    from pydicom.sr.codedict import codes

    from rdunet_jax.files import atomic_path

    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="rdunet_jax Residual Dilated U-net",
        family=codes.cid7162.ArtificialIntelligence,
        version=str(step),
    )
    labels = [SEGMENT_LABEL] if class_names is None else list(class_names)
    segments = [
        highdicom.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=_segment_codes(label, codes)[0],
            segmented_property_type=_segment_codes(label, codes)[1],
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(labels, start=1)
    ]
    sources = [_completed_for_segmentation(header, geometry.zooms[2]) for _, header in geometry.files]
    frames = np.ascontiguousarray(np.transpose(mask_volume, (2, 1, 0)), dtype=np.uint8)  # (slice, row, col)
    segmentation = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=highdicom.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer="rdunet_jax",
        manufacturer_model_name="Residual Dilated U-net",
        software_versions=str(step),
        device_serial_number="0",
        series_description=f"{', '.join(labels)} (rdunet_jax)",
    )
    with atomic_path(path) as temporary:
        segmentation.save_as(temporary)
