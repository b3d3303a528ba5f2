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

The model runs behind an `inference.Predictor` (JAX or ONNX Runtime, as `eval.runtime` says); reports.py
writes the CSV and the markdown tables.
"""

import pathlib
import re
import shutil

import numpy as np

from rdunet_jax import (
    config_lib,
    datasets,
    evaluate_classes,
    heads,
    inference,
    input_pipeline,
    metrics,
    predictors,
    reports,
    steps,
    visualize,
)
from rdunet_jax.datasets import labels as class_labels
from rdunet_jax.errors import UserError
from rdunet_jax.files import check_writable, json_text, write_files_together

# --- Batches and prediction ----------------------------------------------------------------------------


def slice_metadata(record: dict, image_size: int) -> dict:
    """What evaluation needs of a record besides pixels: ids, slice index and the pixel spacing of the
    slice after resizing to `image_size` (None when the data carries no spacing)."""
    shape = np.asarray(record["image"]).shape
    spacing = record.get("spacing")
    meta = {
        "id": str(record["id"]),
        "case_id": (str(record["case_id"]) or None) if "case_id" in record else None,
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


def original_target(record: dict, config) -> np.ndarray:
    """A record's expert lesion mask at its stored size: its mask, or for a multi-class head the "any
    lesion" union of its classes, as the model-size target is (not the stored mask's own lesion set)."""
    head, classes = config.model.get("head", "binary"), tuple(config.data.classes)
    if head == "binary":
        return record["mask"]
    if head == "exclusive":  # a record's label map, before the input pipeline's channel axis
        masks = class_labels.label_map_masks(record["labels"], len(classes))
    else:
        masks = heads.expert_class_masks(record["labels"], head, len(classes))
    return heads.any_lesion(masks, head, classes)


def original_resolution_counts(
    probabilities, original_mask, threshold: float, head: str = "binary", classes=("lesion",)
) -> tuple[int, ...]:
    """(TP, FP, FN, TN) of one slice scored at the size of its stored expert lesion mask (lesion where
    > 0; `original_target`); a multi-class head's probabilities (S, S, C) are resized channel by channel,
    then made its "any lesion" mask."""
    target = np.asarray(original_mask) > 0
    if head == "binary":
        prediction = input_pipeline.resize_probabilities(probabilities, target.shape) >= threshold
    else:
        class_masks = heads.class_masks_at_size(probabilities, target.shape, head, threshold)
        prediction = heads.any_lesion(class_masks, head, classes)
    return tuple(int(count[0]) for count in metrics.confusion_counts(prediction[None], target[None]))


def predict_source(predictor, source, config, test_time_flips: bool = False):
    """Yields per batch a dict of metadata, images, masks, probabilities and losses of its real rows, and
    the expert lesion masks at their stored sizes (`original_masks`, `original_target`)."""
    image_size = config.data.image_size

    def examples():
        for index in range(len(source)):
            record = source[index]
            yield (slice_metadata(record, image_size), original_target(record, config)), record

    batches = inference.predict_batches(
        predictor, examples(), image_size, config.eval.batch_size, test_time_flips, with_loss=True
    )
    for batch in batches:
        count = len(batch.payloads)
        metadata, original_masks = (list(column) for column in zip(*batch.payloads, strict=True))
        yield {
            "metadata": metadata,
            "images": batch.arrays["image"][:count, ..., 0],
            "masks": batch.arrays["mask"][:count, ..., 0],
            "labels": batch.arrays["labels"][:count] if "labels" in batch.arrays else None,
            "probabilities": batch.outputs["probabilities"],
            "losses": batch.outputs["loss"],
            "original_masks": original_masks,
        }


def batch_masks(batch: dict, config):
    """(lesion predictions (n, S, S), lesion targets (n, S, S), class predictions (n, S, S, K), class
    targets (n, S, S, K)) of a `predict_source` batch; the class masks are None for the binary head, whose
    lesion mask is the thresholded probability against the record's mask."""
    head, classes = config.model.get("head", "binary"), tuple(config.data.classes)
    threshold = config.eval.threshold
    if head == "binary":
        return batch["probabilities"] >= threshold, batch["masks"] > 0.5, None, None
    predicted = heads.class_masks(batch["probabilities"], head, threshold)
    expert = heads.expert_class_masks(batch["labels"], head, len(classes))
    return (
        heads.any_lesion(predicted, head, classes),
        heads.any_lesion(expert, head, classes),
        predicted,
        expert,
    )


def evaluate_source(predictor, source, config, test_time_flips: bool = False) -> dict:
    """Mean loss and the metric summary of `predictor` on every slice of `source` (the per-epoch
    validation)."""
    counts, slice_losses = [], []
    for batch in predict_source(predictor, source, config, test_time_flips):
        predictions, targets, _, _ = batch_masks(batch, config)
        counts.append(metrics.confusion_counts(predictions, targets))
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


def collect_slices(predictor, source, config) -> dict:
    """Predicts every slice of `source` and keeps what the reports need: per-slice counts, HD95 and
    lesion statistics, and (for cases) bit-packed masks to rebuild volumes. Memory: two bits per pixel."""
    threshold, flips = config.eval.threshold, config.eval.test_time_flips
    head, classes = config.model.get("head", "binary"), tuple(config.data.classes)
    rows, lesions, losses, packed, packed_classes = [], [], [], [], []
    class_lesions = {name: [] for name in classes} if head != "binary" else None
    for batch in predict_source(predictor, source, config, flips):
        predictions, targets, class_predictions, class_targets = batch_masks(batch, config)
        for index, (meta, prediction, target, loss, probabilities, original_mask) in enumerate(
            zip(
                batch["metadata"],
                predictions,
                targets,
                batch["losses"],
                batch["probabilities"],
                batch["original_masks"],
                strict=True,
            )
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
                    "original_counts": original_resolution_counts(
                        probabilities, original_mask, threshold, head, classes
                    ),
                }
            )
            pixel_area_mm2 = spacing[0] * spacing[1] if spacing else None
            for lesion in metrics.lesion_statistics(prediction, target):
                lesion["area_mm2"] = lesion["area"] * pixel_area_mm2 if spacing else None
                lesions.append(lesion)
            if class_predictions is not None:
                # Two bits per pixel and class: the per-class summary and involvement need whole masks.
                packed_classes.append(
                    (np.packbits(class_predictions[index]), np.packbits(class_targets[index]))
                )
                for channel, name in enumerate(classes):
                    for lesion in metrics.lesion_statistics(
                        class_predictions[index, ..., channel], class_targets[index, ..., channel]
                    ):
                        lesion["area_mm2"] = lesion["area"] * pixel_area_mm2 if spacing else None
                        class_lesions[name].append(lesion)
            losses.append(float(loss))
            if meta["case_id"] is not None:
                packed.append((np.packbits(prediction), np.packbits(target)))
    unit = _spacing_unit(rows)
    for row in rows:
        row["hd95"] = row["hd95_mm"] if unit == "mm" else row["hd95_pixels"]
    for lesion in [*lesions, *(lesion for found in (class_lesions or {}).values() for lesion in found)]:
        lesion["area"] = lesion["area_mm2"] if unit == "mm" else lesion["area"]
    return {
        "rows": rows,
        "lesions": lesions,
        "losses": losses,
        "packed": packed,
        "unit": unit,
        "packed_classes": packed_classes,
        "class_lesions": class_lesions,
    }


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
    """Per-case metrics from the case's pooled counts and 3-D HD95, and their mean and std over cases,
    of the slices with a case id (the others are counted); None when no slice has one."""
    rows = [row for row in collected["rows"] if row["case_id"] is not None]
    if not rows:
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
    summary = {"num_volumes": len(cases), "num_slices_outside_volumes": len(collected["rows"]) - len(rows)}
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
    if collected["class_lesions"] is not None:
        summary.update(evaluate_classes.class_sections(collected, config))
    summary["image_size"] = int(config.data.image_size)
    summary["test_time_flips"] = bool(config.eval.test_time_flips)
    summary["conventions"] = reports.CONVENTIONS
    if collected["class_lesions"] is not None:
        summary["conventions"] = {**reports.CONVENTIONS, **reports.CLASS_CONVENTIONS}
    return summary


# --- Files -----------------------------------------------------------------------------------------------


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
    worst = [index for _, index in sorted(scored)[:count]]  # (dice, index) pairs: lowest Dice, then first
    return best, worst


def _subset(source, indices) -> datasets.SubsetSource:
    """The records of `source` at `indices`, as a sequence."""
    entries = [(source, index) for index in indices]
    return datasets.SubsetSource(entries, getattr(source, "name", ""), getattr(source, "split", ""))


def overlays_of(predictor, source, indices, config) -> list[tuple[str, np.ndarray]]:
    """(id, RGB overlay) of the slices of `source` at `indices`, predicted again (same batch shape)."""
    flips = config.eval.test_time_flips
    overlays = []
    for batch in predict_source(predictor, _subset(source, indices), config, flips):
        predictions, targets, class_predictions, class_targets = batch_masks(batch, config)
        for index, (meta, image) in enumerate(zip(batch["metadata"], batch["images"], strict=True)):
            if class_predictions is None:
                rgb = visualize.overlay_image(image, predictions[index], targets[index])
            else:
                rgb = visualize.class_overlay_image(
                    image, class_predictions[index], class_targets[index], tuple(config.data.classes)
                )
            overlays.append((meta["id"], rgb))
    return overlays


def validation_overlays(predictor, source, config, count: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Overlays of the first `count` slices of `source` (eval.num_overlays by default): TensorBoard images
    that show the same slices at every evaluation."""
    count = config.eval.num_overlays if count is None else count
    return overlays_of(predictor, source, range(min(count, len(source))), config)


def write_overlays(predictor, source, rows, config, folder: pathlib.Path) -> list[pathlib.Path]:
    """Writes best_NN_<id>.png and worst_NN_<id>.png into `folder`, replacing earlier overlays there."""
    best, worst = ranked_slices(rows, int(config.eval.num_overlays))
    if folder.exists():
        for old in folder.glob("*.png"):
            old.unlink()
    written = []
    for kind, indices in (("best", best), ("worst", worst)):
        for rank, (slice_id, rgb) in enumerate(overlays_of(predictor, source, indices, config), start=1):
            path = folder / f"{kind}_{rank:02d}_{_file_safe(slice_id)}.png"
            visualize.write_png(path, rgb)
            written.append(path)
    return written


# --- The command ---------------------------------------------------------------------------


def default_split(config) -> str:
    """`eval.split`, falling back to validation when the test split is held out or absent; refused when
    that split is part of `train_full`'s training slices."""
    split = config.eval.split
    if split == "test" and not datasets.has_split(config.data, "test"):
        split = "validation"
    if config.data.train_split == "train_full" and split != "test":
        raise UserError(
            f"eval.split: data.train_split=train_full trains on the {split} slices, so scoring them would "
            "report training Dice; score the test split (Dataset/TestingSet in data.manual_dir) or train "
            "with data.train_split=train"
        )
    return split


def evaluate_state(predictor, config, workdir, split: str) -> dict:
    """Evaluates `predictor` on `split` and writes the JSON, CSV, markdown and overlays under `workdir`."""
    source = class_labels.for_head(datasets.load_source(config.data, split), config)
    collected = collect_slices(predictor, source, config)
    summary = summarize_collected(collected, config)
    summary.update(split=split, step=predictor.step, threshold=config.eval.threshold)
    folder = pathlib.Path(workdir) / "metrics"
    texts = {folder / f"{split}.json": json_text(summary)}
    texts[folder / f"{split}_slices.csv"] = reports.slices_csv(collected["rows"])
    if "per_class" in summary:
        texts[folder / f"{split}_classes.csv"] = evaluate_classes.class_slices_csv(collected, config)
    texts[folder / f"{split}.md"] = reports.markdown_report(summary, config)
    # The overlays are drawn aside first, so a stop at any point leaves the last evaluation whole.
    staged = folder / "overlays" / f".{split}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        write_overlays(predictor, source, collected["rows"], config, staged)
        write_files_together(texts, {staged: folder / "overlays" / split})
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return summary


def evaluate_workdir(config, workdir, checkpoint_step: int | None = None) -> dict:
    """Restores a checkpoint of `workdir`, evaluates `eval.split` in `eval.runtime` and writes
    metrics/<split>.json, .md, _slices.csv and overlays; returns the JSON's summary.

    Args: `config`, the run's config; `workdir`, the run folder; `checkpoint_step`, that step instead of
    the `eval.checkpoint` (best or last).
    """
    config_lib.check_run_data(config, workdir, "evaluate")
    check_writable(pathlib.Path(workdir) / "metrics", "--workdir")
    model = inference.build_model(config)
    state = steps.restore_state(config, workdir, checkpoint_step, model=model)
    split = default_split(config)
    if split != config.eval.split:
        # Said, not silent: a user who asked for the test split must not read validation figures as test ones.
        print(
            f"eval.split=test: data.name={config.data.name!r} has no test split in "
            f"{config.data.manual_dir or 'its data'}; scoring the validation split instead",
            flush=True,
        )
    summary = evaluate_state(predictors.for_config(config, model, state), config, workdir, split)
    hd95 = "n/a" if summary["hd95"] is None else f"{summary['hd95']:.2f} {summary['hd95_unit']}"
    print(
        f"{split}: dice {summary['dice']:.4f} jaccard {summary['jaccard']:.4f} "
        f"f_score {summary['f_score']:.4f} global_dice {summary['global_dice']:.4f} hd95 {hd95} "
        f"({summary['num_slices']} slices) -> {pathlib.Path(workdir) / 'metrics' / split}.json",
        flush=True,
    )
    return summary
