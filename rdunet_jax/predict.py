"""Prediction: NIfTI volumes or PNG/JPEG slices in, lesion masks, summaries and overlays out.

`--mode predict --input PATH --output DIR` restores a checkpoint (as evaluation does) and segments
`PATH`: a NIfTI volume (`.nii`, `.nii.gz`), a PNG/JPEG slice, or a folder of either. Preprocessing is the
training preprocessing (`input_pipeline.preprocess`: NIfTI slices are Hounsfield units windowed by
`data.hu_window`, images are divided by 255), and probabilities are resized back to the input's size
(bilinear) before thresholding at `eval.threshold`. A volume whose values do not look like Hounsfield
units is refused unless `input_units` is 'display' (`volumes.display_scale`). A volume is turned from its
affine so that its axial slices face the way the model's training slices did (`data.orientation`, see
orientation.py), its mask turned back (volumes.py); images are read as they are, or, with `input_window`
'match', each remapped linearly so that its 5th and 95th intensity percentiles land on the training
slices' (`intensity_matching.match_window`, as `data.unlabelled_intensity_matching=window` does for the
unlabelled pool): for slices exported in another display window than the training slices'.

Outputs, for an input named `<stem>`:
- NIfTI: `<stem>_mask.nii[.gz]` with the input's exact shape, affine and voxel order, values
  {0, 1}; `<stem>_summary.json` (lesion volume in mL, fraction of slices with lesion); and
  `<stem>_overlays/` with the slices of largest predicted lesion drawn as in the paper's Figure 5.
- Image: `<stem>_mask.png` ({0, 255}, the input's size) and `<stem>_overlay.png`.

A multi-class head writes label maps (0 background, k the k-th of `data.classes`; NIfTI, or a palette
PNG), per-class voxels and mL and, with lungs and infection, the involvement in the summary, and overlays
with one colour per class (predict_classes.py).

Before anything is written, the output folder, the checkpoint and every input are checked: images are
decoded, NIfTI headers, shapes and (uncompressed) lengths read, ground truths matched in size. A
`.nii.gz` cut short in its data shows only when that slice is read: it is a one-line error that leaves
no mask, and an output folder this run created and left empty is removed.

A volume is streamed: slices are read, predicted in fixed-size batches (at most a few in flight) and
written to the mask file as they come, so memory does not grow with the number of slices. Existing
outputs are never replaced without `overwrite`, and every file is written to a temporary name and
renamed, so an interruption leaves no half-written mask.
"""

import heapq
import pathlib

import numpy as np

from rdunet_jax import (
    config_lib,
    datasets,
    heads,
    inference,
    input_pipeline,
    metrics,
    orientation,
    predict_classes,
    prediction_files,
    predictors,
    steps,
    visualize,
    volumes,
)
from rdunet_jax.datasets import intensity_matching, readers
from rdunet_jax.datasets import labels as class_labels
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic

INPUT_WINDOWS = ("as_is", "match")


# --- Streaming prediction --------------------------------------------------------------------------------


def predict_stream(predictor, config, examples):
    """Yields (payload, probabilities at data.image_size) for each (payload, record) of `examples`, in
    order: the records preprocessed as in training (HU windowed by `data.hu_window`) and predicted in
    fixed-size batches of `eval.batch_size` (`inference.predict_batches`)."""
    batches = inference.predict_batches(
        predictor,
        examples,
        config.data.image_size,
        config.eval.batch_size,
        config.eval.test_time_flips,
        hu_window=tuple(config.data.hu_window),
    )
    for batch in batches:
        yield from zip(batch.payloads, batch.outputs["probabilities"], strict=True)


def mask_at_input_size(probabilities: np.ndarray, shape, threshold: float) -> np.ndarray:
    """The uint8 {0, 1} mask of the input's size."""
    return (input_pipeline.resize_probabilities(probabilities, shape) >= threshold).astype(np.uint8)


def predict_volume(
    predictor,
    config,
    input_file: pathlib.Path,
    outputs: dict,
    ground_truth,
    input_units: str,
    series: str | None,
) -> dict:
    """Segments one NIfTI volume slice by slice, turned to the model's orientation (`data.orientation`),
    and writes its mask (in the input's voxel order), summary and overlays."""
    image, truth = volumes.open_volume_pair(input_file, ground_truth, series=series)
    # Checked again by verify_inputs before anything was written; here it also gives the display scale.
    scale = volumes.display_scale(image, input_file, input_units)
    model_orientation = orientation.model_orientation(config.data)
    layout = orientation.volume_layout(image.affine, model_orientation)
    slices = volumes.VolumeSlices(image, truth, input_file, ground_truth, layout, truth_labels(config))
    shape, num_slices = image.shape, slices.num_slices
    threshold, hu_window = config.eval.threshold, tuple(config.data.hu_window)
    num_overlays = int(config.eval.num_overlays)
    dummy_mask = np.zeros((config.data.image_size,) * 2, np.uint8)

    def examples():
        for index in range(num_slices):
            hu_slice = slices.image_slice(index)
            if scale is not None:
                hu_slice = volumes.display_slice(hu_slice, scale)
            yield (index, hu_slice), {"image": hu_slice, "mask": dummy_mask}

    lesion_voxels, slices_with_lesion, counts = 0, 0, np.zeros(3, np.int64)
    largest = []  # a min-heap of (lesion pixels, -index, ...): the slices to draw
    head = config.model.get("head", "binary")
    tally = predict_classes.ClassTally(config) if head != "binary" else None
    with slices.mask_writer(outputs["mask"]) as write:
        for (index, hu_slice), probabilities in predict_stream(predictor, config, examples()):
            expert_labels = None if truth is None else slices.truth_slice(index)
            if tally is None:
                mask = drawn = mask_at_input_size(probabilities, hu_slice.shape, threshold)
                write(index, mask)
            else:
                drawn = tally.add(probabilities, hu_slice.shape, expert_labels)
                write(index, heads.masks_to_label_map(drawn))
                mask = heads.any_lesion(drawn, head, tally.classes).astype(np.uint8)
            pixels = int(mask.sum())
            lesion_voxels += pixels
            slices_with_lesion += pixels > 0
            target = drawn_target = None
            if truth is not None:
                labels = np.rint(expert_labels)
                if tally is None:
                    target = drawn_target = np.isin(labels, readers.NIFTI_LESION_LABELS)
                else:  # the expert's classes drawn, and their lesion scored, as the prediction's are
                    drawn_target = class_labels.label_map_class_masks(labels, head, tally.classes)
                    target = heads.any_lesion(drawn_target, head, tally.classes)
                tp, fp, fn, _ = metrics.confusion_counts(mask[None], target[None])
                counts += np.concatenate([tp, fp, fn])
            if pixels and num_overlays:
                if scale is None:
                    shown = input_pipeline.window_hounsfield(hu_slice, hu_window)
                else:
                    shown = hu_slice.astype(np.float32) / 255.0
                entry = (pixels, -index, shown, drawn, drawn_target)
                (heapq.heappush if len(largest) < num_overlays else heapq.heappushpop)(largest, entry)
    write_volume_overlays(outputs["overlays"], largest, model_orientation, tuple(config.data.classes))
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
        "orientation_in_header": volumes.header_orientation(image),
        **prediction_settings(config, predictor),
    }
    if tally is not None:
        summary.update(tally.summary(voxel_ml, with_expert=truth is not None))
    geometry = getattr(image, "dicom_geometry", None)
    if geometry is not None:
        import nibabel

        from rdunet_jax import dicom

        # The mask just written, read back whole: a SEG is encoded from all its frames at once.
        mask_volume = np.asarray(nibabel.load(outputs["mask"]).dataobj)
        class_names = None if tally is None else tuple(config.data.classes)
        dicom.write_segmentation(outputs["segmentation"], geometry, mask_volume, predictor.step, class_names)
        summary["series_uid"] = str(geometry.files[0][1].SeriesInstanceUID)
        summary["segmentation"] = str(outputs["segmentation"])
    if truth is not None:
        tp, fp, fn = (int(count) for count in counts)
        summary["ground_truth"] = str(ground_truth)
        summary["dice_with_ground_truth"] = float(metrics.slice_metrics(tp, fp, fn)["dice"])
    write_json_atomic(outputs["summary"], summary)
    return summary


def write_volume_overlays(
    folder: pathlib.Path, largest: list, model_orientation: str, class_names=()
) -> None:
    """Writes `slice_NNNN.png` overlays of the kept slices, in radiological display (the folder exists
    even when none has lesion); NNNN counts the model's slices. A kept slice's masks are one lesion mask,
    or class masks (rows, columns, K) drawn one colour per class."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("slice_*.png"):
        old.unlink()

    def shown(array):
        return orientation.to_display(array, model_orientation)

    for _, negative_index, display, mask, target in largest:
        target = None if target is None else shown(target)
        if mask.ndim == 3:
            rgb = visualize.class_overlay_image(shown(display), shown(mask), target, class_names)
        else:
            rgb = visualize.overlay_image(shown(display), shown(mask), target)
        visualize.write_png(folder / f"slice_{-negative_index:04d}.png", rgb)


def prediction_settings(config, predictor) -> dict:
    """What a prediction depended on, for its summary."""
    return {
        "checkpoint_step": predictor.step,
        "threshold": float(config.eval.threshold),
        "test_time_flips": bool(config.eval.test_time_flips),
        "runtime": str(config.eval.runtime),
        "image_size": int(config.data.image_size),
        "hu_window": [float(value) for value in config.data.hu_window],
    }


# --- Images ----------------------------------------------------------------------------------------------


def predict_images(predictor, config, jobs: list[tuple], window_reference=None) -> None:
    """Segments PNG/JPEG slices, batched together; writes each mask ({0, 255}) and overlay. With
    `window_reference` (a 256-level histogram), each slice is window-matched to it before the model."""
    dummy_mask = np.zeros((config.data.image_size,) * 2, np.uint8)

    def examples():
        for input_file, outputs, ground_truth in jobs:
            image = readers.read_grayscale_image(input_file)
            model_input = image
            if window_reference is not None:
                model_input = intensity_matching.match_window(image, window_reference)
            yield (input_file, outputs, ground_truth, image), {"image": model_input, "mask": dummy_mask}

    for payload, probabilities in predict_stream(predictor, config, examples()):
        input_file, outputs, ground_truth, image = payload
        target = None
        if ground_truth is not None:  # checked before anything of this input is written
            target = read_image_truth(image, input_file, ground_truth, config)
        if config.model.get("head", "binary") != "binary":
            predict_classes.write_image_outputs(outputs, image, probabilities, config, target)
            continue
        mask = mask_at_input_size(probabilities, image.shape, config.eval.threshold)
        visualize.write_png(outputs["mask"], mask * 255)
        visualize.write_png(outputs["overlay"], visualize.overlay_image(image, mask, target))


def read_image_truth(image, input_file, ground_truth, config) -> np.ndarray:
    """A slice's expert mask, of its size: {0, 1} for a binary model, else a label map 0..K (k the k-th
    of `data.classes`), as the multi-class models' own masks are."""
    if config.model.get("head", "binary") == "binary":
        target = readers.read_binary_mask(ground_truth)
    else:
        target = readers.read_label_image(ground_truth, range(len(config.data.classes) + 1))
    readers.check_same_size(image, target, input_file, ground_truth)
    return target


# --- The command -----------------------------------------------------------------------------------------


def truth_labels(config) -> tuple[int, ...]:
    """The values an expert mask volume may hold: a binary model's NIfTI labels (lesions 1 and 2), else
    0..K for the K classes."""
    if config.model.get("head", "binary") == "binary":
        return readers.NIFTI_LABELS
    return tuple(range(len(config.data.classes) + 1))


def verify_inputs(jobs: list[tuple], input_units: str, series: str | None, config) -> None:
    """Reads every input and ground truth as far as can be done cheaply (images decoded; NIfTI header,
    shape, (uncompressed) length and the units of a few slices) and checks their sizes agree, so a bad
    file fails before any output is written."""
    for input_file, _, ground_truth in jobs:
        if volumes.input_kind(input_file) in ("nifti", "dicom"):
            image, truth = volumes.open_volume_pair(
                input_file, ground_truth, keep_file_open=False, series=series
            )
            volumes.display_scale(image, input_file, input_units)
            volumes.warn_without_orientation(image, input_file)
            if truth is not None:  # its middle slice; prediction checks every slice as it reads it
                middle = volumes.volume_slice(truth, truth.shape[2] // 2, ground_truth)
                volumes.check_truth_labels(middle, ground_truth, truth_labels(config))
            if hasattr(image, "dicom_geometry"):
                from rdunet_jax import dicom

                dicom.segmentation_writer()
                dicom.check_segmentation_references(image.dicom_geometry)
                dicom.print_warnings(image.dicom_geometry)
        else:
            image = readers.read_grayscale_image(input_file)
            if ground_truth is not None:
                read_image_truth(image, input_file, ground_truth, config)


def predict_path(
    config,
    workdir,
    input_path,
    output_dir,
    overwrite: bool = False,
    checkpoint_step: int | None = None,
    ground_truth=None,
    predictor: inference.Predictor | None = None,
    input_units: str | None = None,
    series: str | None = None,
    input_window: str = "as_is",
) -> list[dict]:
    """Segments `input_path` with a checkpoint of `workdir` into `output_dir` (`--mode predict`); returns
    the summaries of the volumes. Outputs, inputs and the checkpoint are checked before anything is
    written; on failure, output folders this call created and left empty are removed.

    Args: `config`, the run's config; `workdir`, the run folder; `input_path`, a NIfTI volume, a PNG/JPEG
    slice, a folder of either, or a folder holding a DICOM series; `output_dir`, where outputs go;
    `overwrite`, replace existing outputs (refused otherwise); `checkpoint_step`, that step instead of the
    `eval.checkpoint`; `ground_truth`, the expert mask (a file for one input, else a folder of same-named
    files); `predictor`, run this instead of restoring `workdir` (then `workdir`, `checkpoint_step` and
    `eval.runtime` are unused); `input_units`, how volumes hold their values (volumes.INPUT_UNITS; 'hu'
    when None; images are always display, so given for PNG/JPEG slices alone it is refused); `series`,
    the SeriesInstanceUID to read from a folder of several series; `input_window`, 'as_is' or 'match'
    (PNG/JPEG slices window-matched to the training slices).
    """
    if not input_path or not output_dir:
        raise UserError("--mode=predict needs --input (a NIfTI/PNG/JPEG file or a folder) and --output")
    if input_units is not None and input_units not in volumes.INPUT_UNITS:
        raise UserError(f"--input_units: {input_units!r} is not one of {list(volumes.INPUT_UNITS)}")
    if input_window not in INPUT_WINDOWS:
        raise UserError(f"--input_window: {input_window!r} is not one of {list(INPUT_WINDOWS)}")
    inputs = prediction_files.list_inputs(input_path)
    volume = next((path for path in inputs if volumes.input_kind(path) in ("nifti", "dicom")), None)
    if input_units is not None and volume is None:
        raise UserError(
            f"--input_units={input_units}: {input_path} holds PNG/JPEG slices only, which are always read as "
            "8-bit display images; it applies to volumes (NIfTI, DICOM)"
        )
    input_units = input_units or "hu"
    if input_window == "match":
        if volume is not None:
            raise UserError(
                f"--input_window=match: {volume} is a volume; it applies to PNG/JPEG slices only "
                "(a volume in Hounsfield units is windowed by data.hu_window)"
            )
    if series and not any(volumes.input_kind(input_file) == "dicom" for input_file in inputs):
        raise UserError(f"--series: {input_path} is not a folder of DICOM files")
    output_dir = pathlib.Path(output_dir)
    prediction_files.check_output_folder(output_dir)
    prediction_files.check_output_outside_input(pathlib.Path(input_path), output_dir, inputs)
    prediction_files.check_outputs_free(inputs, output_dir, overwrite)
    single = len(inputs) == 1
    jobs = [
        (
            input_file,
            prediction_files.output_paths(input_file, output_dir),
            prediction_files.ground_truth_for(input_file, ground_truth, single),
        )
        for input_file in inputs
    ]
    _check_ground_truth_found(jobs, ground_truth, single)
    # The training slices are read before the checkpoint is restored, so missing data fails fast.
    window_reference = _training_window(config) if input_window == "match" else None
    if predictor is None:
        config_lib.check_run_data(config, workdir, "predict")
        model = inference.build_model(config)
        state = steps.restore_state(config, workdir, checkpoint_step, model=model)
    verify_inputs(jobs, input_units, series, config)
    if predictor is None:
        predictor = predictors.for_config(config, model, state)
    created = prediction_files.missing_folders(output_dir)
    try:
        prediction_files.make_output_folder(output_dir)
        return _predict_jobs(predictor, config, jobs, output_dir, input_units, series, window_reference)
    except BaseException:
        prediction_files.remove_empty_folders(created)
        raise


def _check_ground_truth_found(jobs: list[tuple], ground_truth, single: bool) -> None:
    """A `--ground_truth` folder must hold the mask of at least one input; inputs without one are said."""
    # One input takes `--ground_truth` as its mask file, or, given a folder, the mask found in it.
    if ground_truth is None or (single and not pathlib.Path(ground_truth).is_dir()):
        return
    missing = [input_file for input_file, _, truth in jobs if truth is None]
    if len(missing) == len(jobs):
        raise UserError(
            f"--ground_truth: no file in {ground_truth} has the name of an input (first: {missing[0].name})"
        )
    if missing:
        print(
            f"warning: --ground_truth: no mask in {ground_truth} for {len(missing)} of {len(jobs)} inputs "
            f"(first: {missing[0].name}); they are predicted without one",
            flush=True,
        )


def _training_window(config) -> np.ndarray:
    """The training slices' pooled histogram, the reference of `--input_window=match`; says their window."""
    reference = datasets.training_intensity_counts(config.data)
    low, high = intensity_matching.reference_percentiles(reference, intensity_matching.WINDOW_PERCENTILES)
    print(
        f"--input_window=match: each slice's 5th and 95th intensity percentiles mapped onto the training "
        f"slices' ({low:.1f}, {high:.1f} of 255; data.name={config.data.name!r})",
        flush=True,
    )
    return reference


def _predict_jobs(
    predictor,
    config,
    jobs: list[tuple],
    output_dir: pathlib.Path,
    input_units: str,
    series: str | None,
    window_reference=None,
) -> list[dict]:
    summaries, image_jobs = [], []
    for input_file, outputs, truth in jobs:
        if volumes.input_kind(input_file) in ("nifti", "dicom"):
            try:
                summary = predict_volume(predictor, config, input_file, outputs, truth, input_units, series)
            except BaseException:
                # A volume's outputs are one set: none is left without the others (the mask without its
                # SEG or summary).
                prediction_files.remove_outputs(outputs)
                raise
            print(
                f"{input_file}: lesion {summary['lesion_volume_ml']:.1f} mL in "
                f"{summary['slices_with_lesion']}/{summary['num_slices']} slices -> {outputs['mask']}",
                flush=True,
            )
            summaries.append(summary)
        else:
            image_jobs.append((input_file, outputs, truth))
    if image_jobs:
        predict_images(predictor, config, image_jobs, window_reference)
        print(f"{len(image_jobs)} image(s) -> {output_dir}", flush=True)
    return summaries
