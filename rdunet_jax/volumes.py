"""NIfTI volumes for prediction: reading them slice by slice (with the units check), turning their slices to
the model's orientation and back, and writing a mask of the input's exact geometry as it is predicted.

A volume whose values do not look like Hounsfield units is refused unless `input_units` is 'display'
(`display_scale`). A `.nii.gz` cut short in its data shows only when that slice is read: a one-line error
naming the file.
"""

import contextlib
import gzip
import pathlib
import sys
import zlib

import numpy as np

from rdunet_jax import orientation
from rdunet_jax.datasets import readers
from rdunet_jax.datasets.layouts import IMAGE_SUFFIXES
from rdunet_jax.errors import UserError
from rdunet_jax.files import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What reading a damaged volume's voxels raises: a cut gzip stream, a short file, a bad deflate block.
READ_ERRORS = (EOFError, OSError, zlib.error, ValueError)
# How a volume's values are read: CT in Hounsfield units (windowed by `data.hu_window`), or images already
# display-windowed to [0, 255] (or [0, 1]), read as the PNG datasets are.
INPUT_UNITS = ("hu", "display")
# The units check reads this many slices, evenly spaced: enough to meet air in any chest CT, few enough
# that a volume is still read in bounded memory.
UNITS_SAMPLE_SLICES = 9
# CT air is -1000 HU by definition and aerated lung -950 to -700 HU, so in a chest CT (air around the
# body, in the lungs and airways) far more than 1% of voxels lie below -800 HU; display images, or stored
# values whose rescale intercept was lost, have no negative values at all.
HU_AIR_CEILING = -800.0
HU_AIR_PERCENTILE = 1.0


def input_kind(path: pathlib.Path) -> str | None:
    """'nifti', 'image', 'dicom' (a folder: one series), or None for a file this mode does not read."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


# --- NIfTI mask output ----------------------------------------------------------------------------------


@contextlib.contextmanager
def nifti_mask_writer(path: pathlib.Path, source_header, shape):
    """Yields `write(slice)`, which appends one (x, y) uint8 slice of a NIfTI mask with `shape` and the
    source header's affine (qform and sform with their codes) and voxel sizes; gzip for `.nii.gz`."""
    # Every input's header is NIfTI (a DICOM series is read as a Nifti1Image): NIfTI-2 stays NIfTI-2.
    header = type(source_header)()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms(source_header.get_zooms()[: len(shape)])
    header.set_xyzt_units(*source_header.get_xyzt_units())
    header.set_qform(*source_header.get_qform(coded=True))
    header.set_sform(*source_header.get_sform(coded=True))
    with atomic_path(path) as temporary, open(temporary, "wb") as raw:
        compressed = path.name.lower().endswith(".gz")
        # No time and no (temporary, random) file name in the gzip header: the same prediction gives the
        # same bytes.
        file = (
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0)
            if compressed
            else raw
        )
        header.write_to(file)  # the header, then the empty-extension flag: the data start at vox_offset

        def write(mask_slice):
            # NIfTI stores voxels with x fastest: an (x, y) slice in Fortran order.
            file.write(np.asarray(mask_slice, np.uint8).tobytes(order="F"))

        yield write
        if compressed:
            file.close()


# --- NIfTI volumes ---------------------------------------------------------------------------------------


def open_volume(path: pathlib.Path, keep_file_open: bool = True):
    """A NIfTI image whose slices are read on demand (by default the file is kept open: one pass, not one
    per slice), its header and shape checked. An uncompressed file shorter than its data is refused here;
    a cut `.nii.gz` shows only when its slices are read (`volume_slice`)."""
    import nibabel

    try:
        image = nibabel.load(path, keep_file_open=keep_file_open)
    except Exception as error:  # nibabel raises many types for non-NIfTI files
        reason = f"{type(error).__name__}: {error}"
        raise UserError(f"{path}: corrupt or unreadable NIfTI file ({reason})") from None
    shape = image.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) == 0:
        raise UserError(f"{path}: expected a 3-D volume (x, y, slices), got an array of shape {shape}")
    if not path.name.lower().endswith(".gz"):
        offset = int(image.dataobj.offset)  # where the voxels start (the header's vox_offset)
        expected = offset + int(np.prod(shape)) * image.header.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < expected:
            raise UserError(f"{path}: truncated NIfTI file ({size} bytes, its header needs {expected})")
    return image


def header_orientation(image) -> bool:
    """Whether a NIfTI header gives the volume's orientation (a qform or sform code above 0). Without, the
    standard leaves it unknown and nibabel reads the voxel axes as left, anterior, superior (ANALYZE's)."""
    header = image.header
    return bool(header["qform_code"] > 0 or header["sform_code"] > 0)


def warn_without_orientation(image, path: pathlib.Path) -> None:
    """Warns (stderr) when `image`'s header gives no orientation: the slices the model sees may be turned."""
    if not header_orientation(image):
        print(
            f"warning: {path}: no orientation in its header (qform_code and sform_code 0): read with its "
            "voxel axes as left, anterior, superior (nibabel's ANALYZE default); stored otherwise, the model "
            "sees its slices turned: write the scanner's affine into the file",
            file=sys.stderr,
            flush=True,
        )


def open_volume_pair(input_file: pathlib.Path, ground_truth, keep_file_open: bool = True, series=None):
    """(volume, expert mask volume or None), checked to have the same shape; a folder is a DICOM series
    (`series`: its SeriesInstanceUID, needed when the folder holds several), whose mask must also have
    the series' affine (that of the NIfTI mask written for it)."""
    if input_kind(input_file) == "dicom":
        from rdunet_jax import dicom

        image = dicom.open_series(input_file, series)
    else:
        image = open_volume(input_file, keep_file_open)
    truth = open_volume(ground_truth, keep_file_open) if ground_truth else None
    if truth is not None and truth.shape != image.shape:
        raise UserError(f"--ground_truth: {ground_truth} has shape {truth.shape}, {input_file} {image.shape}")
    # A mask of the same shape stored in another orientation would be scored voxel by voxel, flipped.
    if truth is not None and not np.allclose(truth.affine, image.affine, atol=1e-3):
        kind = "the series" if input_kind(input_file) == "dicom" else "the volume"
        raise UserError(
            f"--ground_truth: {ground_truth} is not in the geometry of {kind} {input_file} "
            f"(its affine differs from the input's {np.round(image.affine, 3).tolist()})"
        )
    return image, truth


def check_truth_labels(values: np.ndarray, ground_truth, labels) -> np.ndarray:
    """Expert mask values as integer labels; values outside `labels` or not integers (a {0, 255} mask, a
    CT given as the mask) are a UserError naming the file, not a silent Dice of 0."""
    return readers.nifti_label_volume(values, f"--ground_truth: {ground_truth}", labels).astype(np.float32)


def volume_slice(image, index: int, path: pathlib.Path) -> np.ndarray:
    """Axial slice `index` of a volume as float32 (x, y): the same slice the `nifti` dataset stores.
    A failed read (a cut or damaged file) is a UserError naming `path`."""
    region = (slice(None), slice(None), index) + ((0,) if len(image.shape) == 4 else ())
    try:
        values = np.asarray(image.dataobj[region], dtype=np.float32)
    except READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        message = f"{path}: corrupt or truncated NIfTI file, slice {index} unreadable ({reason})"
        raise UserError(message) from None
    # A NaN spreads through every convolution and blanks the slice's mask, and turns the units check's
    # percentiles into NaN, which passes it.
    not_finite = int(values.size - np.count_nonzero(np.isfinite(values)))
    if not_finite:
        raise UserError(
            f"{path}: slice {index} holds {not_finite} NaN or infinite values; a volume must be finite"
        )
    return values


def sampled_slice_indices(num_slices: int) -> list[int]:
    """Up to UNITS_SAMPLE_SLICES slice indices, evenly spaced from the first to the last."""
    return sorted({int(round(value)) for value in np.linspace(0, num_slices - 1, UNITS_SAMPLE_SLICES)})


def display_scale(image, path: pathlib.Path, input_units: str) -> float | None:
    """The units check on evenly spaced slices: None for CT in Hounsfield units; for `input_units`
    'display', the factor to [0, 255] (255 for images in [0, 1], else 1).

    Hounsfield units are assumed when the darkest HU_AIR_PERCENTILE % of the sampled voxels lie at or below
    HU_AIR_CEILING (air, as in every chest CT); anything else (display-windowed [0, 255] or [0, 1] images,
    raw stored values without their rescale intercept) is refused unless `input_units` is 'display'."""
    samples = np.concatenate(
        [volume_slice(image, index, path).ravel() for index in sampled_slice_indices(image.shape[2])]
    )
    low, high = float(samples.min()), float(samples.max())
    if input_units == "display":
        if low < 0.0 or high > 255.0:
            raise UserError(
                f"--input_units display: {path} holds values in [{low:g}, {high:g}], "
                "not display intensities in [0, 255] or [0, 1]"
            )
        return 255.0 if high <= 1.0 else 1.0
    air_level = float(np.percentile(samples, HU_AIR_PERCENTILE))
    if air_level > HU_AIR_CEILING:
        raise UserError(
            f"{path}: values do not look like CT in Hounsfield units (no air near -1000: the darkest "
            f"{HU_AIR_PERCENTILE:g}% of the sampled voxels reach down only to {air_level:g}, not "
            f"{HU_AIR_CEILING:g}; range [{low:g}, {high:g}]); "
            "pass --input_units display for already-windowed images"
        )
    return None


def display_slice(hu_or_display: np.ndarray, scale: float) -> np.ndarray:
    """A display-windowed slice as the uint8 image the PNG datasets give (so preprocessing divides by 255)."""
    return np.clip(np.rint(hu_or_display * scale), 0, 255).astype(np.uint8)


class VolumeSlices:
    """The slices of a volume (and of its expert mask) as the model is to see them, and the way back.

    When the stored slices are the model's slices turned in plane (`layout.per_slice`: the stored third
    axis is the one nearest superior-inferior), each is read, turned and, once predicted, turned back and
    written on its own, in bounded memory; otherwise the whole volume is read and turned at once. Expert
    mask values must be among `truth_labels`."""

    def __init__(
        self,
        image,
        truth,
        input_file,
        ground_truth,
        layout: orientation.VolumeLayout,
        truth_labels=readers.NIFTI_LABELS,
    ):
        self.image, self.truth, self.input_file, self.ground_truth = image, truth, input_file, ground_truth
        self.layout, self.truth_labels = layout, truth_labels
        self.turned = self.turned_truth = None
        if not layout.per_slice:
            self.turned = orientation.turn(self._whole(image, input_file), layout.to_model)
            if truth is not None:
                # Checked slice by slice: a whole volume's temporaries would take gigabytes.
                whole_truth = self._whole(
                    truth, ground_truth, lambda values: check_truth_labels(values, ground_truth, truth_labels)
                )
                self.turned_truth = orientation.turn(whole_truth, layout.to_model)

    @staticmethod
    def _whole(image, path, check=lambda values: values):
        return np.stack([check(volume_slice(image, index, path)) for index in range(image.shape[2])], axis=2)

    @property
    def num_slices(self) -> int:
        return self.image.shape[2] if self.turned is None else self.turned.shape[2]

    def image_slice(self, index: int) -> np.ndarray:
        if self.turned is not None:
            return self.turned[:, :, index]
        return self.layout.slice_to_model(volume_slice(self.image, index, self.input_file))

    def truth_slice(self, index: int) -> np.ndarray:
        if self.turned_truth is not None:
            return self.turned_truth[:, :, index]
        values = volume_slice(self.truth, index, self.ground_truth)
        return self.layout.slice_to_model(check_truth_labels(values, self.ground_truth, self.truth_labels))

    @contextlib.contextmanager
    def mask_writer(self, path: pathlib.Path):
        """Yields `write(index, model-layout mask slice)`; the mask file gets the stored voxel order."""
        with nifti_mask_writer(path, self.image.header, self.image.shape) as write_stored:
            if self.turned is None:
                yield lambda index, mask: write_stored(self.layout.slice_from_model(mask))
                return
            masks = np.zeros(self.turned.shape, np.uint8)

            def collect(index, mask):
                masks[:, :, index] = mask

            yield collect
            stored = orientation.turn(masks, self.layout.from_model)
            for index in range(stored.shape[2]):
                write_stored(stored[:, :, index])
