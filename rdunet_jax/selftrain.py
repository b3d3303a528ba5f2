"""Teacher-student self-training on the unlabelled split (Semi-Inf-Net's loop, from scratch).

Stages, each in its own folder under the workdir and skipped once its outputs are complete:

    teacher/                 the config trained on the labelled slices (`train.train_and_evaluate`)
    pseudo_labels/round<r>/  the previous model's flip-averaged predictions of the unlabelled split, confident
                             pixels kept (PNG masks, PNG weight maps, summary.json; see
                             datasets/pseudo_labels.py), renamed into place only when every slice is written
    student<r>/              a student trained from scratch (or from the model before it,
                             `selftrain.student_init`) on the labelled slices mixed with round r's
                             pseudo-labels (`data.pseudo_fraction` of each batch), with the student's
                             schedule and stronger augmentation (`selftrain.student_*`)
    selftrain.json           every stage's evaluation (the test split when present, else validation)

A training stage resumes from its checkpoints; a killed pseudo-labelling stage starts again (its
predictions are deterministic). Rerunning the same command after a kill at any point finishes the run.
"""

import copy
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
from PIL import Image

from rdunet_jax import (
    config_lib,
    config_validation,
    datasets,
    devices,
    evaluate,
    files,
    inference,
    input_pipeline,
    losses,
    steps,
    train,
)
from rdunet_jax.datasets import pseudo_labels
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic

STAGE_DONE = "stage.json"


def pseudo_label_weights(probabilities, threshold: float, weighting: str, mask_threshold: float = 0.5):
    """(mask {0, 1} uint8, weight float32 in [0, 1]) of lesion probabilities: the mask is
    p >= mask_threshold; a lesion pixel is confident when p >= threshold, a background pixel when
    p <= 1 - threshold; its weight is 1 ('threshold') or |2p - 1| ('confidence') when confident, 0
    otherwise."""
    probabilities = np.asarray(probabilities, np.float32)
    # Confidence in the label the mask gives: with a mask threshold other than 0.5, a pixel beyond the
    # confidence threshold on the other side of it must not be learnt as a confident label.
    lesion = probabilities >= mask_threshold
    confident = np.where(lesion, probabilities >= threshold, probabilities <= 1.0 - threshold)
    if weighting == "threshold":
        strength = np.ones_like(probabilities)
    elif weighting == "confidence":
        strength = np.abs(2.0 * probabilities - 1.0)
    else:
        raise UserError(f"selftrain.weighting: must be 'threshold' or 'confidence', got {weighting!r}")
    return lesion.astype(np.uint8), np.where(confident, strength, 0.0).astype(np.float32)


# The data keys only students read: the teacher never sees the pool or its pseudo-labels.
STUDENT_DATA_KEYS = (
    "num_unlabelled",
    "pseudo_label_dir",
    "pseudo_fraction",
    "unlabelled_intensity_matching",
    "extra_min_lesion_fraction",
)
# And the model keys that act only on a student's mixed batches: the teacher's batches are of one source.
STUDENT_MODEL_KEYS = ("batch_norm_by_source",)


def teacher_config(config):
    """The config as plain supervised training: the teacher. The keys only students read hold their
    defaults, so that changing the student's settings keeps a finished teacher."""
    teacher = copy.deepcopy(config)
    defaults = config_lib.base_config()
    teacher.selftrain = defaults.selftrain
    for key in STUDENT_DATA_KEYS:
        teacher.data[key] = defaults.data[key]
    for key in STUDENT_MODEL_KEYS:
        teacher.model[key] = defaults.model[key]
    return teacher


def student_config(config, pseudo_label_dir: pathlib.Path, previous_model: pathlib.Path):
    """The student: the config on the labelled slices mixed with `pseudo_label_dir`'s pseudo-labels, the
    loss weighted per pixel, the student's schedule and its intensity augmentation; with
    `selftrain.student_init='teacher'`, started from `previous_model`'s weights (the model that made the
    pseudo-labels) instead of from scratch."""
    student = teacher_config(config)
    # The student records the self-training settings it was made with (its pseudo-labels' threshold and
    # weighting among them), so that changing them makes a finished student stale.
    student.selftrain = copy.deepcopy(config.selftrain)
    student.selftrain.rounds = 0
    for key in STUDENT_DATA_KEYS:
        student.data[key] = config.data[key]
    for key in STUDENT_MODEL_KEYS:
        student.model[key] = config.model[key]
    student.data.pseudo_label_dir = str(pseudo_label_dir)
    student.data.intensity_range = config.selftrain.student_intensity_range
    student.num_epochs = config.selftrain.student_num_epochs
    student.lr_decay_epochs = config.selftrain.student_lr_decay_epochs
    student.batch_size = config.selftrain.student_batch_size or config.batch_size
    if config.selftrain.student_seed >= 0:
        student.seed = config.selftrain.student_seed
    if config.selftrain.student_init == "teacher":
        student.model_init = str(previous_model)
    student.loss = losses.WEIGHTED_LOSSES.get(config.loss, config.loss)
    return student


def _config_changes(stored: dict, current: dict, finished: bool) -> list[tuple]:
    """(key, then, now) of each setting in which a stage recorded with `stored` differs from `current`
    (`config_lib.changes`: how often it logged or saved does not count) that makes it another stage
    (`config_lib.makes_another_run`, as for a resumed or finished run). A student's pseudo-labels are its
    stage's own data, compared by their place in the workdir, never moved."""
    return [
        (key, before, now)
        for key, before, now in config_lib.changes(stored, current)
        if key == "data.pseudo_label_dir" or config_lib.makes_another_run(key, before, now, finished)
    ]


def _workdir_paths_by_place(values: dict, workdir: pathlib.Path | None = None) -> dict:
    """A config's JSON with its pseudo-label folder, and a `model_init` inside the same workdir (a student
    started from its teacher), named relative to `workdir`; by default relative to the workdir its own
    pseudo-label path names, as `run` writes it: <workdir>/pseudo_labels/round<n>."""
    folder = values["data"].get("pseudo_label_dir")
    if not folder:
        return values
    folder = pathlib.Path(folder)
    workdir = folder.parent.parent if workdir is None else workdir.absolute()
    if not folder.is_relative_to(workdir):
        return values
    values = {**values, "data": {**values["data"], "pseudo_label_dir": str(folder.relative_to(workdir))}}
    start = pathlib.Path(values.get("model_init") or "")
    if start.is_absolute() and start.is_relative_to(workdir):
        values["model_init"] = str(start.relative_to(workdir))
    return values


def _stage_change(stored: dict, config, folder: pathlib.Path, finished: bool) -> str:
    """The first setting in which the stage in `folder`, recorded with `stored`, did not run `config`, in
    words ('' when none). A student names its pseudo-labels by absolute path; compared by their place in
    the workdir, a moved workdir keeps its finished students."""
    current = _workdir_paths_by_place(config_lib.to_json(config), folder.parent)
    changes = _config_changes(_workdir_paths_by_place(stored), current, finished)
    return f"{changes[0][0]}: {changes[0][1]!r} then, {changes[0][2]!r} now" if changes else ""


def _finished_stage(folder: pathlib.Path, config) -> dict | None:
    """The recorded outcome of a complete stage run with `config`, or None when it is not complete (and
    was started with `config`, or not at all)."""
    marker = folder / STAGE_DONE
    if not marker.is_file():
        # Resuming another config's checkpoints would end as neither run, and be recorded as this one.
        started = folder / "config.json"
        change = (
            _stage_change(json.loads(started.read_text()), config, folder, False) if started.is_file() else ""
        )
        if change:
            raise UserError(
                f"{folder}: this unfinished stage was started with another config ({change}); rerun it "
                "unchanged to finish it, or use another --workdir (or remove the folder)"
            )
        return None
    done = json.loads(marker.read_text())
    change = _stage_change(done["config"], config, folder, finished=True)
    if change:
        raise UserError(
            f"{folder}: this stage was run with another config ({change}); use another --workdir (or remove "
            "the folder)"
        )
    return done["result"]


def _mark_finished(folder: pathlib.Path, config, result: dict) -> dict:
    """Records that the stage in `folder` finished with `config`, and its evaluation `result`."""
    write_json_atomic(folder / STAGE_DONE, {"config": config_lib.to_json(config), "result": result})
    return result


def _evaluation_summary(summary: dict) -> dict:
    """The figures of an evaluation summary that selftrain.json keeps for each stage."""
    keys = ("split", "step", "dice", "jaccard", "f_score", "global_dice", "num_slices")
    return {key: summary[key] for key in keys if key in summary}


def train_stage(config, folder: pathlib.Path, name: str) -> dict:
    """Trains (or resumes) one model in `folder` and evaluates it; skipped when already finished."""
    finished = _finished_stage(folder, config)
    if finished is not None:
        print(
            f"{name}: finished before ({folder}); dice {finished['dice']:.4f} on {finished['split']}",
            flush=True,
        )
        return finished
    print(f"{name}: training in {folder}", flush=True)
    summary = train.train_and_evaluate(config, folder)
    return _mark_finished(folder, config, _evaluation_summary(summary))


# Settings of pseudo-label summaries written before the settings were recorded.
SUMMARY_DEFAULTS = {"unlabelled_intensity_matching": "none"}


def _stage_digest(model_folder: pathlib.Path, part: str = "config") -> str | None:
    """A digest of the config (or, with part='result', the outcome) a finished training stage recorded
    (None when it records none)."""
    marker = model_folder / STAGE_DONE
    if not marker.is_file():
        return None
    recorded = json.loads(marker.read_text())[part]
    return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
    """Writes one pseudo-label file (one place, where tests/kill_at_step.py kills the stage mid-folder)."""
    Image.fromarray(array).save(path)


def write_pseudo_labels(config, model_folder: pathlib.Path, model_config, folder: pathlib.Path) -> dict:
    """Predicts the unlabelled split with the model of `model_folder` (flip TTA) and writes its
    pseudo-labels to `folder` (see datasets/pseudo_labels.py); skipped when `folder` is complete.

    Everything is written in `<folder>.partial`, renamed to `folder` once the summary is written: a folder
    that exists is complete, and a killed run starts the stage again. With several hosts the first writes
    and the others wait for it: on a shared file system they would delete each other's files.
    """
    settings = {
        "confidence_threshold": config.selftrain.confidence_threshold,
        "weighting": config.selftrain.weighting,
        "mask_threshold": config.eval.threshold,
        "unlabelled_intensity_matching": config.data.unlabelled_intensity_matching,
        "model_config_digest": _stage_digest(model_folder),
        # The same config trained again (its folder removed) may be other weights: its recorded outcome
        # tells them apart.
        "model_result_digest": _stage_digest(model_folder, "result"),
    }
    # Every host looks only once all have arrived: one that looked after the first host's summary was in
    # place would skip the barrier below that the first host waits at.
    devices.wait_for_every_host(f"rdunet_pseudo_labels_check_{folder.name}")
    if (folder / pseudo_labels.SUMMARY).is_file():
        summary = pseudo_labels.read_summary(folder)
        for key, value in settings.items():
            # What summaries written before a key existed were made with (the model: unknown, not checked).
            stored_setting = summary.get(key, SUMMARY_DEFAULTS.get(key, value))
            if stored_setting == value:
                continue
            if key in ("model_config_digest", "model_result_digest"):
                what, asked = "another model", "a retrained one"
            else:
                what, asked = f"{key} {stored_setting}", value
            raise UserError(
                f"{folder}: these pseudo-labels were made with {what}, the config asks for {asked}; "
                "use another --workdir (or remove the folder)"
            )
        pool = datasets.unlabelled_pool(config.data)
        if summary["totals"]["num_slices"] != len(pool):
            raise UserError(pseudo_labels.pool_changed(folder, summary["totals"]["num_slices"], len(pool)))
        _check_same_pool(folder, summary, *pseudo_labels.pool_ids_and_digest(pool))
        print(f"pseudo-labels: finished before ({folder})", flush=True)
        return summary["totals"]
    if jax.process_index() == 0:
        _predict_pseudo_labels(config, model_folder, model_config, folder, settings)
    devices.wait_for_every_host(f"rdunet_pseudo_labels_{folder.name}")
    return pseudo_labels.read_summary(folder)["totals"]


def _check_same_pool(folder: pathlib.Path, summary: dict, ids: list[str], digest: str) -> None:
    """UserError when a pool of as many slices holds other ones than the pseudo-labels of `folder` label; a
    warning when the same slices now hold other pixels (files replaced under the same names, or decoded by
    another image library), which may be the same images to the model."""
    for entry in summary["slices"]:
        if ids[entry["index"]] != entry["id"]:
            raise UserError(
                f"{folder}: these pseudo-labels label slice {entry['id']!r} at index {entry['index']}, "
                f"where the unlabelled split now holds {ids[entry['index']]!r}; remove the folder (and the "
                "students trained on it) to predict it again"
            )
    if summary.get("pool_digest", digest) != digest:  # summaries of older code record none
        print(
            f"warning: {folder}: the unlabelled split holds the same slices with other pixels than when "
            "these pseudo-labels were made (files replaced, or decoded by another image library); reusing "
            "them: remove the folder (and the students trained on it) to predict them again",
            file=sys.stderr,
            flush=True,
        )


def _predict_pseudo_labels(config, model_folder, model_config, folder: pathlib.Path, settings: dict) -> None:
    """Writes `folder` for `write_pseudo_labels`: a mask and a weight map per unlabelled slice at its stored
    size, and a summary that records `settings`."""
    started = time.perf_counter()
    unlabelled = datasets.load_source(config.data, "unlabelled")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for subfolder in (pseudo_labels.MASKS, pseudo_labels.WEIGHTS):
        (partial / subfolder).mkdir(parents=True)
    predictor = inference.JaxPredictor(steps.restore_state(model_config, model_folder))
    print(f"pseudo-labels: predicting {len(unlabelled)} unlabelled slices with {model_folder}", flush=True)
    slices = []
    for batch in evaluate.predict_source(predictor, unlabelled, model_config, test_time_flips=True):
        for meta, probabilities, stored_mask in zip(
            batch["metadata"], batch["probabilities"], batch["original_masks"], strict=True
        ):
            original = input_pipeline.resize_probabilities(probabilities, np.shape(stored_mask))
            mask, weight = pseudo_label_weights(
                original,
                config.selftrain.confidence_threshold,
                config.selftrain.weighting,
                config.eval.threshold,
            )
            _write_png(partial / pseudo_labels.MASKS / f"{meta['id']}.png", mask * np.uint8(255))
            weight_bytes = np.round(weight * pseudo_labels.WEIGHT_SCALE).astype(np.uint8)
            _write_png(partial / pseudo_labels.WEIGHTS / f"{meta['id']}.png", weight_bytes)
            # Counted from the stored bytes, as the student reads them: a weight under 1/510 is 0 there.
            kept = weight_bytes > 0
            slices.append(
                {
                    "index": len(slices),
                    "id": meta["id"],
                    "case_id": meta["case_id"],
                    "lesion_fraction": float(mask.mean()),
                    "kept_fraction": float(kept.mean()),
                    "kept_lesion_fraction": float((kept & (mask > 0)).mean()),
                    "mean_weight": float((weight_bytes / pseudo_labels.WEIGHT_SCALE).mean()),
                }
            )
    totals = {
        "num_slices": len(slices),
        "slices_with_lesion": int(sum(entry["lesion_fraction"] > 0 for entry in slices)),
        **{
            f"mean_{key}": float(np.mean([entry[key] for entry in slices]))
            for key in ("lesion_fraction", "kept_fraction", "kept_lesion_fraction", "mean_weight")
        },
    }
    summary = {
        "model": str(model_folder),
        "step": int(predictor.step),
        "pool_digest": pseudo_labels.pool_ids_and_digest(datasets.unlabelled_pool(config.data))[1],
        "test_time_flips": True,
        **settings,
        "totals": totals,
        "seconds": time.perf_counter() - started,
        "slices": slices,
    }
    write_json_atomic(partial / pseudo_labels.SUMMARY, summary)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    print(
        f"pseudo-labels: {len(slices)} slices in {folder}; lesion in {totals['slices_with_lesion']}, "
        f"{100 * totals['mean_kept_fraction']:.1f}% of pixels kept ({summary['seconds']:.0f}s)",
        flush=True,
    )


def run(config, workdir) -> dict:
    """Runs (or resumes) every stage of self-training under `workdir`; returns the summary it writes."""
    workdir = pathlib.Path(workdir)
    # The pseudo-labelling and student settings are checked before the teacher's hours of training.
    config_validation.validate(config)
    if config.selftrain.rounds < 1:
        raise UserError(
            f"selftrain.rounds: {config.selftrain.rounds}; self-training needs at least one round"
        )
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir: {workdir} exists and is not a folder")
    if not datasets.has_split(config.data, "unlabelled"):
        raise UserError(
            f"selftrain.rounds: data.name={config.data.name!r} has no unlabelled split (semiseg: the folder "
            "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs; the phantom: data.num_unlabelled > 0)"
        )
    devices.initialize_distributed()
    # The student's batch too, before the teacher trains: it may not divide over the devices.
    devices.check_batch_divides(
        config.selftrain.student_batch_size or config.batch_size, devices.data_parallel_mesh()
    )
    # The stages lock their own folders; this lock keeps a second run out of the pseudo-labels too.
    with files.exclusive_workdir(workdir, enabled=jax.process_index() == 0):
        return _run_stages(config, workdir)


def _run_stages(config, workdir: pathlib.Path) -> dict:
    model_config = teacher_config(config)
    model_folder = workdir / "teacher"
    stages = {"teacher": train_stage(model_config, model_folder, "teacher")}
    for round_number in range(1, config.selftrain.rounds + 1):
        labels_folder = workdir / "pseudo_labels" / f"round{round_number}"
        student_folder = workdir / f"student{round_number}"
        # A student's config names its pseudo-labels' folder, not what they hold: pseudo-labels made anew
        # (say, of a retrained teacher) would leave a stale student looking finished.
        if student_folder.exists() and not (labels_folder / pseudo_labels.SUMMARY).is_file():
            raise UserError(
                f"{student_folder}: trained on pseudo-labels no longer in {labels_folder}; remove it to "
                "train the student on new ones, or use another --workdir"
            )
        stages[f"pseudo_labels{round_number}"] = write_pseudo_labels(
            config, model_folder, model_config, labels_folder
        )
        model_config = student_config(config, labels_folder.absolute(), model_folder.absolute())
        model_folder = student_folder
        stages[f"student{round_number}"] = train_stage(model_config, model_folder, f"student {round_number}")
    final = stages[f"student{config.selftrain.rounds}"]
    summary = {"final": final, "final_model": str(model_folder), "stages": stages}
    write_json_atomic(workdir / "selftrain.json", summary)
    teacher = stages["teacher"]
    print(
        f"self-training: {final['split']} dice {final['dice']:.4f} (teacher {teacher['dice']:.4f}) -> "
        f"{workdir / 'selftrain.json'}",
        flush=True,
    )
    return summary
