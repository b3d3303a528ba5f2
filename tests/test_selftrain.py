"""Self-training: pseudo-label confidence and weights, and whole tiny runs on the phantom (every stage's
outputs; a run killed in each stage and rerun ends as an uninterrupted one). The weighted loss is tested
in test_losses.py.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import ONE_LEVEL, ONE_LEVEL_FLAGS, REPO_ROOT, TEST_CACHE, TEST_DATA_DIR, make_tiny_config
from PIL import Image

from rdunet_jax import config_lib, config_validation, datasets, devices, files, selftrain
from rdunet_jax.datasets import pseudo_labels
from rdunet_jax.errors import UserError

POOL_SIZE = 6
MASK_THRESHOLD, CONFIDENCE_THRESHOLD = 0.52, 0.525


def test_pseudo_label_weights_against_hand_computed_values():
    probabilities = np.array([0.95, 0.5, 0.05, 0.91, 0.89, 0.08, 0.0, 1.0, 0.12], np.float32)
    # Confident at 0.9: p >= 0.9 or p <= 0.1.
    mask, weight = selftrain.pseudo_label_weights(probabilities, 0.9, "threshold")
    np.testing.assert_array_equal(mask, [1, 1, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(weight, [1, 0, 1, 1, 0, 1, 1, 1, 0])
    # 'confidence': |2p - 1| on the confident pixels: 0.9, 0.9, 0.82, 0.84, 1, 1.
    _, weight = selftrain.pseudo_label_weights(probabilities, 0.9, "confidence")
    np.testing.assert_allclose(weight, [0.9, 0, 0.9, 0.82, 0, 0.84, 1, 1, 0], atol=1e-6)
    # A lower threshold keeps more: at 0.85, 0.89 and 0.12 become confident.
    _, weight = selftrain.pseudo_label_weights(probabilities, 0.85, "threshold")
    np.testing.assert_array_equal(weight, [1, 0, 1, 1, 1, 1, 1, 1, 1])
    # The shipped setting, 'confidence' at 0.5: every pixel confident, weight |2p - 1|, so only p = 0.5
    # drops out; 0.49 is background of weight 0.02, 0.7 lesion of 0.4.
    probabilities = np.float32([0.95, 0.5, 0.49, 0.7, 0.3, 0.0])
    mask, weight = selftrain.pseudo_label_weights(probabilities, 0.5, "confidence")
    np.testing.assert_array_equal(mask, [1, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(weight, [0.9, 0, 0.02, 0.4, 0.4, 1], atol=1e-6)


def test_pseudo_label_weights_count_the_thresholds_themselves_as_confident_and_are_float32():
    # At 0.75 both bounds are exact in float32: p = 0.75 and p = 0.25 are confident, a hair inside is not.
    inside = [np.nextafter(np.float32(0.75), np.float32(0)), np.nextafter(np.float32(0.25), np.float32(1))]
    probabilities = np.array([0.75, 0.25, *inside], np.float32)
    mask, weight = selftrain.pseudo_label_weights(probabilities, 0.75, "threshold")
    np.testing.assert_array_equal(weight, [1, 1, 0, 0])
    np.testing.assert_array_equal(mask, [1, 0, 1, 0])
    assert mask.dtype == np.uint8 and weight.dtype == np.float32
    # The model's float32 probabilities that print as 0.9 and 0.1 are confident at the threshold 0.9.
    _, weight = selftrain.pseudo_label_weights(np.float32([0.9, 0.1]), 0.9, "threshold")
    np.testing.assert_array_equal(weight, [1, 1])
    message = r"^selftrain.weighting: must be 'threshold' or 'confidence', got 'soft'$"
    with pytest.raises(UserError, match=message):
        selftrain.pseudo_label_weights(probabilities, 0.75, "soft")


def test_pseudo_label_confidence_is_in_the_label_the_mask_gives():
    probabilities = np.float32([0.65, 0.95, 0.35, 0.05, 0.25])
    # Mask threshold 0.7, confidence 0.6: 0.65 is background (mask 0), and not confidently so (> 0.4),
    # although it is beyond 0.6 on the lesion side.
    mask, weight = selftrain.pseudo_label_weights(probabilities, 0.6, "threshold", mask_threshold=0.7)
    np.testing.assert_array_equal(mask, [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(weight, [0, 1, 1, 1, 1])
    # Mask threshold 0.3: 0.35 is lesion (mask 1), and not confidently so (< 0.6), although it is beyond
    # 0.4 on the background side.
    mask, weight = selftrain.pseudo_label_weights(probabilities, 0.6, "threshold", mask_threshold=0.3)
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(weight, [1, 1, 0, 1, 1])


def _teacher_predicts(monkeypatch, metadata, probabilities, stored):
    """A stand-in teacher whose flip-averaged pool predictions are `probabilities`."""
    monkeypatch.setattr(selftrain.datasets, "load_source", lambda data, split: metadata)
    pool = [{**meta, "image": image} for meta, image in zip(metadata, stored, strict=True)]
    monkeypatch.setattr(selftrain.datasets, "unlabelled_pool", lambda data: pool)
    monkeypatch.setattr(selftrain.steps, "restore_state", lambda config, folder: None)
    monkeypatch.setattr(selftrain.inference, "JaxPredictor", lambda state: types.SimpleNamespace(step=12))

    def predict_source(predictor, source, config, test_time_flips):
        assert test_time_flips and source is metadata
        yield {"metadata": metadata, "probabilities": probabilities, "original_masks": stored}

    monkeypatch.setattr(selftrain.evaluate, "predict_source", predict_source)


def test_pseudo_label_files_against_hand_computed_probabilities(tmp_path, monkeypatch, capsys):
    # Three pool slices: one stored at the model's size, one stored twice as wide (each row's probabilities
    # constant, so the bilinear resize to the stored 2 x 4 keeps them, whatever its convention), one
    # without lesion.
    metadata = [{"id": "a_1", "case_id": "a"}, {"id": "b_7", "case_id": "b"}, {"id": "c_2", "case_id": "c"}]
    probabilities = [
        np.float32([[0.96, 0.5009], [0.02, 0.3]]),
        np.float32([[0.97, 0.97], [0.03, 0.03]]),
        np.full((2, 2), 0.04, np.float32),
    ]
    stored = [np.zeros((2, 2), np.uint8), np.zeros((2, 4), np.uint8), np.zeros((2, 2), np.uint8)]
    _teacher_predicts(monkeypatch, metadata, probabilities, stored)
    barriers = []

    def wait_for_every_host(name):  # the other hosts read the folder once the first host passes here
        if not name.startswith("rdunet_pseudo_labels_check_"):  # (that one: every host about to look)
            assert (tmp_path / "round1" / pseudo_labels.SUMMARY).is_file()
        barriers.append(name)

    monkeypatch.setattr(selftrain.devices, "wait_for_every_host", wait_for_every_host)
    config = tiny_selftrain_config()
    config.eval.threshold, config.selftrain.confidence_threshold = 0.5, 0.9
    config.selftrain.weighting = "confidence"
    folder = tmp_path / "round1"
    # What a killed run leaves: a half-written `.partial` folder, or a folder without its summary.
    for leftover in (tmp_path / "round1.partial", folder):
        (leftover / "masks").mkdir(parents=True)
        (leftover / "masks" / "stale.png").write_bytes(b"")
    totals = selftrain.write_pseudo_labels(config, tmp_path / "teacher", config, folder)
    assert barriers == ["rdunet_pseudo_labels_check_round1", "rdunet_pseudo_labels_round1"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["round1"]  # no .partial left
    assert sorted(path.name for path in (folder / "masks").iterdir()) == ["a_1.png", "b_7.png", "c_2.png"]
    output = capsys.readouterr().out
    assert output.startswith(f"pseudo-labels: predicting 3 unlabelled slices with {tmp_path / 'teacher'}\n")
    # The closing line: lesion on 2 of the 3 slices, (0.5 + 1 + 1) / 3 of the pixels kept.
    closing = re.escape(f"pseudo-labels: 3 slices in {folder}; lesion in 2, 83.3% of pixels kept (")
    assert re.search(f"^{closing}\\d+s\\)$", output, re.MULTILINE), output

    def png(name, slice_id):
        return np.asarray(Image.open(folder / name / f"{slice_id}.png"))

    # Slice a: lesion where p >= 0.5; confident 0.96 and 0.02, weights |2p - 1| * 255: 234.6 and 244.8.
    # 0.5009 is lesion, not confident at 0.9 (and its |2p - 1| = 0.0018 would round to byte 0 anyway).
    np.testing.assert_array_equal(png("masks", "a_1"), [[255, 255], [0, 0]])
    np.testing.assert_array_equal(png("confidence", "a_1"), [[235, 0], [245, 0]])
    # Slice b, at its stored 2 x 4: the top row lesion, the bottom background, all confident: 0.94 * 255 =
    # 239.7.
    np.testing.assert_array_equal(png("masks", "b_7"), [[255] * 4, [0] * 4])
    np.testing.assert_array_equal(png("confidence", "b_7"), np.full((2, 4), 240))
    # Slice c: no lesion, all confident background of weight 0.92 (byte 235).
    np.testing.assert_array_equal(png("confidence", "c_2"), np.full((2, 2), 235))
    assert totals["num_slices"] == 3 and totals["slices_with_lesion"] == 2
    # The weights as the student reads them: the stored bytes / 255.
    expected = {
        "mean_lesion_fraction": (0.5 + 0.5 + 0) / 3,
        "mean_kept_fraction": (0.5 + 1 + 1) / 3,
        "mean_kept_lesion_fraction": (0.25 + 0.5 + 0) / 3,
        "mean_mean_weight": ((235 + 245) / 4 + 240 + 235) / 255 / 3,
    }
    assert {key: totals[key] for key in expected} == pytest.approx(expected, abs=1e-6)
    summary = pseudo_labels.read_summary(folder)
    assert summary["step"] == 12 and summary["weighting"] == "confidence" and summary["mask_threshold"] == 0.5
    assert summary["model"] == str(tmp_path / "teacher") and summary["test_time_flips"] is True
    assert summary["totals"] == totals and 0 <= summary["seconds"] < 60
    ids = [(entry["id"], entry["case_id"]) for entry in summary["slices"]]
    assert ids == [("a_1", "a"), ("b_7", "b"), ("c_2", "c")]
    # Of the pool's stored images (not, say, the source the teacher predicted through).
    _, digest = pseudo_labels.pool_ids_and_digest(selftrain.datasets.unlabelled_pool(config.data))
    assert summary["pool_digest"] == digest
    # Run again: finished, not written again.
    assert selftrain.write_pseudo_labels(config, tmp_path / "teacher", config, folder) == totals
    assert capsys.readouterr().out == f"pseudo-labels: finished before ({folder})\n"
    # The mask threshold is `eval.threshold`: at 0.25, slice a's 0.3 is lesion too.
    config.eval.threshold = 0.25
    selftrain.write_pseudo_labels(config, tmp_path / "teacher", config, tmp_path / "low")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "low" / "masks" / "a_1.png")), [[255, 255], [0, 255]]
    )


def test_pseudo_label_summaries_count_the_weights_as_stored(tmp_path, monkeypatch):
    # The shipped 'confidence' at 0.5: p = 0.5009 is kept with weight 0.0018, which the PNG stores as 0, so
    # the student never sees it; the summary counts what is stored. 0.9 and 0.1 weigh 0.8: byte 204.
    _teacher_predicts(
        monkeypatch,
        [{"id": "a_1", "case_id": "a"}],
        [np.float32([[0.5009, 0.9], [0.1, 0.5]])],
        [np.zeros((2, 2), np.uint8)],
    )
    config = tiny_selftrain_config()
    config.eval.threshold, config.selftrain.confidence_threshold = 0.5, 0.5
    config.selftrain.weighting = "confidence"
    totals = selftrain.write_pseudo_labels(config, tmp_path / "teacher", config, tmp_path / "round1")
    weights = np.asarray(Image.open(tmp_path / "round1" / "confidence" / "a_1.png"))
    np.testing.assert_array_equal(weights, [[0, 204], [204, 0]])
    assert totals["mean_kept_fraction"] == 0.5 and totals["mean_kept_lesion_fraction"] == 0.25
    assert totals["mean_mean_weight"] == pytest.approx(2 * 204 / 255 / 4, abs=1e-7)


def test_a_host_other_than_the_first_waits_for_its_pseudo_labels_and_writes_none(
    uninterrupted, tmp_path, monkeypatch
):
    workdir, _ = uninterrupted
    folder = tmp_path / "round1"

    barriers = []

    def first_host_writes(name):
        barriers.append(name)
        if name == "rdunet_pseudo_labels_round1":
            assert not folder.exists() and not (tmp_path / "round1.partial").exists()
            shutil.copytree(workdir / "pseudo_labels" / "round1", folder)

    monkeypatch.setattr(selftrain.jax, "process_index", lambda: 1)
    monkeypatch.setattr(selftrain.devices, "wait_for_every_host", first_host_writes)
    monkeypatch.setattr(selftrain.datasets, "load_source", lambda data, split: pytest.fail("predicted"))
    config = tiny_selftrain_config()
    totals = selftrain.write_pseudo_labels(
        config, workdir / "teacher", selftrain.teacher_config(config), folder
    )
    assert totals == json.loads((folder / pseudo_labels.SUMMARY).read_text())["totals"]
    # Every host meets before looking, then once the first host's folder is in place; a rerun that finds
    # it meets once, as every host then finds it.
    assert barriers == ["rdunet_pseudo_labels_check_round1", "rdunet_pseudo_labels_round1"]
    selftrain.write_pseudo_labels(config, workdir / "teacher", selftrain.teacher_config(config), folder)
    assert barriers[2:] == ["rdunet_pseudo_labels_check_round1"]


def tiny_selftrain_config():
    """The tiny phantom config with one self-training round over a pool of 6 slices."""
    config = make_tiny_config(num_unlabelled=POOL_SIZE)
    config.model.update(ONE_LEVEL)
    config.selftrain.rounds = 1
    config.selftrain.student_num_epochs = 2
    config.selftrain.student_lr_decay_epochs = 1
    config.eval.test_time_flips = True
    # The tiny teacher's 4 steps leave its probabilities of the pool between about 0.51 and 0.54: these
    # thresholds, inside that range, give pseudo-labels with both lesion and background, and both kept and
    # dropped pixels (the defaults, 0.5 and 0.9, would give all lesion, nothing kept).
    config.eval.threshold = MASK_THRESHOLD
    config.selftrain.confidence_threshold = CONFIDENCE_THRESHOLD
    return config


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("selftrain") / "run"
    summary = selftrain.run(tiny_selftrain_config(), workdir)
    return workdir, summary


def test_a_whole_tiny_run_writes_every_stage(uninterrupted):
    workdir, summary = uninterrupted
    assert json.loads((workdir / "selftrain.json").read_text()) == summary
    assert set(summary["stages"]) == {"teacher", "pseudo_labels1", "student1"}
    assert summary["final"] == summary["stages"]["student1"] and summary["final"]["split"] == "test"
    for stage in ("teacher", "student1"):
        assert (workdir / stage / "metrics" / "test.json").is_file()
    # The student trained on the mixed source with the weighted loss and its own schedule.
    student = json.loads((workdir / "student1" / "config.json").read_text())
    assert student["loss"] == "dice_weighted" and student["num_epochs"] == 2
    assert student["data"]["pseudo_label_dir"] == str((workdir / "pseudo_labels" / "round1").absolute())
    assert student["data"]["intensity_range"] == 0.1
    # 8 labelled slices, 2 a batch of 4: 4 steps an epoch, 8 in 2 epochs (the teacher: 2 an epoch, 4).
    assert summary["stages"]["student1"]["step"] == 8 and summary["stages"]["teacher"]["step"] == 4
    for stage in ("teacher", "student1"):
        # Each stage's outcome: its test-split metrics, as its metrics file has them, and its marker.
        metrics = json.loads((workdir / stage / "metrics" / "test.json").read_text())
        outcome = summary["stages"][stage]
        keys = ("split", "step", "dice", "jaccard", "f_score", "global_dice", "num_slices")
        assert sorted(outcome) == sorted(keys)
        assert {key: outcome[key] for key in keys if key != "split"} == {
            key: metrics[key] for key in keys if key != "split"
        }
        marker = json.loads((workdir / stage / "stage.json").read_text())
        assert marker["result"] == outcome and marker["config"]["num_epochs"] == 2


def test_pseudo_labels_are_inspectable_files_that_match_the_teacher_predictions(uninterrupted):
    workdir, _ = uninterrupted
    folder = workdir / "pseudo_labels" / "round1"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["confidence_threshold"] == CONFIDENCE_THRESHOLD and summary["test_time_flips"] is True
    # Not blank: some pixels lesion and some background, some kept and some dropped.
    totals = summary["totals"]
    assert 0 < totals["mean_lesion_fraction"] < 1 and 0 < totals["mean_kept_fraction"] < 1
    assert not (folder.parent / "round1.partial").exists()
    config = tiny_selftrain_config()
    pool = datasets.load_source(config.data, "unlabelled")
    assert [entry["id"] for entry in summary["slices"]] == [pool[i]["id"] for i in range(POOL_SIZE)]
    # The teacher's predictions, thresholded here by hand, give the stage's files.
    from rdunet_jax import evaluate, inference, steps

    teacher_config = selftrain.teacher_config(config)
    predictor = inference.JaxPredictor(steps.restore_state(teacher_config, workdir / "teacher"))
    predicted = [
        probabilities
        for batch in evaluate.predict_source(predictor, pool, teacher_config, test_time_flips=True)
        for probabilities in batch["probabilities"]
    ]
    for entry, probabilities in zip(summary["slices"], predicted, strict=True):
        mask = np.asarray(Image.open(folder / "masks" / f"{entry['id']}.png"))
        weight = np.asarray(Image.open(folder / "confidence" / f"{entry['id']}.png"))
        assert mask.shape == weight.shape == pool[entry["index"]]["image"].shape  # the stored size
        assert set(np.unique(mask)) <= {0, 255}
        lesion = probabilities >= MASK_THRESHOLD
        np.testing.assert_array_equal(mask == 255, lesion)  # 32 px phantom: no resize
        confident = np.where(
            lesion, probabilities >= CONFIDENCE_THRESHOLD, probabilities <= 1 - CONFIDENCE_THRESHOLD
        )
        np.testing.assert_array_equal(weight, np.where(confident, 255, 0))
        assert entry["kept_fraction"] == pytest.approx(confident.mean())
        assert entry["case_id"] == "synthetic"
    # The student's source reads them back: mask {0, 1} and weights as stored.
    source = pseudo_labels.PseudoLabelSource(folder, pool)
    record = source[2]
    np.testing.assert_array_equal(
        record["mask"] * 255, np.asarray(Image.open(folder / "masks" / f"{record['id']}.png"))
    )


def test_a_finished_run_is_skipped_stage_by_stage(uninterrupted, capsys):
    workdir, summary = uninterrupted
    again = selftrain.run(tiny_selftrain_config(), workdir)
    assert again == summary
    output = capsys.readouterr().out
    assert "teacher: finished before" in output and "student 1: finished before" in output
    assert "pseudo-labels: finished before" in output and "epoch 1" not in output


def _run_command(workdir, kill, *arguments):
    """The tiny self-training command; `kill` ('STEP' or 'pseudo_labels:SLICES') runs it under
    tests/kill_at_step.py."""
    launcher = ["tests.kill_at_step", kill, "--"] if kill else ["rdunet_jax.main"]
    command = [
        sys.executable,
        "-m",
        *launcher,
        "--config",
        "configs/demo.py:tiny",
        f"--workdir={workdir}",
        f"--config.compilation_cache_dir={TEST_CACHE}",
        f"--config.data.data_dir={TEST_DATA_DIR}",
        "--config.num_epochs=2",
        f"--config.data.num_unlabelled={POOL_SIZE}",
        "--config.selftrain.rounds=1",
        "--config.selftrain.student_num_epochs=2",
        "--config.selftrain.student_lr_decay_epochs=1",
        "--config.eval.test_time_flips=True",
        f"--config.eval.threshold={MASK_THRESHOLD}",
        f"--config.selftrain.confidence_threshold={CONFIDENCE_THRESHOLD}",
        *ONE_LEVEL_FLAGS,
        *arguments,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_evaluate_mode_of_a_self_training_workdir_evaluates_the_final_student(uninterrupted):
    workdir, summary = uninterrupted
    result = _run_command(workdir, None, "--mode=evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(workdir / "student1" / "metrics" / "test.json") in result.stdout
    metrics = json.loads((workdir / "student1" / "metrics" / "test.json").read_text())
    assert metrics["dice"] == summary["final"]["dice"] and metrics["step"] == summary["final"]["step"]


def test_the_students_settings_keep_the_finished_teacher_and_reach_the_student(uninterrupted):
    from rdunet_jax import input_pipeline

    workdir, summary = uninterrupted
    config = tiny_selftrain_config()
    config.selftrain.student_batch_size = 3
    config.selftrain.student_num_epochs = 7
    config.selftrain.student_intensity_range = 0.3
    config.data.pseudo_fraction = 0.34
    config.data.unlabelled_intensity_matching = "window"
    config.data.extra_min_lesion_fraction = 0.05
    config.model.batch_norm_by_source = True
    config.selftrain.student_seed = 7
    teacher = selftrain.teacher_config(config)
    assert selftrain._finished_stage(workdir / "teacher", teacher) == summary["stages"]["teacher"]
    student = selftrain.student_config(config, workdir / "pseudo_labels" / "round1", workdir / "teacher")
    assert (student.batch_size, student.num_epochs, student.data.intensity_range) == (3, 7, 0.3)
    assert (student.seed, teacher.seed) == (7, config.seed)
    assert (student.data.extra_min_lesion_fraction, teacher.data.extra_min_lesion_fraction) == (0.05, 0.0)
    # The teacher's batches are of one source: the setting is the student's alone.
    assert (student.model.batch_norm_by_source, teacher.model.batch_norm_by_source) == (True, False)
    assert (student.data.unlabelled_intensity_matching, teacher.data.unlabelled_intensity_matching) == (
        "window",
        "none",
    )
    assert input_pipeline.pseudo_per_batch(student.batch_size, student.data.pseudo_fraction) == 1
    config.selftrain.student_batch_size = 0  # the teacher's batch
    before = config.to_json(sort_keys=True)
    student = selftrain.student_config(config, workdir / "pseudo_labels" / "round1", workdir / "teacher")
    assert student.batch_size == config.batch_size == teacher.batch_size
    # The student is plain training on mixed batches (its config run again would not self-train), and
    # making it leaves the run's own config as it was.
    assert student.selftrain.rounds == 0 and config.selftrain.rounds == 1
    assert config.to_json(sort_keys=True) == before
    # The teacher's loss becomes its weighted form; a weighted loss stays itself.
    assert student.loss == "dice_weighted"
    config.loss = "dice_weighted"
    assert (
        selftrain.student_config(config, workdir / "pseudo_labels" / "round1", workdir / "teacher").loss
        == "dice_weighted"
    )
    config.loss = "dice"
    for student_seed, seed in ((0, 0), (-1, 3)):  # -1: the run's seed
        config.selftrain.student_seed, config.seed = student_seed, 3
        student = selftrain.student_config(config, workdir / "pseudo_labels" / "round1", workdir / "teacher")
        assert student.seed == seed
    config.seed = 0
    config.batch_size += 1  # the teacher's own settings still count
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(workdir / "teacher", selftrain.teacher_config(config))


@pytest.mark.parametrize(("by_source", "expected"), [(True, [0, 2]), (False, [0, 0])])
def test_batch_norm_by_source_splits_the_students_batches_at_their_labelled_rows(
    tmp_path, monkeypatch, by_source, expected
):
    from rdunet_jax import train

    split_at = []

    def recording(config, state, *args):
        split_at.append(state.labelled_rows)
        return compiled_train_step(config, state, *args)

    compiled_train_step = train.compiled_train_step
    monkeypatch.setattr(train, "compiled_train_step", recording)
    config = tiny_selftrain_config()
    config.model.batch_norm_by_source = by_source
    selftrain.run(config, tmp_path / "run")
    # The teacher's batches are of one source; the student's batch of 4 opens with 2 labelled rows
    # (data.pseudo_fraction 0.5). Off, no batch is split.
    assert split_at == expected


def test_a_finished_student_is_kept_for_its_own_settings_and_refused_for_other_pseudo_labels(uninterrupted):
    workdir, summary = uninterrupted
    labels = workdir / "pseudo_labels" / "round1"
    config = tiny_selftrain_config()
    student = selftrain.student_config(config, labels.absolute(), workdir / "teacher")
    assert selftrain._finished_stage(workdir / "student1", student) == summary["stages"]["student1"]
    config.selftrain.confidence_threshold = 0.8  # other pseudo-labels: not what the student learnt from
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(
            workdir / "student1", selftrain.student_config(config, labels.absolute(), workdir / "teacher")
        )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("selftrain", "confidence_threshold", 0.8),
        ("selftrain", "weighting", "confidence"),
        ("data", "unlabelled_intensity_matching", "window"),
    ],
)
def test_pseudo_labels_made_with_other_settings_are_refused_not_reused(uninterrupted, section, key, value):
    workdir, _ = uninterrupted
    folder = workdir / "pseudo_labels" / "round1"
    before = (folder / pseudo_labels.SUMMARY).read_bytes()
    config = tiny_selftrain_config()
    config[section][key] = value
    stored = json.loads(before)[key]
    message = f"{folder}: these pseudo-labels were made with {key} {stored}, the config asks for {value}; "
    with pytest.raises(UserError) as raised:
        selftrain.write_pseudo_labels(config, workdir / "teacher", selftrain.teacher_config(config), folder)
    assert str(raised.value) == message + "use another --workdir (or remove the folder)"
    assert (folder / pseudo_labels.SUMMARY).read_bytes() == before


def test_pool_intensity_experiment_reports_each_matching_mode_on_the_teacher(uninterrupted, capsys):
    from experiments import pool_intensity

    workdir, _ = uninterrupted
    settings = [f"data.data_dir={TEST_DATA_DIR}", f"data.num_unlabelled={POOL_SIZE}", "num_epochs=2"]
    settings += ["model.depth=1", "model.skip_dilation_rates=[[1, 2]]"]
    arguments = ["--config", "configs/demo.py:tiny", "--model", str(workdir / "teacher"), "--sample", "4"]
    pool_intensity.main(arguments + [item for setting in settings for item in ("--set", setting)])
    lines = capsys.readouterr().out.splitlines()
    train = datasets.load_source(tiny_selftrain_config().data, "train")
    masks = [np.asarray(train[index]["mask"]) for index in range(len(train))]
    share, present = np.mean([mask.mean() for mask in masks]), np.mean([mask.any() for mask in masks])
    expected = f"labelled training slices: {len(train)}, lesion {share:.4f} of pixels, on {present:.2f} of"
    assert lines[0] == expected + " slices"
    rows = [line.split(" | ") for line in lines[3:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (f"| {mode}", "other", "4") for mode in ("none", "window", "histogram")
    ]


def test_pseudo_labels_of_older_code_or_of_another_model(uninterrupted, tmp_path, capsys):
    workdir, _ = uninterrupted
    folder = tmp_path / "round1"
    shutil.copytree(workdir / "pseudo_labels" / "round1", folder)
    summary = json.loads((folder / pseudo_labels.SUMMARY).read_text())
    # Written before they were recorded.
    for key in ("unlabelled_intensity_matching", "model_config_digest", "model_result_digest", "pool_digest"):
        del summary[key]
    (folder / pseudo_labels.SUMMARY).write_text(json.dumps(summary))
    config = tiny_selftrain_config()
    teacher = selftrain.teacher_config(config)
    totals = selftrain.write_pseudo_labels(config, workdir / "teacher", teacher, folder)
    assert totals == summary["totals"]  # made without matching, by a model it cannot tell: reused
    assert capsys.readouterr().err == ""  # no pool digest recorded: no warning of other pixels
    config.data.unlabelled_intensity_matching = "window"
    with pytest.raises(UserError) as raised:
        selftrain.write_pseudo_labels(config, workdir / "teacher", teacher, folder)
    assert str(raised.value).startswith(
        f"{folder}: these pseudo-labels were made with unlabelled_intensity_matching none, the config asks "
        "for window; "
    )
    summary["model_config_digest"] = "0" * 16  # another teacher's
    (folder / pseudo_labels.SUMMARY).write_text(json.dumps(summary))
    with pytest.raises(UserError, match="made with another model, the config asks for a retrained one"):
        selftrain.write_pseudo_labels(tiny_selftrain_config(), workdir / "teacher", teacher, folder)


def test_a_run_in_a_relative_workdir_keeps_its_finished_stages(tmp_path, monkeypatch, capsys):
    """The command's default workdir is relative (runs/<name>): the student records its pseudo-label and
    teacher folders absolute, and a rerun from the same folder finds every stage finished."""
    monkeypatch.chdir(tmp_path)
    config = tiny_selftrain_config()
    config.selftrain.student_init = "teacher"
    selftrain.run(config, pathlib.Path("run"))
    student = json.loads((tmp_path / "run" / "student1" / "config.json").read_text())
    assert student["data"]["pseudo_label_dir"] == str(tmp_path / "run" / "pseudo_labels" / "round1")
    assert student["model_init"] == str(tmp_path / "run" / "teacher")
    capsys.readouterr()
    selftrain.run(config, pathlib.Path("run"))
    printed = capsys.readouterr().out
    assert printed.count("finished before") == 3 and "training in" not in printed


def test_pseudo_labels_of_a_teacher_trained_again_with_the_same_config_are_refused(uninterrupted, tmp_path):
    """A teacher's folder removed and trained again with the same config may be other weights (a GPU's
    kernels): its recorded outcome differs, and its predecessor's pseudo-labels are not reused."""
    workdir, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(workdir / "teacher", run / "teacher", ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(workdir / "pseudo_labels", run / "pseudo_labels")
    config = tiny_selftrain_config()
    teacher = selftrain.teacher_config(config)
    folder = run / "pseudo_labels" / "round1"
    assert selftrain.write_pseudo_labels(config, run / "teacher", teacher, folder)  # the same teacher
    stage = json.loads((run / "teacher" / selftrain.STAGE_DONE).read_text())
    stage["result"]["dice"] += 0.01  # the same config, another outcome
    (run / "teacher" / selftrain.STAGE_DONE).write_text(json.dumps(stage))
    with pytest.raises(UserError) as raised:
        selftrain.write_pseudo_labels(config, run / "teacher", teacher, folder)
    assert str(raised.value) == (
        f"{folder}: these pseudo-labels were made with another model, the config asks for a retrained one; "
        "use another --workdir (or remove the folder)"
    )


def test_a_pseudo_label_folder_is_read_with_the_matching_it_was_made_with(uninterrupted):
    workdir, _ = uninterrupted
    data = tiny_selftrain_config().data
    data.pseudo_label_dir = str(workdir / "pseudo_labels" / "round1")
    assert len(datasets.load_source(data, "train").extra) == POOL_SIZE
    data.unlabelled_intensity_matching = "window"
    with pytest.raises(UserError) as raised:
        datasets.load_source(data, "train")
    assert str(raised.value) == (
        f"data.unlabelled_intensity_matching: {data.pseudo_label_dir} was predicted from the pool matched "
        "with 'none', the config reads it with 'window'"
    )


@pytest.mark.slow
def test_killed_in_every_stage_and_rerun_it_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    reference, summary = uninterrupted
    workdir = tmp_path / "killed"
    kills = [
        ("teacher", "3"),  # mid-epoch 2 of the teacher
        ("pseudo-labels", "pseudo_labels:3"),  # half of the pool written
        ("student", "6"),  # mid-epoch 2 of the student
    ]
    for stage, kill in kills:
        result = _run_command(workdir, kill)
        assert result.returncode == -9, f"{stage}: {result.stderr[-2000:]}"
        if stage == "pseudo-labels":
            partial = workdir / "pseudo_labels" / "round1.partial"
            assert len(list((partial / "masks").iterdir())) == 3
            assert not (workdir / "pseudo_labels" / "round1").exists()  # nothing half-written in place
    result = _run_command(workdir, None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher: finished before" in result.stdout and "pseudo-labels: finished before" in result.stdout
    resumed = json.loads((workdir / "selftrain.json").read_text())
    for stage in ("teacher", "student1"):
        assert resumed["stages"][stage] == summary["stages"][stage]
    for name in ("masks", "confidence"):
        for path in sorted((reference / "pseudo_labels" / "round1" / name).iterdir()):
            assert (workdir / "pseudo_labels" / "round1" / name / path.name).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_a_student_with_split_batch_statistics_killed_mid_epoch_resumes_as_the_uninterrupted_run(tmp_path):
    # The shipped student (`model.batch_norm_by_source`): where its batches split is no checkpoint's but set
    # from the data at every start, so a resumed student must split them where the killed one did.
    config = tiny_selftrain_config()
    config.model.batch_norm_by_source = True
    summary = selftrain.run(config, tmp_path / "reference")
    workdir = tmp_path / "killed"
    # A save every step, each waiting for the one before, so the kill after step 6 (mid-epoch 2 of the
    # student) leaves step 4's or 5's complete to resume from.
    options = ("--config.model.batch_norm_by_source=True", "--config.checkpoint_every_steps=1")
    result = _run_command(workdir, "6", *options)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (workdir / "student1" / "stage.json").exists()
    result = _run_command(workdir, None, *options)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "student 1: training in" in result.stdout and "resumed at epoch 2" in result.stdout
    resumed = json.loads((workdir / "selftrain.json").read_text())
    assert resumed["stages"]["student1"] == summary["stages"]["student1"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "selftrain.weighting",
            "soft",
            "selftrain.weighting: must be 'threshold' or 'confidence', got 'soft'",
        ),
        ("selftrain.confidence_threshold", 0.4, "selftrain.confidence_threshold: must be a probability in"),
        ("data.pseudo_fraction", 1.0, "data.pseudo_fraction: must be a number in [0, 1), got 1.0"),
        ("selftrain.rounds", -1, "selftrain.rounds: must be a non-negative integer, got -1"),
        ("data.pseudo_fraction", 0.05, "data.pseudo_fraction: 0.05 of the student's batch of 4 "),
        ("selftrain.student_batch_size", 1, "data.pseudo_fraction: 0.5 of the student's batch of 1 "),
        (
            "data.extra_labelled_dir",
            "ma2020",
            "data.extra_labelled_dir: self-training's student mixes in pseudo-labels, which cannot be mixed",
        ),
        (
            "data.extra_min_lesion_fraction",
            1.0,
            "data.extra_min_lesion_fraction: must be a share of the slice in [0, 1), got 1.0",
        ),
        (
            "selftrain.student_batch_size",
            -1,
            "selftrain.student_batch_size: must be a non-negative integer (0: the teacher's batch_size), "
            "got -1",
        ),
        (
            "selftrain.student_init",
            "pretrained",
            "selftrain.student_init: must be 'scratch' or 'teacher', got",
        ),
    ],
)
def test_invalid_selftrain_keys_are_one_line_naming_the_key(key, value, message):
    from rdunet_jax import config_validation

    config = tiny_selftrain_config()
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # Keys only the pseudo-labelling stage or the student reads: refused before the teacher trains.
        ("selftrain.rounds", 0, "selftrain.rounds: 0; self-training needs at least one round"),
        ("selftrain.confidence_threshold", 0.4, "selftrain.confidence_threshold: must be a probability in"),
        ("selftrain.student_batch_size", 1, "data.pseudo_fraction: 0.5 of the student's batch of 1 "),
        ("selftrain.student_num_epochs", 0, "selftrain.student_num_epochs: must be a positive integer"),
        (
            "model.head",
            "exclusive",
            "selftrain.rounds: pseudo-labels are lesion masks, for model.head='binary'",
        ),
    ],
)
def test_the_command_refuses_a_bad_stage_setting_before_anything_is_trained(tmp_path, key, value, message):
    config = tiny_selftrain_config()
    if key == "model.head":
        config.data.classes = ("ggo", "consolidation")
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(UserError) as raised:
        selftrain.run(config, tmp_path / "run")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_mixed_in_source_that_rounds_to_no_row_is_refused():
    from rdunet_jax import config_validation

    for source, fraction in (
        ("pseudo_label_dir", "pseudo_fraction"),
        ("extra_labelled_dir", "extra_fraction"),
    ):
        config = make_tiny_config()
        config.loss, config.batch_size = "dice_weighted", 4
        config.data[source], config.data[fraction] = "/somewhere", 0.1
        message = f"^data.{fraction}: 0.1 of a batch of 4 rounds to no row of data.{source}$"
        with pytest.raises(UserError, match=message):
            config_validation.validate(config)
        config.data[fraction] = 0.125  # half a row: rounds to one
        config_validation.validate(config)


def test_self_training_without_an_unlabelled_split_is_refused_before_training(tmp_path):
    config = tiny_selftrain_config()
    config.data.num_unlabelled = 0
    message = (
        "selftrain.rounds: data.name='synthetic' has no unlabelled split (semiseg: the folder "
        "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs; the phantom: data.num_unlabelled > 0)"
    )
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        selftrain.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # A workdir that is a file is refused by name, before anything else.
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"^--workdir: {re.escape(str(tmp_path / 'file'))} exists and is not"):
        selftrain.run(tiny_selftrain_config(), tmp_path / "file")


@pytest.mark.parametrize("held", ["", "teacher"])
def test_a_self_training_workdir_or_stage_in_use_is_refused_before_anything_is_written(tmp_path, held):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir / held):
        with pytest.raises(UserError, match=f"^--workdir: {re.escape(str(workdir / held))} is in use by"):
            selftrain.run(tiny_selftrain_config(), workdir)
        assert sorted(str(path.relative_to(workdir)) for path in workdir.rglob("*")) == sorted(
            {held, str(pathlib.Path(held) / ".lock")} - {""}
        )


def test_how_often_a_stage_logged_or_saved_does_not_make_it_another_config(tmp_path):
    config = tiny_selftrain_config()
    config.eval.checkpoint = "last"  # as configs/semiseg_selftrain.py scores its stages
    record = json.loads(config.to_json_best_effort(sort_keys=True))
    (tmp_path / "stage.json").write_text(json.dumps({"config": record, "result": {"dice": 0.5}}))
    config.checkpoint_every_epochs += 9
    config.log_every_steps += 1
    config.eval.overlay_every_epochs += 1
    config.compilation_cache_dir = str(tmp_path / "elsewhere")
    assert selftrain._finished_stage(tmp_path, config) == {"dice": 0.5}
    config.eval.validate_every_epochs += 1  # picks no weights: the stage is scored with its last checkpoint
    assert selftrain._finished_stage(tmp_path, config) == {"dice": 0.5}
    config.seed += 1
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(tmp_path, config)


def test_a_stage_finished_by_older_code_counts_as_finished_and_another_config_is_refused(tmp_path):
    config = tiny_selftrain_config()
    record = json.loads(config.to_json_best_effort(sort_keys=True))
    del record["data"]["extra_fraction"]  # a key the schema gained after the stage ran, left at its default
    (tmp_path / "stage.json").write_text(json.dumps({"config": record, "result": {"dice": 0.5}}))
    assert selftrain._finished_stage(tmp_path, config) == {"dice": 0.5}
    config.data.extra_fraction = 0.25  # not the default: not what the stage ran
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(tmp_path, config)
    config = tiny_selftrain_config()
    config.num_epochs = 5
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(tmp_path, config)


def test_an_unfinished_stage_resumes_only_under_the_config_it_was_started_with(tmp_path):
    config = tiny_selftrain_config()
    # What train.train_and_evaluate writes when a stage starts, before its first checkpoint.
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    config.log_every_steps += 1  # bookkeeping: the same run
    assert selftrain._finished_stage(tmp_path, config) is None
    learning_rate = config.learning_rate
    config.learning_rate *= 2
    with pytest.raises(UserError) as refused:
        selftrain._finished_stage(tmp_path, config)
    assert str(refused.value) == (
        f"{tmp_path}: this unfinished stage was started with another config (learning_rate: "
        f"{learning_rate!r} then, {learning_rate * 2!r} now); rerun it unchanged to finish it, or use "
        "another --workdir (or remove the folder)"
    )


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_stage_recorded_before_the_speed_options_is_kept_when_finished_and_resumed_only_in_its_forms(
    tmp_path, finished
):
    # Another form of a layer computes the same model to other digits: a finished teacher is reused, but
    # resuming an unfinished one in today's forms would not continue it to the digit.
    config = tiny_selftrain_config()
    record = json.loads(config.to_json_best_effort())
    for key in config_lib.SPEED_OPTIONS:
        del record["model"][key]
    if finished:
        (tmp_path / "stage.json").write_text(json.dumps({"config": record, "result": {"dice": 0.5}}))
        assert selftrain._finished_stage(tmp_path, config) == {"dice": 0.5}
        return
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"\(model.batch_norm_impl: 'flax' then, 'closed_form' now\)"):
        selftrain._finished_stage(tmp_path, config)
    for key, option in config_lib.SPEED_OPTIONS.items():
        config.model[key] = option.before_key
    assert selftrain._finished_stage(tmp_path, config) is None


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_stage_keeps_its_work_when_its_data_moved_and_names_a_source_turned_on(tmp_path, finished):
    # A cluster job that stages the data to a new scratch folder each time: the finished teacher (hours of
    # training) was refused, with no key named, and plain training accepted the same change.
    config = tiny_selftrain_config()
    record = json.loads(config.to_json_best_effort())
    if finished:
        (tmp_path / "stage.json").write_text(json.dumps({"config": record, "result": {"dice": 0.5}}))
    else:
        (tmp_path / "config.json").write_text(json.dumps(record))
    config.data.data_dir = str(tmp_path / "moved" / "tfds")
    config.data.manual_dir = str(tmp_path / "moved" / "covid-semiseg")
    assert selftrain._finished_stage(tmp_path, config) == ({"dice": 0.5} if finished else None)
    config.data.extra_labelled_dir = str(tmp_path / "more")  # a labelled source turned on: not a move
    with pytest.raises(UserError) as refused:
        selftrain._finished_stage(tmp_path, config)
    assert f"(data.extra_labelled_dir: '' then, '{tmp_path / 'more'}' now)" in str(refused.value)


def test_a_training_stage_says_where_it_trains_and_marks_itself_finished(tmp_path, monkeypatch, capsys):
    outcome = {"split": "test", "step": 4, "dice": 0.5, "loss": 0.2, "hd95": 3.0}
    monkeypatch.setattr(selftrain.train, "train_and_evaluate", lambda config, folder: dict(outcome))
    config = tiny_selftrain_config()
    result = selftrain.train_stage(config, tmp_path / "teacher", "teacher")
    assert capsys.readouterr().out == f"teacher: training in {tmp_path / 'teacher'}\n"
    assert result == {"split": "test", "step": 4, "dice": 0.5}  # the evaluation's summary keys only
    marker = json.loads((tmp_path / "teacher" / "stage.json").read_text())
    assert marker == {"config": json.loads(config.to_json()), "result": result}


def test_the_model_digest_of_a_stage_is_of_its_recorded_config(tmp_path):
    import hashlib

    for name, config in (("a", {"x": 1, "y": [2]}), ("b", {"y": [2], "x": 1}), ("c", {"x": 2, "y": [2]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text(json.dumps({"config": config, "result": {}}))
    digest = {name: selftrain._stage_digest(tmp_path / name) for name in "abc"}
    # The first 16 hex digits of the SHA-256 of the config's JSON with sorted keys, whatever its order.
    assert digest["a"] == hashlib.sha256(b'{"x": 1, "y": [2]}').hexdigest()[:16] == digest["b"]
    assert digest["c"] != digest["a"] and len(digest["c"]) == 16
    assert selftrain._stage_digest(tmp_path / "none") is None  # no marker: unknown


def test_a_moved_workdir_keeps_its_finished_stages(uninterrupted, tmp_path, capsys):
    workdir, summary = uninterrupted
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    again = selftrain.run(tiny_selftrain_config(), moved)
    output = capsys.readouterr().out
    assert "student 1: finished before" in output and "epoch 1" not in output, output
    assert again["stages"] == summary["stages"] and again["final_model"] == str(moved / "student1")
    # The run's last line: the final student's and the teacher's Dice, and where the summary is.
    final, teacher = summary["final"]["dice"], summary["stages"]["teacher"]["dice"]
    assert output.splitlines()[-1] == (
        f"self-training: test dice {final:.4f} (teacher {teacher:.4f}) -> {moved / 'selftrain.json'}"
    )
    # Only the workdir's own pseudo-label folder counts as the same: another round's, or another
    # workdir's with the same name, is another config.
    config = tiny_selftrain_config()
    for labels in (moved / "pseudo_labels" / "round2", tmp_path / "elsewhere" / "pseudo_labels" / "round1"):
        with pytest.raises(UserError, match="run with another config"):
            selftrain._finished_stage(
                moved / "student1", selftrain.student_config(config, labels, moved / "teacher")
            )


def test_a_student_whose_pseudo_labels_are_gone_is_refused_not_reported_as_finished(uninterrupted, tmp_path):
    # Its config names only the pseudo-labels' folder: labels made anew there (of a retrained teacher, say)
    # would otherwise pass it as finished.
    workdir, _ = uninterrupted
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    shutil.rmtree(moved / "pseudo_labels" / "round1")
    message = (
        f"{moved / 'student1'}: trained on pseudo-labels no longer in {moved / 'pseudo_labels' / 'round1'}; "
        "remove it to train the student on new ones, or use another --workdir"
    )
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        selftrain.run(tiny_selftrain_config(), moved)
    assert not (moved / "pseudo_labels" / "round1").exists()


def test_a_stage_config_names_its_paths_inside_the_workdir_by_their_place():
    def values(model_init):
        return {"data": {"pseudo_label_dir": "/runs/a/pseudo_labels/round1"}, "model_init": model_init}

    by_place = selftrain._workdir_paths_by_place
    assert by_place(values("/runs/a/teacher")) == {
        "data": {"pseudo_label_dir": "pseudo_labels/round1"},
        "model_init": "teacher",
    }
    assert by_place(values("/runs/a/student1"))["model_init"] == "student1"  # round 2's start
    assert by_place(values("/pretrained/run"))["model_init"] == "/pretrained/run"  # outside: kept
    assert by_place(values("teacher"))["model_init"] == "teacher"  # relative: kept as given
    assert by_place(values(""))["model_init"] == ""
    moved = by_place(values("/runs/a/teacher"), pathlib.Path("/runs"))  # measured from another folder
    assert moved == {"data": {"pseudo_label_dir": "a/pseudo_labels/round1"}, "model_init": "a/teacher"}


def test_an_unfinished_student_of_a_moved_workdir_resumes_there(tmp_path, monkeypatch):
    config = tiny_selftrain_config()
    started = selftrain.student_config(
        config, tmp_path / "old" / "pseudo_labels" / "round1", tmp_path / "old" / "teacher"
    )
    (tmp_path / "new" / "student1").mkdir(parents=True)
    (tmp_path / "new" / "student1" / "config.json").write_text(started.to_json_best_effort())
    # As `run` names them: the workdir as given (here relative), the pseudo-labels by absolute path.
    monkeypatch.chdir(tmp_path)
    moved = selftrain.student_config(
        config, (pathlib.Path("new") / "pseudo_labels" / "round1").absolute(), pathlib.Path("new") / "teacher"
    )
    assert selftrain._finished_stage(pathlib.Path("new") / "student1", moved) is None
    other = selftrain.student_config(
        config, tmp_path / "new" / "pseudo_labels" / "round2", tmp_path / "new" / "teacher"
    )
    with pytest.raises(UserError, match="started with another config"):
        selftrain._finished_stage(pathlib.Path("new") / "student1", other)


def test_the_shipped_config_starts_its_student_from_its_teacher_for_a_third_of_the_epochs():
    # The README's choice for issue 27's 90 minutes: the teacher is configs/semiseg.py's 300 epochs (decay
    # at 150), the student starts from it for 100 (decay at 50), 4 labelled + 1 pseudo-labelled slices a step.
    config = config_lib.config_module(REPO_ROOT / "configs" / "semiseg_selftrain.py").get_config()
    workdir = pathlib.Path("runs") / "selftrain"
    teacher = selftrain.teacher_config(config)
    student = selftrain.student_config(config, workdir / "pseudo_labels" / "round1", workdir / "teacher")

    def schedule(stage):
        return stage.num_epochs, stage.lr_decay_epochs, stage.batch_size, stage.model_init

    assert schedule(teacher) == (300, 150, 4, "")
    assert schedule(student) == (100, 50, 5, str(workdir / "teacher"))


def test_the_shipped_config_splits_the_students_batch_statistics_and_keeps_an_earlier_runs_teacher(tmp_path):
    # The choice of 2026-12-05 (three draws over 5 folds): the student alone normalises its pseudo-labelled
    # row apart. A workdir finished under the earlier config keeps its teacher; its student is refused by
    # name, and kept with the earlier setting.
    config = config_lib.config_module(REPO_ROOT / "configs" / "semiseg_selftrain.py").get_config()
    config_validation.validate(config)
    earlier = config_lib.config_module(REPO_ROOT / "configs" / "semiseg_selftrain.py").get_config()
    earlier.model.batch_norm_by_source = False
    assert selftrain.teacher_config(config).to_dict() == selftrain.teacher_config(earlier).to_dict()
    assert selftrain.teacher_config(config).model.batch_norm_by_source is False
    labels, teacher = tmp_path / "pseudo_labels" / "round1", tmp_path / "teacher"
    student = selftrain.student_config(config, labels, teacher)
    assert student.model.batch_norm_by_source is True
    record = config_lib.to_json(selftrain.student_config(earlier, labels, teacher))
    (tmp_path / "student1").mkdir()
    (tmp_path / "student1" / "stage.json").write_text(json.dumps({"config": record, "result": {"dice": 0.5}}))
    with pytest.raises(UserError, match="model.batch_norm_by_source: False then, True now"):
        selftrain._finished_stage(tmp_path / "student1", student)
    assert selftrain._finished_stage(
        tmp_path / "student1", selftrain.student_config(earlier, labels, teacher)
    )


def test_the_shipped_config_keeps_every_pool_pixel_weighted_by_the_teachers_confidence():
    # The 5-fold choice of 2026-12-04: no pixel drops out; the weight is |2p - 1|, so a pixel the teacher
    # is unsure of (p near 0.5) counts little and a sure one nearly fully.
    config = config_lib.config_module(REPO_ROOT / "configs" / "semiseg_selftrain.py").get_config()
    probabilities = np.array([0.05, 0.3, 0.5, 0.7, 0.95], np.float32)
    mask, weight = selftrain.pseudo_label_weights(
        probabilities,
        config.selftrain.confidence_threshold,
        config.selftrain.weighting,
        config.eval.threshold,
    )
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(weight, [0.9, 0.4, 0.0, 0.4, 0.9], atol=1e-6)


def test_a_student_started_from_its_teacher_trains_from_the_teachers_weights(uninterrupted, tmp_path, capsys):
    workdir, summary = uninterrupted
    config = tiny_selftrain_config()
    config.model_init = str(tmp_path / "pretrained")  # a user's start: the teacher's, not this student's
    labels = workdir / "pseudo_labels" / "round1"
    assert selftrain.student_config(config, labels, workdir / "teacher").model_init == config.model_init
    config.selftrain.student_init = "teacher"
    assert selftrain.student_config(config, labels, workdir / "teacher").model_init == str(
        workdir / "teacher"
    )
    assert selftrain.teacher_config(config).model_init == config.model_init
    # The same run with the student started from the teacher: the teacher and pseudo-labels are kept,
    # the finished scratch student is another config, and a fresh workdir's student starts from its teacher.
    with pytest.raises(UserError, match="run with another config"):
        selftrain._finished_stage(
            workdir / "student1", selftrain.student_config(config, labels.absolute(), workdir / "teacher")
        )
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "student1")
    (copy / "selftrain.json").unlink()
    config.model_init = ""
    again = selftrain.run(config, copy)
    output = capsys.readouterr().out
    assert "teacher: finished before" in output and "pseudo-labels: finished before" in output, output
    assert (
        f"model_init: parameters and BatchNorm statistics of {(copy / 'teacher').absolute()} (step 4)"
        in output
    )
    assert again["stages"]["teacher"] == summary["stages"]["teacher"]
    stored = json.loads((copy / "student1" / "config.json").read_text())
    assert stored["model_init"] == str((copy / "teacher").absolute())
    # Moved, the workdir keeps its student started from its own teacher.
    moved = tmp_path / "moved"
    shutil.move(copy, moved)
    student = selftrain.student_config(
        config, (moved / "pseudo_labels" / "round1").absolute(), moved / "teacher"
    )
    assert selftrain._finished_stage(moved / "student1", student) == again["stages"]["student1"]


def test_a_student_batch_that_does_not_divide_over_the_devices_is_refused_before_the_teacher(
    tmp_path, monkeypatch
):
    config = tiny_selftrain_config()
    config.batch_size, config.selftrain.student_batch_size = 4, 5  # the shipped config's on 2 devices
    monkeypatch.setattr(devices, "data_parallel_mesh", lambda: types.SimpleNamespace(size=2))

    def no_training(*args, **kwargs):
        raise AssertionError("a stage trained before the student's batch was checked")

    monkeypatch.setattr(selftrain, "train_stage", no_training)
    with pytest.raises(UserError) as raised:
        selftrain.run(config, tmp_path / "run")
    assert str(raised.value).startswith("batch_size: 5 ")
    assert not (tmp_path / "run").exists()


def test_pseudo_labels_of_another_pool_are_refused_not_reused(uninterrupted, tmp_path):
    workdir, _ = uninterrupted
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    config = tiny_selftrain_config()
    config.data.num_unlabelled = POOL_SIZE + 2  # the pool grew: the teacher is kept, its labels are not
    folder = moved / "pseudo_labels" / "round1"
    message = (
        f"data.pseudo_label_dir: {folder} labels a pool of {POOL_SIZE} slices, the unlabelled split now "
        f"holds {POOL_SIZE + 2}; remove the folder (and the students trained on it) to predict it again"
    )
    with pytest.raises(UserError) as raised:
        selftrain.run(config, moved)
    assert str(raised.value) == message


def test_pseudo_labels_of_a_pool_replaced_by_as_many_other_slices_are_refused_not_reused(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    workdir, _ = uninterrupted
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    folder = moved / "pseudo_labels" / "round1"
    stored = json.loads((folder / pseudo_labels.SUMMARY).read_text())
    pool = datasets.unlabelled_pool(tiny_selftrain_config().data)
    assert stored["pool_digest"] == pseudo_labels.pool_ids_and_digest(pool)[1]
    last = pool[POOL_SIZE - 1]
    one_pixel_brighter = last["image"].copy()
    one_pixel_brighter[0, 0] += 1
    kept = [pool[index] for index in range(POOL_SIZE - 1)]
    # Another slice in the last one's place: refused, naming both.
    monkeypatch.setattr(selftrain.datasets, "unlabelled_pool", lambda data: [*kept, {**last, "id": "other"}])
    with pytest.raises(UserError) as raised:
        selftrain.run(tiny_selftrain_config(), moved)
    assert str(raised.value) == (
        f"{folder}: these pseudo-labels label slice {last['id']!r} at index {POOL_SIZE - 1}, where the "
        "unlabelled split now holds 'other'; remove the folder (and the students trained on it) to predict "
        "it again"
    )
    # The same slices, one pixel changed (a file replaced, or another JPEG decoder): reused, with a warning.
    monkeypatch.setattr(
        selftrain.datasets, "unlabelled_pool", lambda data: [*kept, {**last, "image": one_pixel_brighter}]
    )
    capsys.readouterr()
    selftrain.run(tiny_selftrain_config(), moved)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {folder}: the unlabelled split holds the same slices with other pixels than when these "
        "pseudo-labels were made (files replaced, or decoded by another image library); reusing them: remove "
        "the folder (and the students trained on it) to predict them again"
    ]
    assert json.loads((folder / pseudo_labels.SUMMARY).read_text()) == stored


def test_a_second_round_learns_from_the_first_students_pseudo_labels_and_ends_with_its_student(
    tmp_path, monkeypatch
):
    """The loop of rounds without training: each round pseudo-labels the pool with the model before it (the
    teacher, then student 1), and the run's final model is the last round's student."""
    labelled, trained = [], []

    def train_stage(stage_config, folder, name):
        trained.append((name, folder, stage_config))
        folder.mkdir(parents=True)
        return {"split": "test", "dice": 0.5 + 0.1 * len(trained)}

    def write_pseudo_labels(config, model_folder, model_config, folder):
        labelled.append((model_folder, model_config, folder))
        return {"num_slices": POOL_SIZE}

    monkeypatch.setattr(selftrain, "train_stage", train_stage)
    monkeypatch.setattr(selftrain, "write_pseudo_labels", write_pseudo_labels)
    config = tiny_selftrain_config()
    config.selftrain.rounds, config.selftrain.student_init = 2, "teacher"
    workdir = tmp_path / "run"
    summary = selftrain._run_stages(config, workdir)
    assert [name for name, _, _ in trained] == ["teacher", "student 1", "student 2"]
    assert [folder for _, folder, _ in trained] == [
        workdir / "teacher",
        workdir / "student1",
        workdir / "student2",
    ]
    assert [(model, folder) for model, _, folder in labelled] == [
        (workdir / "teacher", workdir / "pseudo_labels" / "round1"),
        (workdir / "student1", workdir / "pseudo_labels" / "round2"),
    ]
    assert labelled[1][1] is trained[1][2]  # round 2 predicts with student 1's own config
    student2 = trained[2][2]
    assert student2.model_init == str((workdir / "student1").absolute())
    assert student2.data.pseudo_label_dir == str((workdir / "pseudo_labels" / "round2").absolute())
    assert summary["final"] == {"split": "test", "dice": 0.8} and summary["final_model"] == str(
        workdir / "student2"
    )
