"""Evaluation: restore a checkpoint, predict a split, and write its metrics, tables and overlays.

`--mode evaluate` restores the `eval.checkpoint` (best or last) of a workdir (or `--checkpoint_step`) and
writes, for `eval.split`:
- `metrics/<split>.json`: means and standard deviations over slices, pooled (global) values, HD95,
  per-volume values (when slices carry a case id), the lesion-size table and the conventions used;
- `metrics/<split>_slices.csv`: one row per slice;
- `metrics/<split>.md`: the paper's Table 1 (DSC, JC, F-score) and Table 2 (lesion size) forms;
- `metrics/overlays/<split>/`: the best and worst slices with predicted and expert outlines.

Metrics are computed at the model's resolution (`data.image_size`), where validation computes them
during training, so test and validation numbers compare. Millimetres use the slice's spacing scaled by
the resize. The overlap metrics are also computed at each slice's original resolution (probabilities
resized back bilinearly and scored against the expert mask as stored), the way published results on
COVID-SemiSeg are scored, under `original_resolution`. Every file is a pure function of the checkpoint
and the data: evaluating twice gives identical bytes.
"""

import csv
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import (
    checkpoints,
    config_lib,
    datasets,
    devices,
    input_pipeline,
    metrics,
    models,
    onnx_export,
    steps,
    visualize,
)
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic, write_text_atomic

# nnU-Net's mirroring in 2-D: none, left-right, up-down, both (axes of an NHWC batch).
TEST_TIME_FLIPS = ((), (2,), (1,), (1, 2))

CONVENTIONS = {
    "resolution": "metrics are computed on masks resized to data.image_size (nearest neighbour), "
    "as validation during training; millimetres scale the slice spacing by the resize",
    "empty_slices": "Dice, Jaccard, precision, recall: 1.0 when mask and prediction are both empty, "
    "0.0 when only one is",
    "f_score": "harmonic mean of the mean precision and the mean recall over slices (the paper's "
    "F-score formula equals Dice)",
    "global": "global_* values pool TP, FP and FN over the split before taking the ratio",
    "hd95": "95th percentile of the symmetric distances between the borders (4-connected) of prediction "
    "and mask (MedPy's hd95); slices with both masks empty are excluded and counted "
    "(hd95_num_both_empty), slices with exactly one empty mask are counted apart (hd95_num_one_empty); "
    "neither enters hd95 or hd95_std",
    "per_volume": "slices grouped by case id and placed at their slice index; counts pooled per volume; "
    "3-D HD95 with the volume's voxel spacing",
    "lesions": "ground-truth lesions are 8-connected components of a slice's mask; a lesion is detected "
    "when a predicted pixel overlaps it; its Dice is against the predicted components that overlap it; "
    "small when its area is below eval.small_lesion_area",
    "original_resolution": "original_resolution.* score each slice at the size of its stored expert mask: "
    "probabilities resized bilinearly to it, thresholded, against the mask as stored (as Inf-Net's "
    "COVID-SemiSeg results are scored)",
    "test_time_flips": "when on, probabilities are the mean over the identity, left-right, up-down and "
    "both flips of the input, each flipped back",
}


# --- Batches and prediction ----------------------------------------------------------------------------


def slice_metadata(record: dict, image_size: int) -> dict:
    """What evaluation needs of a record besides pixels: ids, slice index and the pixel spacing of the
    slice after resizing to `image_size` (None when the data carries no spacing)."""
    shape = np.asarray(record["image"]).shape
    spacing = record.get("spacing")
    meta = {
        "id": str(record["id"]),
        "case_id": str(record["case_id"]) if "case_id" in record else None,
        "slice_index": int(record["slice_index"]) if "slice_index" in record else None,
        "pixel_spacing": None,
        "slice_spacing": None,
    }
    if spacing is not None:
        spacing = np.asarray(spacing, np.float64)
        meta["pixel_spacing"] = (
            float(spacing[0] * shape[0] / image_size),
            float(spacing[1] * shape[1] / image_size),
        )
        meta["slice_spacing"] = float(spacing[2])
    return meta


def padded_batches(source, image_size: int, batch_size: int):
    """Yields (batch, metadata, original masks) in source order with the training preprocessing; every
    batch has `batch_size` rows (the last zero-padded), so evaluation never compiles a second shape."""
    for start in range(0, len(source), batch_size):
        batch = {
            "image": np.zeros((batch_size, image_size, image_size, 1), np.float32),
            "mask": np.zeros((batch_size, image_size, image_size, 1), np.float32),
        }
        metadata, original_masks = [], []
        for row, index in enumerate(range(start, min(start + batch_size, len(source)))):
            record = source[index]
            example = input_pipeline.preprocess(record, image_size)
            batch["image"][row], batch["mask"][row] = example["image"], example["mask"]
            metadata.append(slice_metadata(record, image_size))
            original_masks.append(record["mask"])
        yield batch, metadata, original_masks


def original_resolution_counts(probabilities, original_mask, threshold: float) -> tuple[int, ...]:
    """(TP, FP, FN, TN) of one slice scored at the size of its stored expert mask (lesion where > 0)."""
    target = np.asarray(original_mask) > 0
    prediction = input_pipeline.resize_probabilities(probabilities, target.shape) >= threshold
    return tuple(int(count[0]) for count in metrics.confusion_counts(prediction[None], target[None]))


def _mirrored_probabilities(state, batch: dict, probabilities, test_time_flips: bool):
    """`probabilities`, or their mean with those of the flipped batches flipped back."""
    if not test_time_flips:
        return probabilities
    for axes in TEST_TIME_FLIPS[1:]:
        flipped = {key: jnp.flip(value, axis=axes) for key, value in batch.items()}
        probabilities = probabilities + jnp.flip(steps.eval_step(state, flipped)["probabilities"], axis=axes)
    return probabilities / len(TEST_TIME_FLIPS)


def with_runtime(config, state):
    """`state`, or its export in ONNX Runtime when `eval.runtime` asks for it (what evaluation and
    prediction run; training and its per-epoch validation always run in JAX)."""
    if config.eval.runtime == "onnxruntime" and not isinstance(state, onnx_export.OnnxRuntimeModel):
        return onnx_export.runtime_model(config, state)
    return state


def dispatch_batch(state, images: np.ndarray, test_time_flips: bool = False):
    """Lesion probabilities (N, H, W, 1) of a batch of images: from JAX, a device array still being
    computed (JAX dispatches asynchronously: the caller prepares the next batch meanwhile); from ONNX
    Runtime, a computed numpy array."""
    if isinstance(state, onnx_export.OnnxRuntimeModel):
        return state.dispatch_batch(images, test_time_flips)
    batch = {"image": images, "mask": np.zeros_like(images)}
    probabilities = steps.eval_step(state, batch)["probabilities"]
    return _mirrored_probabilities(state, batch, probabilities, test_time_flips)


def predict_batch(state, batch: dict, test_time_flips: bool = False) -> dict:
    """Per-image loss and lesion probabilities (N, H, W) of a batch, optionally averaged over flips."""
    if isinstance(state, onnx_export.OnnxRuntimeModel):
        return state.predict_batch(batch, test_time_flips)
    outputs = steps.eval_step(state, batch)
    probabilities = _mirrored_probabilities(state, batch, outputs["probabilities"], test_time_flips)
    loss, probabilities = jax.device_get((outputs["loss"], probabilities))
    return {"loss": np.asarray(loss), "probabilities": np.asarray(probabilities)[..., 0]}


def predict_source(state, source, config, test_time_flips: bool = False):
    """Yields per batch a dict of metadata, images, masks, probabilities and losses of its real rows, and
    the masks as stored (`original_masks`, each at its own size)."""
    batches = padded_batches(source, config.data.image_size, config.eval.batch_size)
    for batch, metadata, original_masks in batches:
        outputs = predict_batch(state, batch, test_time_flips)
        count = len(metadata)
        yield {
            "metadata": metadata,
            "images": batch["image"][:count, ..., 0],
            "masks": batch["mask"][:count, ..., 0],
            "probabilities": outputs["probabilities"][:count],
            "losses": outputs["loss"][:count],
            "original_masks": original_masks,
        }


def evaluate_source(state, source, config, test_time_flips: bool = False) -> dict:
    """Mean loss and the metric summary of `state` on every slice of `source` (the per-epoch validation)."""
    counts, slice_losses = [], []
    for batch in predict_source(state, source, config, test_time_flips):
        counts.append(
            metrics.confusion_counts(batch["probabilities"] >= config.eval.threshold, batch["masks"])
        )
        slice_losses.append(batch["losses"])
    tp, fp, fn, tn = (np.concatenate(column) for column in zip(*counts, strict=True))
    summary = metrics.summarize(tp, fp, fn, tn)
    summary["loss"] = float(np.mean(np.concatenate(slice_losses)))
    return summary


# --- The full evaluation of a split ----------------------------------------------------------------------


def _spacing_unit(all_metadata) -> str:
    """'mm' when every slice knows its spacing, else 'pixels'."""
    known = all_metadata and all(meta["pixel_spacing"] is not None for meta in all_metadata)
    return "mm" if known else "pixels"


def collect_slices(state, source, config) -> dict:
    """Predicts every slice of `source` and keeps what the reports need: per-slice counts, HD95 and
    lesion statistics, and (for cases) bit-packed masks to rebuild volumes. Memory: two bits per pixel."""
    threshold, flips = config.eval.threshold, config.eval.test_time_flips
    rows, lesions, losses, packed = [], [], [], []
    for batch in predict_source(state, source, config, flips):
        predictions = batch["probabilities"] >= threshold
        targets = batch["masks"] > 0.5
        for meta, prediction, target, loss, probabilities, original_mask in zip(
            batch["metadata"],
            predictions,
            targets,
            batch["losses"],
            batch["probabilities"],
            batch["original_masks"],
            strict=True,
        ):
            spacing = meta["pixel_spacing"]
            tp, fp, fn, tn = (
                int(count[0]) for count in metrics.confusion_counts(prediction[None], target[None])
            )
            rows.append(
                {
                    **meta,
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "tn": tn,
                    "hd95_mm": metrics.hausdorff95(prediction, target, spacing) if spacing else None,
                    "hd95_pixels": metrics.hausdorff95(prediction, target),
                    "lesion_pixels": int(target.sum()),
                    "predicted_pixels": int(prediction.sum()),
                    "original_counts": original_resolution_counts(probabilities, original_mask, threshold),
                }
            )
            pixel_area_mm2 = spacing[0] * spacing[1] if spacing else None
            for lesion in metrics.lesion_statistics(prediction, target):
                lesion["area_mm2"] = lesion["area"] * pixel_area_mm2 if spacing else None
                lesions.append(lesion)
            losses.append(float(loss))
            if meta["case_id"] is not None:
                packed.append((np.packbits(prediction), np.packbits(target)))
    unit = _spacing_unit(rows)
    for row in rows:
        row["hd95"] = row["hd95_mm"] if unit == "mm" else row["hd95_pixels"]
    for lesion in lesions:
        lesion["area"] = lesion["area_mm2"] if unit == "mm" else lesion["area"]
    return {"rows": rows, "lesions": lesions, "losses": losses, "packed": packed, "unit": unit}


def _volume_hd95(slices, image_size: int, unit: str) -> float:
    """3-D HD95 of one case's slices placed at their slice indices."""
    first = min(meta["slice_index"] for meta, _, _ in slices)
    depth = max(meta["slice_index"] for meta, _, _ in slices) - first + 1
    prediction = np.zeros((image_size, image_size, depth), bool)
    target = np.zeros_like(prediction)
    pixels = image_size * image_size
    for meta, packed_prediction, packed_target in slices:
        position = meta["slice_index"] - first
        prediction[:, :, position] = np.unpackbits(packed_prediction)[:pixels].reshape(image_size, image_size)
        target[:, :, position] = np.unpackbits(packed_target)[:pixels].reshape(image_size, image_size)
    meta = slices[0][0]
    spacing = (*meta["pixel_spacing"], meta["slice_spacing"]) if unit == "mm" else None
    return metrics.hausdorff95(prediction, target, spacing)


def per_volume_summary(collected: dict, image_size: int) -> dict | None:
    """Per-case metrics from the case's pooled counts and 3-D HD95, and their mean and std over cases;
    None when slices carry no case id."""
    rows = collected["rows"]
    if not rows or any(row["case_id"] is None for row in rows):
        return None
    by_case: dict[str, list] = {}
    for row, (packed_prediction, packed_target) in zip(rows, collected["packed"], strict=True):
        by_case.setdefault(row["case_id"], []).append((row, packed_prediction, packed_target))
    cases = {}
    for case_id in sorted(by_case):
        slices = by_case[case_id]
        counts = [sum(row[key] for row, _, _ in slices) for key in ("tp", "fp", "fn", "tn")]
        values = {name: float(value) for name, value in metrics.slice_metrics(*counts).items()}
        values["hd95"] = _volume_hd95(slices, image_size, collected["unit"])
        values["num_slices"] = len(slices)
        cases[case_id] = values
    summary = {"num_volumes": len(cases)}
    for name in ("dice", "jaccard", "precision", "recall", "specificity"):
        values = np.array([case[name] for case in cases.values()])
        summary[name], summary[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    summary.update(metrics.summarize_hausdorff95([case["hd95"] for case in cases.values()]))
    summary.pop("hd95_num_slices")
    summary["hd95_num_volumes"] = int(sum(np.isfinite(case["hd95"]) for case in cases.values()))
    for case in cases.values():
        case["hd95"] = case["hd95"] if np.isfinite(case["hd95"]) else None
    summary["cases"] = cases
    return summary


def summarize_collected(collected: dict, config) -> dict:
    """The metrics JSON of a split: the existing keys (means, stds, global_*, num_slices, loss) plus HD95,
    per-volume values, the lesion-size table and the conventions."""
    rows = collected["rows"]
    counts = [np.array([row[key] for row in rows]) for key in ("tp", "fp", "fn", "tn")]
    summary = metrics.summarize(*counts)
    summary["loss"] = float(np.mean(collected["losses"]))
    summary.update(metrics.summarize_hausdorff95([row["hd95"] for row in rows]))
    summary["hd95_unit"] = collected["unit"]
    original_counts = np.array([row["original_counts"] for row in rows]).reshape(-1, 4)
    summary["original_resolution"] = metrics.summarize(*original_counts.T)
    summary["num_slices_with_lesion"] = int(sum(row["lesion_pixels"] > 0 for row in rows))
    summary["per_volume"] = per_volume_summary(collected, config.data.image_size)
    small_area = float(config.eval.small_lesion_area)
    summary["lesion_size"] = {
        "small_area": small_area,
        "area_unit": "mm^2" if collected["unit"] == "mm" else "pixels",
        **metrics.lesion_size_summary(collected["lesions"], small_area),
    }
    summary["image_size"] = int(config.data.image_size)
    summary["test_time_flips"] = bool(config.eval.test_time_flips)
    summary["conventions"] = CONVENTIONS
    return summary


# --- Files -----------------------------------------------------------------------------------------------

SLICE_COLUMNS = (
    "id",
    "case_id",
    "slice_index",
    "dice",
    "jaccard",
    "precision",
    "recall",
    "specificity",
    "hd95",
    "hd95_status",
    "lesion_pixels",
    "predicted_pixels",
)


def _number(value) -> str:
    """A float with 6 significant digits, as CSV and markdown show it."""
    return f"{value:.6g}"


def slices_csv(rows: list[dict]) -> str:
    """The per-slice CSV: one row per slice; hd95 is empty unless both masks have lesion (hd95_status)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SLICE_COLUMNS)
    for row in rows:
        values = metrics.slice_metrics([row["tp"]], [row["fp"]], [row["fn"]], [row["tn"]])
        hd95 = row["hd95"]
        status = "ok" if np.isfinite(hd95) else ("both_empty" if np.isnan(hd95) else "one_empty")
        writer.writerow(
            [
                row["id"],
                "" if row["case_id"] is None else row["case_id"],
                "" if row["slice_index"] is None else row["slice_index"],
                *(
                    _number(values[name][0])
                    for name in ("dice", "jaccard", "precision", "recall", "specificity")
                ),
                _number(hd95) if status == "ok" else "",
                status,
                row["lesion_pixels"],
                row["predicted_pixels"],
            ]
        )
    return buffer.getvalue()


def _mean_std(summary: dict, name: str) -> str:
    value, std = summary.get(name), summary.get(f"{name}_std")
    if value is None:
        return "n/a"
    return f"{value:.4f} ± {std:.4f}"


def markdown_report(summary: dict, config) -> str:
    """`metrics/<split>.md`: Table 1 (DSC, JC, F-score and more), per-volume values, Table 2 (lesion size)."""
    unit = "mm" if summary["hd95_unit"] == "mm" else "px"
    flips = "on" if summary["test_time_flips"] else "off"
    lines = [
        f"# {config.name}: evaluation on the {summary['split']} split",
        "",
        f"Checkpoint step {summary['step']}, threshold {summary['threshold']}, test-time flips {flips}; "
        f"{summary['num_slices']} slices at {summary['image_size']}x{summary['image_size']} px, "
        f"{summary['num_slices_with_lesion']} with lesion.",
        "",
        "## Segmentation (the form of the paper's Table 1)",
        "",
        f"| Model | DSC | JC | F-score | Precision | Recall | Specificity | HD95 ({unit}) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {config.model.variant} | {_mean_std(summary, 'dice')} | {_mean_std(summary, 'jaccard')} | "
        f"{summary['f_score']:.4f} | {_mean_std(summary, 'precision')} | {_mean_std(summary, 'recall')} | "
        f"{_mean_std(summary, 'specificity')} | {_mean_std(summary, 'hd95')} |",
        "",
        "Mean ± standard deviation over slices. F-score: harmonic mean of mean precision and mean recall. "
        f"Pooled over the split: DSC {summary['global_dice']:.4f}, JC {summary['global_jaccard']:.4f}, "
        f"precision {summary['global_precision']:.4f}, recall {summary['global_recall']:.4f}. "
        f"HD95 over the {summary['hd95_num_slices']} slices where both masks have lesion; "
        f"{summary['hd95_num_one_empty']} slices with exactly one empty mask counted apart, "
        f"{summary['hd95_num_both_empty']} with both empty excluded.",
        "",
        _original_resolution_sentence(summary["original_resolution"]),
    ]
    volumes = summary["per_volume"]
    if volumes:
        lines += [
            "",
            "## Per volume",
            "",
            f"| Case | Slices | DSC | JC | Precision | Recall | HD95 ({unit}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for case_id, case in volumes["cases"].items():
            hd95 = "n/a" if case["hd95"] is None else f"{case['hd95']:.2f}"
            lines.append(
                f"| {case_id} | {case['num_slices']} | {case['dice']:.4f} | {case['jaccard']:.4f} | "
                f"{case['precision']:.4f} | {case['recall']:.4f} | {hd95} |"
            )
        lines.append(
            f"| mean ± std ({volumes['num_volumes']} volumes) | | {_mean_std(volumes, 'dice')} | "
            f"{_mean_std(volumes, 'jaccard')} | {_mean_std(volumes, 'precision')} | "
            f"{_mean_std(volumes, 'recall')} | {_mean_std(volumes, 'hd95')} |"
        )
    sizes = summary["lesion_size"]
    area_unit = sizes["area_unit"]
    lines += [
        "",
        "## Lesion size (the form of the paper's Table 2)",
        "",
        "Lesions: 8-connected components of the ground truth in a slice; detected when a predicted pixel "
        "overlaps; Dice against the overlapping predicted components.",
        "",
        f"| Lesions | Count | Mean area ({area_unit}) | Detection rate | DSC |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "small": f"Small (< {sizes['small_area']:g} {area_unit})",
        "large": f"Large (≥ {sizes['small_area']:g} {area_unit})",
        "all": "All",
    }
    for group, label in labels.items():
        values = sizes[group]
        if not values["num_lesions"]:
            lines.append(f"| {label} | 0 | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {values['num_lesions']} | {values['mean_area']:.1f} | "
            f"{values['detection_rate']:.4f} | {_mean_std(values, 'dice')} |"
        )
    return "\n".join(lines) + "\n"


def _original_resolution_sentence(original: dict) -> str:
    return (
        "At each slice's original resolution (probabilities resized bilinearly to the stored expert "
        f"mask, as published COVID-SemiSeg results are scored): DSC {_mean_std(original, 'dice')}, "
        f"JC {_mean_std(original, 'jaccard')}, F-score {original['f_score']:.4f}, "
        f"pooled DSC {original['global_dice']:.4f}."
    )


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def ranked_slices(rows: list[dict], count: int) -> tuple[list[int], list[int]]:
    """Indices of the `count` best and worst slices by Dice among slices where the mask or the
    prediction has lesion (both-empty slices score 1.0 trivially); ties keep source order."""
    scored = []
    for index, row in enumerate(rows):
        if row["lesion_pixels"] or row["predicted_pixels"]:
            dice = metrics.slice_metrics([row["tp"]], [row["fp"]], [row["fn"]])["dice"][0]
            scored.append((float(dice), index))
    best = [index for _, index in sorted(scored, key=lambda item: (-item[0], item[1]))[:count]]
    worst = [index for _, index in sorted(scored, key=lambda item: (item[0], item[1]))[:count]]
    return best, worst


def _subset(source, indices) -> datasets.SubsetSource:
    """The records of `source` at `indices`, as a sequence."""
    entries = [(source, index) for index in indices]
    return datasets.SubsetSource(entries, getattr(source, "name", ""), getattr(source, "split", ""))


def overlays_of(state, source, indices, config) -> list[tuple[str, np.ndarray]]:
    """(id, RGB overlay) of the slices of `source` at `indices`, predicted again (same batch shape)."""
    flips = config.eval.test_time_flips
    overlays = []
    for batch in predict_source(state, _subset(source, indices), config, flips):
        predictions = batch["probabilities"] >= config.eval.threshold
        for meta, image, prediction, target in zip(
            batch["metadata"], batch["images"], predictions, batch["masks"], strict=True
        ):
            overlays.append((meta["id"], visualize.overlay_image(image, prediction, target > 0.5)))
    return overlays


def validation_overlays(state, source, config, count: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Overlays of the first `count` slices of `source` (eval.num_overlays by default): TensorBoard images
    that show the same slices at every evaluation."""
    count = config.eval.num_overlays if count is None else count
    return overlays_of(state, source, range(min(count, len(source))), config)


def write_overlays(state, source, rows, config, folder: pathlib.Path) -> list[pathlib.Path]:
    """Writes best_NN_<id>.png and worst_NN_<id>.png into `folder`, replacing earlier overlays there."""
    best, worst = ranked_slices(rows, int(config.eval.num_overlays))
    if folder.exists():
        for old in folder.glob("*.png"):
            old.unlink()
    written = []
    for kind, indices in (("best", best), ("worst", worst)):
        for rank, (slice_id, rgb) in enumerate(overlays_of(state, source, indices, config), start=1):
            path = folder / f"{kind}_{rank:02d}_{_file_safe(slice_id)}.png"
            visualize.write_png(path, rgb)
            written.append(path)
    return written


# --- Restoring and the command ---------------------------------------------------------------------------


def default_split(config) -> str:
    """`eval.split`, falling back to validation when the test split is held out or absent."""
    if config.eval.split == "test" and not datasets.has_split(config.data, "test"):
        return "validation"
    return config.eval.split


# eval.checkpoint -> the checkpoints.RunCheckpoints kind it restores.
_CHECKPOINT_KINDS = {"best": "best", "last": "latest"}


def restore_for_evaluation(config, workdir, checkpoint_step: int | None = None):
    """The train state of `workdir`'s `eval.checkpoint` (best or last), or the given step of `latest`.
    Creates nothing: a workdir without checkpoints, an unknown step or a damaged checkpoint is a UserError."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"--workdir: no checkpoint in {directory.absolute()}; train first")
    config_lib.validate(config)
    devices.enable_compilation_cache(config.compilation_cache_dir)
    model = models.build_model(config.model)
    run_checkpoints = checkpoints.RunCheckpoints(directory, create=False)
    try:
        target = steps.abstract_train_state(config, model, steps_per_epoch=1)
        available = sorted(set(run_checkpoints.all_steps("latest")) | set(run_checkpoints.all_steps("best")))
        kind = _CHECKPOINT_KINDS[config.eval.checkpoint] if checkpoint_step is None else "latest"
        if checkpoint_step is not None and checkpoint_step not in run_checkpoints.all_steps(kind):
            kind = "best"
            if checkpoint_step not in run_checkpoints.all_steps(kind):
                raise UserError(
                    f"--checkpoint_step: no checkpoint at step {checkpoint_step} in "
                    f"{run_checkpoints.directory}; available steps: {available}"
                )
        saved_steps = run_checkpoints.all_steps(kind)
        if not saved_steps:
            raise UserError(f"--workdir: no checkpoint in {run_checkpoints.directory}; train first")
        step = max(saved_steps) if checkpoint_step is None else checkpoint_step
        try:
            restored = run_checkpoints.restore(
                kind, target, step, model_config=config.model, data_config=config.data
            )
        except UserError:  # checkpoints.ModelMismatchError: another model's checkpoint, not a damaged one
            raise
        except Exception as error:  # orbax and tensorstore raise many types for missing or cut files
            others = [other for other in available if other != step]
            raise UserError(
                f"checkpoint step {step} in {run_checkpoints.directory / kind} is damaged "
                f"({type(error).__name__}); evaluate another with --checkpoint_step (available: {others})"
            ) from None
        return restored[0]
    finally:
        run_checkpoints.close()


def evaluate_state(state, config, workdir, split: str) -> dict:
    """Evaluates `state` on `split` and writes the JSON, CSV, markdown and overlays under `workdir`."""
    source = datasets.load_source(config.data, split)
    state = with_runtime(config, state)
    collected = collect_slices(state, source, config)
    summary = summarize_collected(collected, config)
    summary.update(split=split, step=int(state.step), threshold=config.eval.threshold)
    folder = pathlib.Path(workdir) / "metrics"
    write_json_atomic(folder / f"{split}.json", summary)
    write_text_atomic(folder / f"{split}_slices.csv", slices_csv(collected["rows"]))
    write_text_atomic(folder / f"{split}.md", markdown_report(summary, config))
    write_overlays(state, source, collected["rows"], config, folder / "overlays" / split)
    return summary


def evaluate_workdir(config, workdir, checkpoint_step: int | None = None) -> dict:
    """Restores a checkpoint of `workdir`, evaluates the configured split, writes metrics/<split>.*."""
    state = restore_for_evaluation(config, workdir, checkpoint_step)
    split = default_split(config)
    summary = evaluate_state(state, config, workdir, split)
    hd95 = "n/a" if summary["hd95"] is None else f"{summary['hd95']:.2f} {summary['hd95_unit']}"
    print(
        f"{split}: dice {summary['dice']:.4f} jaccard {summary['jaccard']:.4f} "
        f"f_score {summary['f_score']:.4f} global_dice {summary['global_dice']:.4f} hd95 {hd95} "
        f"({summary['num_slices']} slices) -> {pathlib.Path(workdir) / 'metrics' / split}.json",
        flush=True,
    )
    return summary
