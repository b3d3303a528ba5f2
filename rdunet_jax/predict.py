"""Prediction: NIfTI volumes or PNG/JPEG slices in, lesion masks, summaries and overlays out.

`--mode predict --input PATH --output DIR` restores a checkpoint (as evaluation does) and segments
`PATH`: a NIfTI volume (`.nii`, `.nii.gz`), a PNG/JPEG slice, or a folder of either. Preprocessing is the
training preprocessing (`input_pipeline.preprocess`: NIfTI slices are Hounsfield units windowed by
`data.hu_window`, images are divided by 255), and probabilities are resized back to the input's size
(bilinear) before thresholding at `eval.threshold`. A volume whose values do not look like Hounsfield
units is refused unless `input_units` is 'display' (`display_scale`). A volume is turned from its affine
so that its axial slices face the way the model's training slices did (`data.orientation`, see
orientation.py), and its mask is turned back; images carry no geometry and are read as they are.

Outputs, for an input named `<stem>`:
- NIfTI: `<stem>_mask.nii[.gz]` with the input's exact shape, affine and voxel order, values
  {0, 1}; `<stem>_summary.json` (lesion volume in mL, fraction of slices with lesion); and
  `<stem>_overlays/` with the slices of largest predicted lesion drawn as in the paper's Figure 5.
- Image: `<stem>_mask.png` ({0, 255}, the input's size) and `<stem>_overlay.png`.

Before anything is written, the output folder, the checkpoint and every input are checked: images are
decoded, NIfTI headers, shapes and (uncompressed) lengths read, ground truths matched in size. A
`.nii.gz` cut short in its data shows only when that slice is read: it is a one-line error that leaves
no mask, and an output folder this run created and left empty is removed.

A volume is streamed: slices are read, predicted in fixed-size batches (at most a few in flight) and
written to the mask file as they come, so memory does not grow with the number of slices. Existing
outputs are never replaced without `overwrite`, and every file is written to a temporary name and
renamed, so an interruption leaves no half-written mask.
"""

import collections
import contextlib
import gzip
import heapq
import os
import pathlib
import zlib

import jax
import numpy as np

from rdunet_jax import evaluate, input_pipeline, metrics, orientation, visualize
from rdunet_jax.datasets import readers
from rdunet_jax.datasets.layouts import IMAGE_SUFFIXES
from rdunet_jax.errors import UserError
from rdunet_jax.files import atomic_path, write_json_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What reading a damaged volume's voxels raises: a cut gzip stream, a short file, a bad deflate block.
READ_ERRORS = (EOFError, OSError, zlib.error, ValueError)
# Batches dispatched to the device but not yet collected: enough to overlap reading, computing and
# writing, few enough to bound memory.
BATCHES_IN_FLIGHT = 2
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


# --- Inputs and output names -----------------------------------------------------------------------------


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


def stem(path: pathlib.Path) -> str:
    """The file name without its (possibly double) suffix: `case.nii.gz` -> `case`; a folder's name."""
    if path.is_dir():
        return path.resolve().name  # '.' and '..' have no name of their own
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_inputs(input_path) -> list[pathlib.Path]:
    """The files to segment: `input_path` itself, or the NIfTI and image files of a folder (sorted)."""
    input_path = pathlib.Path(input_path)
    if input_path.is_dir():
        files = sorted(path for path in input_path.iterdir() if path.is_file() and input_kind(path))
        if files:
            return files
        from rdunet_jax import dicom

        if dicom.dicom_files(input_path):
            return [input_path]
        raise UserError(f"--input: {input_path} holds no .nii, .nii.gz, .png, .jpg, .jpeg or DICOM file")
    if not input_path.exists():
        raise UserError(f"--input: {input_path} does not exist")
    if input_kind(input_path) is None:
        raise UserError(f"--input: {input_path} is not a .nii, .nii.gz, .png, .jpg or .jpeg file or a folder")
    return [input_path]


def output_paths(input_file: pathlib.Path, output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Where the outputs of one input go."""
    name = stem(input_file)
    if input_kind(input_file) in ("nifti", "dicom"):
        suffix = ".nii" if input_file.name.lower().endswith(".nii") else ".nii.gz"
        outputs = {
            "mask": output_dir / f"{name}_mask{suffix}",
            "summary": output_dir / f"{name}_summary.json",
            "overlays": output_dir / f"{name}_overlays",
        }
        if input_kind(input_file) == "dicom":
            outputs["segmentation"] = output_dir / f"{name}_seg.dcm"
        return outputs
    return {"mask": output_dir / f"{name}_mask.png", "overlay": output_dir / f"{name}_overlay.png"}


def check_output_folder(output_dir: pathlib.Path) -> None:
    """Refuses an `output_dir` that is, or lies below, something other than a folder."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--output: {folder} exists and is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"--output: cannot write in {folder}")
            return


def missing_folders(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """The folders from `output_dir` up that do not exist yet (deepest first): those prediction creates."""
    missing = []
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_empty_folders(folders: list[pathlib.Path]) -> None:
    """Removes the `folders` (deepest first) that are empty, stopping at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def check_outputs_free(inputs, output_dir: pathlib.Path, overwrite: bool) -> None:
    """Refuses, before any work, when an output exists (unless `overwrite`) or two inputs share one."""
    seen = {}
    for input_file in inputs:
        for path in output_paths(input_file, output_dir).values():
            if path in seen:
                raise UserError(f"--input: {input_file} and {seen[path]} would both write {path}")
            seen[path] = input_file
            if path.exists() and not overwrite:
                raise UserError(f"--output: {path} exists; pass --overwrite to replace it")


def ground_truth_for(input_file: pathlib.Path, ground_truth, single_input: bool) -> pathlib.Path | None:
    """The expert mask of `input_file`: the `ground_truth` file itself for one input, else the file of
    the same name in the `ground_truth` folder (None when absent)."""
    if ground_truth is None:
        return None
    ground_truth = pathlib.Path(ground_truth)
    if input_kind(input_file) == "dicom" and (not single_input or input_kind(ground_truth) != "nifti"):
        raise UserError(
            f"--ground_truth: a DICOM series ({input_file}) takes one NIfTI mask in the series' geometry "
            f"(that of the mask prediction writes for it), not {ground_truth}"
        )
    if ground_truth.is_dir():
        candidate = ground_truth / input_file.name
        return candidate if candidate.exists() else None
    if not single_input:
        raise UserError(f"--ground_truth: {ground_truth} must be a folder when --input is a folder")
    if not ground_truth.exists():
        raise UserError(f"--ground_truth: {ground_truth} does not exist")
    return ground_truth


# --- Streaming prediction --------------------------------------------------------------------------------


def predict_stream(state, config, examples):
    """Yields (payload, probabilities at data.image_size) for each (payload, record) of `examples`, in
    order. Records are preprocessed as in training and batched to eval.batch_size (the last batch
    zero-padded, so nothing compiles twice); at most BATCHES_IN_FLIGHT batches wait on the device."""
    size, batch_size = config.data.image_size, config.eval.batch_size
    flips = config.eval.test_time_flips
    hu_window = tuple(config.data.hu_window)
    in_flight = collections.deque()

    def collect_oldest():
        payloads, probabilities = in_flight.popleft()
        probabilities = np.asarray(jax.device_get(probabilities))[..., 0]
        yield from zip(payloads, probabilities[: len(payloads)], strict=False)

    payloads, images = [], np.zeros((batch_size, size, size, 1), np.float32)
    for payload, record in examples:
        images[len(payloads)] = input_pipeline.preprocess(record, size, hu_window)["image"]
        payloads.append(payload)
        if len(payloads) == batch_size:
            in_flight.append((payloads, evaluate.dispatch_batch(state, images, flips)))
            payloads, images = [], np.zeros_like(images)
            if len(in_flight) > BATCHES_IN_FLIGHT:
                yield from collect_oldest()
    if payloads:
        in_flight.append((payloads, evaluate.dispatch_batch(state, images, flips)))
    while in_flight:
        yield from collect_oldest()


def mask_at_input_size(probabilities: np.ndarray, shape, threshold: float) -> np.ndarray:
    """The uint8 {0, 1} mask of the input's size."""
    return (input_pipeline.resize_probabilities(probabilities, shape) >= threshold).astype(np.uint8)


# --- NIfTI mask output ----------------------------------------------------------------------------------


@contextlib.contextmanager
def nifti_mask_writer(path: pathlib.Path, source_header, shape):
    """Yields `write(slice)`, which appends one (x, y) uint8 slice of a NIfTI mask with `shape` and the
    source header's affine (qform and sform with their codes) and voxel sizes; gzip for `.nii.gz`."""
    import nibabel

    header_type = type(source_header) if isinstance(source_header, nibabel.Nifti1Header) else None
    header = (header_type or nibabel.Nifti1Header)()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms(source_header.get_zooms()[: len(shape)])
    header.set_xyzt_units(*source_header.get_xyzt_units())
    header.set_qform(*source_header.get_qform(coded=True))
    header.set_sform(*source_header.get_sform(coded=True))
    with atomic_path(path) as temporary, open(temporary, "wb") as raw:
        compressed = path.name.lower().endswith(".gz")
        # mtime=0: the same prediction gives the same bytes.
        file = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) if compressed else raw
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
    if truth is not None and input_kind(input_file) == "dicom":
        if not np.allclose(truth.affine, image.affine, atol=1e-3):
            raise UserError(
                f"--ground_truth: {ground_truth} is not in the geometry of the series {input_file} "
                f"(its affine differs from the series' {np.round(image.affine, 3).tolist()})"
            )
    return image, truth


def volume_slice(image, index: int, path: pathlib.Path) -> np.ndarray:
    """Axial slice `index` of a volume as float32 (x, y): the same slice the `nifti` dataset stores.
    A failed read (a cut or damaged file) is a UserError naming `path`."""
    region = (slice(None), slice(None), index) + ((0,) if len(image.shape) == 4 else ())
    try:
        return np.asarray(image.dataobj[region], dtype=np.float32)
    except READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        message = f"{path}: corrupt or truncated NIfTI file, slice {index} unreadable ({reason})"
        raise UserError(message) from None


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
            f"{path}: values do not look like CT in Hounsfield units (no air near -1000: "
            f"{HU_AIR_PERCENTILE:g}th percentile {air_level:g}, range [{low:g}, {high:g}]); "
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
    written on its own, in bounded memory; otherwise the whole volume is read and turned at once."""

    def __init__(self, image, truth, input_file, ground_truth, layout: orientation.VolumeLayout):
        self.image, self.truth, self.input_file, self.ground_truth = image, truth, input_file, ground_truth
        self.layout = layout
        self.turned = self.turned_truth = None
        if not layout.per_slice:
            self.turned = orientation.turn(self._whole(image, input_file), layout.to_model)
            if truth is not None:
                self.turned_truth = orientation.turn(self._whole(truth, ground_truth), layout.to_model)

    @staticmethod
    def _whole(image, path):
        return np.stack([volume_slice(image, index, path) for index in range(image.shape[2])], axis=2)

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
        return self.layout.slice_to_model(volume_slice(self.truth, index, self.ground_truth))

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


def predict_volume(
    state,
    config,
    input_file: pathlib.Path,
    outputs: dict,
    ground_truth=None,
    input_units: str = "hu",
    series: str | None = None,
) -> dict:
    """Segments one NIfTI volume slice by slice, turned to the model's orientation (`data.orientation`),
    and writes its mask (in the input's voxel order), summary and overlays."""
    image, truth = open_volume_pair(input_file, ground_truth, series=series)
    # Checked again by verify_inputs before anything was written; here it also gives the display scale.
    scale = display_scale(image, input_file, input_units)
    model_orientation = orientation.model_orientation(config.data)
    slices = VolumeSlices(
        image, truth, input_file, ground_truth, orientation.volume_layout(image.affine, model_orientation)
    )
    shape, num_slices = image.shape, slices.num_slices
    threshold, hu_window = config.eval.threshold, tuple(config.data.hu_window)
    num_overlays = int(config.eval.num_overlays)
    dummy_mask = np.zeros((config.data.image_size,) * 2, np.uint8)

    def examples():
        for index in range(num_slices):
            hu_slice = slices.image_slice(index)
            if scale is not None:
                hu_slice = display_slice(hu_slice, scale)
            yield (index, hu_slice), {"image": hu_slice, "mask": dummy_mask}

    lesion_voxels, slices_with_lesion, counts = 0, 0, np.zeros(3, np.int64)
    largest = []  # a min-heap of (lesion pixels, -index, ...): the slices to draw
    with slices.mask_writer(outputs["mask"]) as write:
        for (index, hu_slice), probabilities in predict_stream(state, config, examples()):
            mask = mask_at_input_size(probabilities, hu_slice.shape, threshold)
            write(index, mask)
            pixels = int(mask.sum())
            lesion_voxels += pixels
            slices_with_lesion += pixels > 0
            target = None
            if truth is not None:
                labels = np.rint(slices.truth_slice(index))
                target = np.isin(labels, readers.NIFTI_LESION_LABELS)
                tp, fp, fn, _ = metrics.confusion_counts(mask[None], target[None])
                counts += np.concatenate([tp, fp, fn])
            if pixels and num_overlays:
                if scale is None:
                    shown = input_pipeline.window_hounsfield(hu_slice, hu_window)
                else:
                    shown = hu_slice.astype(np.float32) / 255.0
                entry = (pixels, -index, shown, mask, target)
                (heapq.heappush if len(largest) < num_overlays else heapq.heappushpop)(largest, entry)
    write_volume_overlays(outputs["overlays"], largest, model_orientation)
    zooms = [float(value) for value in image.header.get_zooms()[:3]]
    voxel_ml = float(np.prod(zooms)) / 1000.0  # mm^3 -> mL
    summary = {
        "input": str(input_file),
        "mask": str(outputs["mask"]),
        "shape": [int(value) for value in shape],
        "voxel_spacing_mm": zooms,
        "num_slices": int(num_slices),
        "lesion_voxels": int(lesion_voxels),
        "lesion_volume_ml": lesion_voxels * voxel_ml,
        "slices_with_lesion": int(slices_with_lesion),
        "fraction_slices_with_lesion": slices_with_lesion / num_slices,
        "input_units": input_units,
        "orientation": model_orientation,
        **prediction_settings(config, state),
    }
    geometry = getattr(image, "dicom_geometry", None)
    if geometry is not None:
        import nibabel

        from rdunet_jax import dicom

        # The mask just written, read back whole: a SEG is encoded from all its frames at once.
        mask_volume = np.asarray(nibabel.load(outputs["mask"]).dataobj)
        dicom.write_segmentation(outputs["segmentation"], geometry, mask_volume, int(state.step))
        summary["series_uid"] = str(geometry.files[0][1].SeriesInstanceUID)
        summary["segmentation"] = str(outputs["segmentation"])
    if truth is not None:
        tp, fp, fn = (int(count) for count in counts)
        summary["ground_truth"] = str(ground_truth)
        summary["dice_with_ground_truth"] = float(metrics.slice_metrics(tp, fp, fn)["dice"])
    write_json_atomic(outputs["summary"], summary)
    return summary


def write_volume_overlays(folder: pathlib.Path, largest: list, model_orientation: str) -> None:
    """Writes `slice_NNNN.png` overlays of the kept slices, in radiological display (the folder exists
    even when none has lesion); NNNN counts the model's slices."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("slice_*.png"):
        old.unlink()

    def shown(array):
        return orientation.to_display(array, model_orientation)

    for _, negative_index, display, mask, target in sorted(largest, key=lambda entry: -entry[1]):
        rgb = visualize.overlay_image(shown(display), shown(mask), None if target is None else shown(target))
        visualize.write_png(folder / f"slice_{-negative_index:04d}.png", rgb)


def prediction_settings(config, state) -> dict:
    """What a prediction depended on, for its summary."""
    return {
        "checkpoint_step": int(state.step),
        "threshold": float(config.eval.threshold),
        "test_time_flips": bool(config.eval.test_time_flips),
        "runtime": str(config.eval.runtime),
        "image_size": int(config.data.image_size),
        "hu_window": [float(value) for value in config.data.hu_window],
    }


# --- Images ----------------------------------------------------------------------------------------------


def predict_images(state, config, jobs: list[tuple]) -> None:
    """Segments PNG/JPEG slices, batched together; writes each mask ({0, 255}) and overlay."""
    dummy_mask = np.zeros((config.data.image_size,) * 2, np.uint8)

    def examples():
        for input_file, outputs, ground_truth in jobs:
            image = readers.read_grayscale_image(input_file)
            yield (input_file, outputs, ground_truth, image), {"image": image, "mask": dummy_mask}

    for payload, probabilities in predict_stream(state, config, examples()):
        input_file, outputs, ground_truth, image = payload
        target = None
        if ground_truth is not None:  # checked before anything of this input is written
            target = readers.read_binary_mask(ground_truth)
            readers.check_same_size(image, target, input_file, ground_truth)
        mask = mask_at_input_size(probabilities, image.shape, config.eval.threshold)
        visualize.write_png(outputs["mask"], mask * 255)
        visualize.write_png(outputs["overlay"], visualize.overlay_image(image, mask, target))


# --- The command -----------------------------------------------------------------------------------------


def verify_inputs(jobs: list[tuple], input_units: str = "hu", series: str | None = None) -> None:
    """Reads every input and ground truth as far as can be done cheaply (images decoded; NIfTI header,
    shape, (uncompressed) length and the units of a few slices) and checks their sizes agree, so a bad
    file fails before any output is written."""
    for input_file, _, ground_truth in jobs:
        if input_kind(input_file) in ("nifti", "dicom"):
            image, _ = open_volume_pair(input_file, ground_truth, keep_file_open=False, series=series)
            display_scale(image, input_file, input_units)
            if hasattr(image, "dicom_geometry"):
                from rdunet_jax import dicom

                dicom.segmentation_writer()
                dicom.check_segmentation_references(image.dicom_geometry)
                dicom.print_warnings(image.dicom_geometry)
        else:
            image = readers.read_grayscale_image(input_file)
            if ground_truth is not None:
                target = readers.read_binary_mask(ground_truth)
                readers.check_same_size(image, target, input_file, ground_truth)


def predict_path(
    config,
    workdir,
    input_path,
    output_dir,
    overwrite: bool = False,
    checkpoint_step: int | None = None,
    ground_truth=None,
    state=None,
    input_units: str = "hu",
    series: str | None = None,
) -> list[dict]:
    """Segments `input_path` (a file or a folder) with a checkpoint of `workdir` into `output_dir`;
    returns the summaries of the NIfTI volumes. Outputs, inputs and the checkpoint are checked before
    anything is written; on failure, output folders this call created and left empty are removed.
    `input_units` says how volumes hold their values (INPUT_UNITS; images are always display); a folder
    without NIfTI or image files is a DICOM series (`series`: the SeriesInstanceUID to read)."""
    if not input_path or not output_dir:
        raise UserError("--mode=predict needs --input (a NIfTI/PNG/JPEG file or a folder) and --output")
    if input_units not in INPUT_UNITS:
        raise UserError(f"--input_units: {input_units!r} is not one of {list(INPUT_UNITS)}")
    inputs = list_inputs(input_path)
    if series and not any(input_kind(input_file) == "dicom" for input_file in inputs):
        raise UserError(f"--series: {input_path} is not a folder of DICOM files")
    output_dir = pathlib.Path(output_dir)
    check_output_folder(output_dir)
    check_outputs_free(inputs, output_dir, overwrite)
    single = len(inputs) == 1
    jobs = [
        (input_file, output_paths(input_file, output_dir), ground_truth_for(input_file, ground_truth, single))
        for input_file in inputs
    ]
    if state is None:
        state = evaluate.restore_for_evaluation(config, workdir, checkpoint_step)
    verify_inputs(jobs, input_units, series)
    state = evaluate.with_runtime(config, state)
    created = missing_folders(output_dir)
    try:
        return _predict_jobs(state, config, jobs, output_dir, input_units, series)
    except BaseException:
        remove_empty_folders(created)
        raise


def _predict_jobs(
    state, config, jobs: list[tuple], output_dir: pathlib.Path, input_units: str, series: str | None
) -> list[dict]:
    summaries, image_jobs = [], []
    for input_file, outputs, truth in jobs:
        if input_kind(input_file) in ("nifti", "dicom"):
            summary = predict_volume(state, config, input_file, outputs, truth, input_units, series)
            print(
                f"{input_file}: lesion {summary['lesion_volume_ml']:.1f} mL in "
                f"{summary['slices_with_lesion']}/{summary['num_slices']} slices -> {outputs['mask']}",
                flush=True,
            )
            summaries.append(summary)
        else:
            image_jobs.append((input_file, outputs, truth))
    if image_jobs:
        predict_images(state, config, image_jobs)
        print(f"{len(image_jobs)} image(s) -> {output_dir}", flush=True)
    return summaries
