"""Evaluation files (JSON, CSV, markdown, overlays), their reproducibility, flips and per-volume values.

Everything runs the tiny model at the shapes the other tests compile (32 px, eval batch 16)."""

import csv
import io
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from helpers import assert_same_training_state, ellipsoid, independent_hd95, make_tiny_config, refusal
from scipy import ndimage

from rdunet_jax import checkpoints, datasets, evaluate, files, inference, models, reports, steps, visualize
from rdunet_jax.errors import UserError

EXISTING_KEYS = ("dice", "jaccard", "f_score", "precision", "recall", "global_dice", "num_slices")


def _files(folder):
    return {
        path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as at a terminal, even where the test runner was started ignoring it:
    a shell's background job ignores SIGINT, and Python then leaves it ignored, so the stop never comes."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_stop_during_evaluation_leaves_the_last_evaluation_whole(
    tiny_state, tmp_path, monkeypatch, sigint_raises
):
    config = make_tiny_config()
    predictor = inference.JaxPredictor(tiny_state)
    evaluate.evaluate_state(predictor, config, tmp_path, "test")
    before = _files(tmp_path / "metrics")
    assert sum(str(path).startswith("overlays/test/") for path in before) == 2 * config.eval.num_overlays
    config.eval.threshold = 0.9  # another evaluation: other figures in every file
    drawn, write_png = [], visualize.write_png

    def stopped_at_the_second_overlay(path, rgb):
        drawn.append(path)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        write_png(path, rgb)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(visualize, "write_png", stopped_at_the_second_overlay)
        with pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_state(predictor, config, tmp_path, "test")
    assert _files(tmp_path / "metrics") == before  # nothing of the new one, the old overlays all there
    assert sorted(path.name for path in (tmp_path / "metrics" / "overlays").iterdir()) == ["test"]

    # A Ctrl-C while the files are being replaced waits until the last one is: the new evaluation whole.
    write_text_atomic = files.write_text_atomic

    def interrupted_after_the_first_file(path, text):
        write_text_atomic(path, text)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(files, "write_text_atomic", interrupted_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_state(predictor, config, tmp_path, "test")
    monkeypatch.undo()
    after = _files(tmp_path / "metrics")
    assert json.loads(after[evaluate.pathlib.Path("test.json")])["threshold"] == 0.9
    assert ", threshold 0.9, " in after[evaluate.pathlib.Path("test.md")].decode()
    assert after[evaluate.pathlib.Path("test_slices.csv")] != before[evaluate.pathlib.Path("test_slices.csv")]

    def kinds(found):  # the files, overlays by kind and rank (the new threshold ranks other slices)
        return sorted(str(path) if path.parent.name != "test" else path.name[:7] for path in found)

    assert kinds(after) == kinds(before)  # every file anew, and no staged folder left
    assert sorted(path.name for path in (tmp_path / "metrics" / "overlays").iterdir()) == ["test"]


def test_evaluating_twice_gives_identical_files(tiny_state, tmp_path):
    config = make_tiny_config()
    predictor = inference.JaxPredictor(tiny_state)
    summary = evaluate.evaluate_state(predictor, config, tmp_path / "a", "test")
    evaluate.evaluate_state(predictor, config, tmp_path / "b", "test")
    first, second = _files(tmp_path / "a" / "metrics"), _files(tmp_path / "b" / "metrics")
    assert first == second
    names = {str(path) for path in first}
    assert {"test.json", "test_slices.csv", "test.md"} <= names
    assert any(name.startswith("overlays/test/best_01_") for name in names)
    assert any(name.startswith("overlays/test/worst_01_") for name in names)

    written = json.loads(first[evaluate.pathlib.Path("test.json")])
    assert written == json.loads(json.dumps(summary))
    for key in EXISTING_KEYS:
        assert key in written
    assert written["num_slices"] == 4
    for key in (
        "specificity",
        "hd95",
        "hd95_std",
        "hd95_num_one_empty",
        "hd95_num_both_empty",
        "conventions",
    ):
        assert key in written
    assert written["hd95_unit"] == "pixels"  # phantom slices carry no spacing
    assert written["per_volume"] is None  # nor case ids
    assert written["lesion_size"]["area_unit"] == "pixels"

    rows = list(csv.DictReader(io.StringIO(first[evaluate.pathlib.Path("test_slices.csv")].decode())))
    assert len(rows) == 4 and rows[0]["id"] == "phantom-test-00000"
    assert set(rows[0]) == set(reports.SLICE_COLUMNS)
    assert np.mean([float(row["dice"]) for row in rows]) == pytest.approx(written["dice"], abs=1e-5)
    markdown = first[evaluate.pathlib.Path("test.md")].decode()
    assert "| Model | DSC | JC | F-score |" in markdown and "Lesion size" in markdown
    # Phantom slices are stored at the model's 32 px: scored at their original resolution, nothing changes.
    original = written["original_resolution"]
    for key in ("dice", "jaccard", "f_score", "global_dice", "num_slices"):
        assert original[key] == pytest.approx(written[key], abs=1e-12)
    assert "At each slice's original resolution" in markdown and f"DSC {original['dice']:.4f}" in markdown


def _volume_records(case_id, num_slices, lesion_rows):
    """NIfTI-like records: 64x64 HU slices (resized to 32 px), 0.8 x 0.6 mm pixels, 2 mm slices."""
    records = []
    for index in range(num_slices):
        image = np.full((64, 64), -800.0, np.float32)
        mask = np.zeros((64, 64), np.uint8)
        if index in lesion_rows:
            mask[20:40, 10:30] = 1
            image[mask > 0] = -200.0
        records.append(
            {
                "image": image,
                "mask": mask,
                "id": f"{case_id}-{index:04d}",
                "case_id": case_id,
                "slice_index": np.int32(index),
                "spacing": np.array([0.8, 0.6, 2.0], np.float32),
                "hu_window": np.array([-1350.0, 150.0], np.float32),
            }
        )
    return records


def test_per_volume_values_and_millimetres_from_case_ids_and_spacing(tiny_state):
    config = make_tiny_config()
    # Case "b" comes in two runs, out of order: volumes are rebuilt from case id and slice index.
    records = _volume_records("a", 3, {1}) + _volume_records("b", 4, {0, 3})
    records = records[:3] + records[5:] + records[3:5]
    collected = evaluate.collect_slices(inference.JaxPredictor(tiny_state), records, config)
    summary = evaluate.summarize_collected(collected, config)
    assert collected["unit"] == "mm" and summary["hd95_unit"] == "mm"
    assert collected["rows"][0]["pixel_spacing"] == pytest.approx((1.6, 1.2))  # 64 px resized to 32
    assert summary["lesion_size"]["area_unit"] == "mm^2"
    volumes = summary["per_volume"]
    assert volumes["num_volumes"] == 2 and list(volumes["cases"]) == ["a", "b"]
    assert volumes["cases"]["a"]["num_slices"] == 3 and volumes["cases"]["b"]["num_slices"] == 4
    # Per-volume Dice pools the counts of the volume's slices.
    rows_b = [row for row in collected["rows"] if row["case_id"] == "b"]
    tp, fp, fn = (sum(row[key] for row in rows_b) for key in ("tp", "fp", "fn"))
    expected = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    assert volumes["cases"]["b"]["dice"] == pytest.approx(expected)
    assert json.loads(json.dumps(summary, allow_nan=False))  # no NaN or inf in the JSON
    # Original resolution: each slice is scored against its stored 64x64 mask, with 4 times the pixels.
    counts = np.array([row["original_counts"] for row in collected["rows"]])
    assert counts.sum(axis=1).tolist() == [64 * 64] * 7
    assert counts[:, [0, 2]].sum() == 3 * 20 * 20  # TP + FN: the stored lesion pixels of the 3 lesion slices
    original = summary["original_resolution"]
    dice = [1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn) for tp, fp, fn, _ in counts]
    assert original["num_slices"] == 7 and original["dice"] == pytest.approx(np.mean(dice))


def test_slices_of_no_volume_are_counted_and_left_out_of_the_volumes(tiny_state):
    # MedSeg's stack of unrelated slices was one "volume": a 3-D HD95 matched one patient's false alarm to
    # another's lesion. Slices without a case id now stay out of the volumes, which score as without them.
    config = make_tiny_config()
    volume = _volume_records("a", 3, {1})
    loose = [dict(record, case_id="", id=f"medseg_tr-{index:04d}") for index, record in enumerate(volume)]
    loose[0]["mask"] = np.zeros_like(loose[0]["mask"])  # nothing planted: a false alarm if predicted
    predictor = inference.JaxPredictor(tiny_state)
    alone = evaluate.summarize_collected(evaluate.collect_slices(predictor, volume, config), config)
    mixed_collected = evaluate.collect_slices(predictor, volume + loose, config)
    mixed = evaluate.summarize_collected(mixed_collected, config)
    assert [row["case_id"] for row in mixed_collected["rows"]] == ["a"] * 3 + [None] * 3
    assert mixed["num_slices"] == 6 and mixed["per_volume"]["num_volumes"] == 1
    assert mixed["per_volume"]["num_slices_outside_volumes"] == 3
    assert alone["per_volume"]["num_slices_outside_volumes"] == 0
    assert mixed["per_volume"]["cases"] == alone["per_volume"]["cases"]
    only_loose = evaluate.summarize_collected(evaluate.collect_slices(predictor, loose, config), config)
    assert only_loose["per_volume"] is None and only_loose["num_slices"] == 3
    # The report says so under its volume table, and the JSON's conventions too.
    stamp = {"split": "test", "step": 1, "threshold": 0.5, "test_time_flips": False, "image_size": 32}
    assert "3 slices of no volume are left out of this table." in reports.markdown_report(
        {**mixed, **stamp}, config
    )
    assert "slices of no volume" not in reports.markdown_report({**alone, **stamp}, config)
    assert "num_slices_outside_volumes" in mixed["conventions"]["per_volume"]


# Stored slices of 64 rows x 96 columns, voxels 0.7 x 0.8 x 5 mm, scored at the tiny model's 32 px: a
# model pixel spans 2 stored rows and 3 stored columns, 1.4 x 2.4 mm, whatever the code derives.
STORED_SHAPE, STORED_SPACING = (64, 96), (0.7, 0.8, 5.0)
MODEL_SPACING = (0.7 * 64 / 32, 0.8 * 96 / 32, 5.0)


def _planted_volumes():
    """{case id: (first slice index, predicted volume, expert volume)} at 32 x 32 px per slice."""
    target_a = ellipsoid((32, 32, 6), (14, 15, 2), (11.0, 16.0, 12.0), MODEL_SPACING)
    target_a[26:30, 2:7, 4] = True  # a second, 20-pixel lesion (67 mm^2) in slice 4
    prediction_a = ellipsoid((32, 32, 6), (17, 14, 3), (12.0, 14.0, 11.0), MODEL_SPACING)
    prediction_a[30:32, 28:32, 0] = True  # a false alarm in the corner
    target_b, prediction_b = np.zeros((2, 32, 32, 4), bool)
    target_b[5:13, 20:27, 1:3] = True
    prediction_b[6:14, 20:28, 0:3] = True
    return {"a": (0, prediction_a, target_a), "b": (10, prediction_b, target_b)}


def _stored_records_and_predictions(volumes, with_spacing=True):
    """Records of the volumes' slices, mixed and out of order, with their masks enlarged to the stored
    64 x 96 px (nearest-neighbour resizing to 32 px gives them back), and each slice's planted prediction."""
    order = [
        ("a", 3),
        ("a", 0),
        ("b", 2),
        ("a", 5),
        ("b", 0),
        ("a", 1),
        ("b", 3),
        ("a", 4),
        ("b", 1),
        ("a", 2),
    ]
    records, predictions = [], []
    for case_id, position in order:
        first, prediction, target = volumes[case_id]
        record = {
            "image": np.full(STORED_SHAPE, -800.0, np.float32),
            "mask": np.repeat(np.repeat(target[:, :, position], 2, axis=0), 3, axis=1).astype(np.uint8),
            "id": f"{case_id}-{first + position:04d}",
            "case_id": case_id,
            "slice_index": np.int32(first + position),
            "hu_window": np.array([-1350.0, 150.0], np.float32),
        }
        if with_spacing:
            record["spacing"] = np.array(STORED_SPACING, np.float32)
        records.append(record)
        predictions.append(prediction[:, :, position])
    return records, predictions


class PlantedPredictor(inference.Predictor):
    """A stand-in model that returns each slice's planted mask as its probabilities, in order."""

    step = 0

    def __init__(self, predictions):
        self.planted = iter(predictions)

    def _loss_and_probabilities(self, batch):
        probabilities = np.zeros(batch["image"].shape, np.float32)
        # Padding rows, after the last record, stay empty.
        for row, prediction in zip(range(len(probabilities)), self.planted, strict=False):
            probabilities[row, ..., 0] = prediction
        return np.zeros(len(probabilities), np.float32), probabilities


def _collect_with_planted_predictions(records, predictions, config):
    """evaluate.collect_slices with the model replaced by one that returns each slice's planted mask."""
    return evaluate.collect_slices(PlantedPredictor(predictions), records, config)


def test_hd95_and_lesion_areas_in_mm_match_brute_force_with_anisotropic_voxels():
    """Per-slice HD95 in mm, per-volume 3-D HD95 in mm (MedPy's definition: 95th percentile of the union
    of both directions' nearest border distances, see helpers.independent_hd95) and lesion areas in
    mm^2 against brute force, for non-square stored slices with 0.7 x 0.8 x 5 mm voxels."""
    config = make_tiny_config()
    config.eval.small_lesion_area = 100.0  # mm^2: 30 model pixels of 1.4 x 2.4 mm
    volumes = _planted_volumes()
    records, predictions = _stored_records_and_predictions(volumes)
    collected = _collect_with_planted_predictions(records, predictions, config)
    summary = evaluate.summarize_collected(collected, config)
    assert collected["unit"] == "mm" and summary["hd95_unit"] == "mm"

    for row, record, prediction in zip(collected["rows"], records, predictions, strict=True):
        assert row["pixel_spacing"] == pytest.approx(MODEL_SPACING[:2], rel=1e-6)
        assert row["slice_spacing"] == pytest.approx(MODEL_SPACING[2], rel=1e-6)
        target = record["mask"][::2, ::3] > 0
        if prediction.any() and target.any():
            expected = independent_hd95(prediction, target, MODEL_SPACING[:2])
            assert row["hd95"] == pytest.approx(expected, rel=1e-6), row["id"]
        else:
            assert not np.isfinite(row["hd95"])

    cases = summary["per_volume"]["cases"]
    expected_hd95 = {
        case_id: independent_hd95(prediction, target, MODEL_SPACING)
        for case_id, (_, prediction, target) in volumes.items()
    }
    for case_id, expected in expected_hd95.items():
        assert cases[case_id]["hd95"] == pytest.approx(expected, rel=1e-6), case_id
        _, prediction, target = volumes[case_id]
        volume_dice = 2 * np.sum(prediction & target) / (prediction.sum() + target.sum())
        assert cases[case_id]["dice"] == pytest.approx(volume_dice, rel=1e-12), case_id
    assert summary["per_volume"]["hd95_num_volumes"] == 2
    assert summary["per_volume"]["hd95"] == pytest.approx(np.mean(list(expected_hd95.values())), rel=1e-6)
    # Case a's masks tell the slice spacing and the order of the in-plane spacings apart.
    _, prediction_a, target_a = volumes["a"]
    for wrong_spacing in ((1.4, 2.4, 1.0), (2.4, 1.4, 5.0)):
        assert abs(independent_hd95(prediction_a, target_a, wrong_spacing) - expected_hd95["a"]) > 1.0

    pixel_area_mm2 = (0.7 * 64 / 32) * (0.8 * 96 / 32)
    expected_areas = []
    for record in records:
        labels, count = ndimage.label(record["mask"][::2, ::3], structure=np.ones((3, 3)))
        expected_areas += [np.sum(labels == label) * pixel_area_mm2 for label in range(1, count + 1)]
    areas = [lesion["area"] for lesion in collected["lesions"]]
    np.testing.assert_allclose(sorted(areas), sorted(expected_areas), rtol=1e-6)
    sizes = summary["lesion_size"]
    assert sizes["area_unit"] == "mm^2" and sizes["small_area"] == 100.0
    small = [area for area in expected_areas if area < 100.0]
    large = [area for area in expected_areas if area >= 100.0]
    assert len(small) == 1 and len(large) == 7  # 20 px is small; 51 and 56 px (171, 188 mm^2) are large
    assert sizes["small"]["num_lesions"] == 1 and sizes["large"]["num_lesions"] == 7
    assert sizes["small"]["mean_area"] == pytest.approx(np.mean(small), rel=1e-6)
    assert sizes["large"]["mean_area"] == pytest.approx(np.mean(large), rel=1e-6)


def test_without_spacing_hd95_is_in_voxels_and_lesion_areas_in_model_pixels():
    config = make_tiny_config()
    config.eval.small_lesion_area = 100.0  # pixels at 32 px
    volumes = _planted_volumes()
    records, predictions = _stored_records_and_predictions(volumes, with_spacing=False)
    collected = _collect_with_planted_predictions(records, predictions, config)
    summary = evaluate.summarize_collected(collected, config)
    assert collected["unit"] == "pixels" and summary["lesion_size"]["area_unit"] == "pixels"
    for case_id, (_, prediction, target) in volumes.items():
        expected = independent_hd95(prediction, target, (1.0, 1.0, 1.0))
        assert summary["per_volume"]["cases"][case_id]["hd95"] == pytest.approx(expected, rel=1e-9)
    sizes = summary["lesion_size"]
    assert sizes["small"]["num_lesions"] == 5 and sizes["large"]["num_lesions"] == 3  # 20, 51, 51, 56, 56 px
    assert sizes["large"]["mean_area"] == pytest.approx((143 + 167 + 143) / 3)


def test_slice_metadata_scales_each_axis_spacing_by_its_own_resize():
    record = {"image": np.zeros((60, 90), np.float32), "id": 7, "spacing": np.array([0.7, 0.8, 5.0])}
    meta = evaluate.slice_metadata(record, 30)
    assert meta["pixel_spacing"] == pytest.approx((0.7 * 60 / 30, 0.8 * 90 / 30))
    assert meta["slice_spacing"] == 5.0
    assert meta["id"] == "7" and meta["case_id"] is None and meta["slice_index"] is None
    del record["spacing"]
    assert evaluate.slice_metadata(record, 30)["pixel_spacing"] is None


def test_original_resolution_counts_resize_probabilities_bilinearly_to_the_stored_mask():
    # Top row certain, bottom row not: resized to 4 rows, PIL's bilinear (pixel centres aligned) gives
    # rows 1, 0.75, 0.25, 0, so the top two rows of the 4x6 slice are predicted.
    probabilities = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        evaluate.input_pipeline.resize_probabilities(probabilities, (4, 6))[:, 0], [1.0, 0.75, 0.25, 0.0]
    )
    mask = np.zeros((4, 6), bool)
    mask[:3, :] = True  # 18 lesion pixels: 12 predicted, 6 missed
    mask[0, 0] = False  # one predicted pixel outside the lesion
    assert evaluate.original_resolution_counts(probabilities, mask, 0.5) == (11, 1, 6, 6)
    assert evaluate.original_resolution_counts(probabilities, mask, 0.8) == (5, 1, 12, 6)


def test_ranked_slices_skip_empty_slices_and_break_ties_by_order():
    rows = [
        {"tp": 0, "fp": 0, "fn": 0, "lesion_pixels": 0, "predicted_pixels": 0},  # both empty: never ranked
        {"tp": 5, "fp": 5, "fn": 0, "lesion_pixels": 5, "predicted_pixels": 10},
        {"tp": 4, "fp": 0, "fn": 0, "lesion_pixels": 4, "predicted_pixels": 4},
        {"tp": 0, "fp": 3, "fn": 0, "lesion_pixels": 0, "predicted_pixels": 3},
        {"tp": 0, "fp": 0, "fn": 2, "lesion_pixels": 2, "predicted_pixels": 0},
    ]
    best, worst = evaluate.ranked_slices(rows, 2)
    assert best == [2, 1]
    assert worst == [3, 4]


def test_predict_source_keeps_every_slice_once_in_order_with_its_stored_mask():
    from rdunet_jax import datasets

    config = make_tiny_config(num_validation=21)
    source = datasets.load_source(config.data, "validation")
    predictions = [np.full((32, 32), index / 21, np.float32) for index in range(21)]
    batches = list(evaluate.predict_source(PlantedPredictor(predictions), source, config))
    assert [len(batch["metadata"]) for batch in batches] == [16, 5]
    assert [batch["images"].shape for batch in batches] == [(16, 32, 32), (5, 32, 32)]
    ids = [meta["id"] for batch in batches for meta in batch["metadata"]]
    assert ids == [source[index]["id"] for index in range(21)]
    np.testing.assert_array_equal(batches[1]["original_masks"][4], np.asarray(source[20]["mask"]))
    probabilities = np.concatenate([batch["probabilities"] for batch in batches])
    np.testing.assert_array_equal(probabilities, np.stack(predictions))


# --- steps.restore_state: the checkpoint that evaluation, prediction and export take ----------------------


def _save_checkpoints(tiny_state, workdir):
    """Best and latest at step 1, latest at step 2 (the same state)."""
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    for kind, step in (("best", 1), ("latest", 1), ("latest", 2)):
        run_checkpoints.save(kind, step, tiny_state, meta)
    run_checkpoints.close()


def _damage(state_folder, damage, tiny_state):
    if damage == "delete_data":
        shutil.rmtree(state_folder / "d")
    elif damage == "other_arrays":  # read back other than saved, as most flipped bits do, without an error
        other = state_folder.parents[3] / f"other-{state_folder.parents[1].name}"
        moved = jax.tree_util.tree_map(lambda leaf: leaf + 1, tiny_state.params)
        _save_checkpoints(tiny_state.replace(params=moved), other)
        shutil.rmtree(state_folder)
        shutil.copytree(other / "checkpoints" / "latest" / "1" / "state", state_folder)
    else:
        for path in state_folder.rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["delete_data", "truncate_files", "other_arrays"])
def test_a_damaged_best_is_read_from_latest_at_its_step_and_else_is_a_user_error_naming_the_others(
    tiny_state, tmp_path, damage, capsys
):
    _save_checkpoints(tiny_state, tmp_path)
    _damage(tmp_path / "checkpoints" / "best" / "1" / "state", damage, tiny_state)
    reason = "ChecksumMismatchError" if damage == "other_arrays" else r"\w+"
    # latest/1 holds the same state: a finished run was stuck at its evaluation with it intact.
    restored = steps.restore_state(make_tiny_config(), tmp_path)
    assert_same_training_state(restored, tiny_state)
    assert re.fullmatch(
        rf"warning: checkpoint step 1 in {re.escape(str(tmp_path / 'checkpoints' / 'best'))} is damaged "
        rf"\({reason}\); read the same step from {re.escape(str(tmp_path / 'checkpoints' / 'latest'))}\n",
        capsys.readouterr().out,
    )
    _damage(tmp_path / "checkpoints" / "latest" / "1" / "state", damage, tiny_state)
    with pytest.raises(UserError) as raised:
        steps.restore_state(make_tiny_config(), tmp_path)
    assert re.fullmatch(
        rf"checkpoint step 1 in {re.escape(str(tmp_path / 'checkpoints' / 'best'))} is damaged \({reason}\); "
        r"evaluate another with --mode=evaluate --checkpoint_step \(available: \[2\]\)",
        str(raised.value),
    )
    restored = steps.restore_state(make_tiny_config(), tmp_path, checkpoint_step=2)
    assert int(restored.step) == int(tiny_state.step)  # the undamaged one still restores
    shutil.rmtree(tmp_path / "checkpoints" / "latest" / "2")
    with pytest.raises(UserError) as raised:
        steps.restore_state(make_tiny_config(), tmp_path)
    assert re.fullmatch(
        rf"checkpoint step 1 in {re.escape(str(tmp_path / 'checkpoints' / 'best'))} is damaged \({reason}\); "
        "no other step is saved: train the run again in another --workdir",
        str(raised.value),
    )


def test_checkpoint_step_restores_that_step_of_latest_else_of_best_else_names_the_saved_steps(
    tiny_state, tmp_path, capsys
):
    # As a run leaves them: best at step 1; latest keeps its last two, steps 2 and 3. Each state's own
    # step counter tells which was read.
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    for kind, step in (("best", 1), ("latest", 2), ("latest", 3)):
        run_checkpoints.save(kind, step, tiny_state.replace(step=tiny_state.step + step), meta)
    run_checkpoints.close()
    config = make_tiny_config()
    for asked in (2, 3, 1):  # an older step of latest, the newest, one only best holds
        restored = steps.restore_state(config, tmp_path, checkpoint_step=asked)
        assert int(restored.step) == int(tiny_state.step) + asked
    assert refusal(steps.restore_state, config, tmp_path, checkpoint_step=7) == (
        f"--checkpoint_step: no checkpoint at step 7 in {tmp_path / 'checkpoints'}; "
        "available steps: [1, 2, 3]"
    )
    # eval.checkpoint=last with a damaged latest step that best also holds: read from best.
    twins = tmp_path / "twins"
    _save_checkpoints(tiny_state, twins)
    shutil.rmtree(twins / "checkpoints" / "latest" / "2")
    _damage(twins / "checkpoints" / "latest" / "1" / "state", "delete_data", tiny_state)
    config.eval.checkpoint = "last"
    assert_same_training_state(steps.restore_state(config, twins), tiny_state)
    assert capsys.readouterr().out.endswith(f"read the same step from {twins / 'checkpoints' / 'best'}\n")


@pytest.mark.parametrize(
    "failure", [MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: 2GB"), ValueError("Too many open files")]
)
def test_a_checkpoint_unread_for_want_of_memory_is_not_called_damaged(
    tiny_state, tmp_path, monkeypatch, failure
):
    # "is damaged ... evaluate another" might have had a user delete an intact best checkpoint.
    _save_checkpoints(tiny_state, tmp_path)

    def restore(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoints.RunCheckpoints, "restore", restore)
    with pytest.raises(UserError) as raised:
        steps.restore_state(make_tiny_config(), tmp_path)
    assert str(raised.value) == (
        f"cannot read checkpoint step 1 in {tmp_path / 'checkpoints' / 'best'} ({type(failure).__name__}); "
        "out of memory or file handles: free them and run again"
    )


def test_another_models_checkpoint_is_still_a_model_mismatch(tiny_state, tmp_path):
    _save_checkpoints(tiny_state, tmp_path)
    config = make_tiny_config()
    config.model.features = 8
    with pytest.raises(checkpoints.ModelMismatchError, match="model.features=4 in the checkpoint"):
        steps.restore_state(config, tmp_path)


def test_restoring_from_a_missing_workdir_creates_nothing(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*; train first"):
        steps.restore_state(make_tiny_config(), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint in .*; train first"):
        steps.restore_state(make_tiny_config(), tmp_path / "empty")
    assert list((tmp_path / "empty" / "checkpoints").iterdir()) == []


def test_restoring_a_multi_class_run_builds_its_model_with_the_configs_classes(tmp_path):
    # Self-training's pseudo-label stage restores without a model: one built for the binary head would not
    # fit a run of 2 classes (2 + 1 output channels).
    config = make_tiny_config()
    config.model.head, config.data.classes = "exclusive", ("ggo", "consolidation")
    model = models.build_model(config.model, config.data.classes)
    state = steps.create_train_state(config, model, steps_per_epoch=2)
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    run_checkpoints.save(
        "best", 1, state, {"epoch": 1, "model": checkpoints.architecture(config.model, config.data)}
    )
    run_checkpoints.close()
    restored = steps.restore_state(config, tmp_path)
    assert_same_training_state(restored, state)


@pytest.mark.parametrize(("which", "step_offset"), [("best", 0), ("last", 5)])
def test_eval_checkpoint_picks_the_best_or_the_last_checkpoint(tiny_state, tmp_path, which, step_offset):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    later = tiny_state.replace(step=tiny_state.step + 5)
    run_checkpoints.save("best", 1, tiny_state, meta)
    run_checkpoints.save("latest", 1, tiny_state, meta)
    run_checkpoints.save("latest", 2, later, meta)
    run_checkpoints.close()
    config = make_tiny_config()
    config.eval.checkpoint = which
    restored = steps.restore_state(config, tmp_path)
    assert int(restored.step) == int(tiny_state.step) + step_offset


def test_evaluate_source_counts_every_slice_once(tiny_state):
    config = make_tiny_config(num_validation=21)  # two eval batches, the second padded
    source = datasets.load_source(config.data, "validation")
    summary = evaluate.evaluate_source(inference.JaxPredictor(tiny_state), source, config)
    assert summary["num_slices"] == 21
    for key in ("dice", "jaccard", "f_score", "precision", "recall", "global_dice", "loss"):
        assert 0.0 <= summary[key] <= 1.0


class LeftHalfPredictor(inference.Predictor):
    """A stand-in model that is not mirror-symmetric: 0.8 on the left half of the columns, 0.1 on the right
    (0.45 everywhere mirrored left to right and averaged); each image's loss is its row in the batch."""

    step = 0

    def _probabilities(self, images):
        left = np.arange(images.shape[2]) < images.shape[2] // 2
        return np.broadcast_to(np.where(left, 0.8, 0.1)[None, None, :, None], images.shape).astype(np.float32)

    def _loss_and_probabilities(self, batch):
        return np.arange(len(batch["image"]), dtype=np.float32), self._probabilities(batch["image"])


def _half_and_half_records():
    """Three 32 px slices (no resize) whose expert masks are the left half, the middle half of the columns,
    and a 4 x 4 box on the right."""
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0, :, :16], masks[1, :, 8:24], masks[2, :4, 20:24] = 255, 255, 255
    return [
        {"image": np.zeros((32, 32), np.uint8), "mask": mask, "id": str(index)}
        for index, mask in enumerate(masks)
    ]


def test_the_epoch_validation_summary_by_hand_counts():
    config = make_tiny_config()
    config.eval.batch_size = 2  # two batches, the second padded
    summary = evaluate.evaluate_source(LeftHalfPredictor(), _half_and_half_records(), config)
    # Predicted: the left half (512 px) of each slice. TP, FP, FN, TN: (512, 0, 0, 512), (256, 256, 256,
    # 256), (0, 512, 16, 496).
    by_hand = {
        "num_slices": 3,
        "dice": (1 + 0.5 + 0) / 3,
        "jaccard": (1 + 1 / 3 + 0) / 3,
        "precision": (1 + 0.5 + 0) / 3,
        "recall": (1 + 0.5 + 0) / 3,
        "specificity": (1 + 0.5 + 496 / 1008) / 3,
        "global_dice": 2 * 768 / (2 * 768 + 768 + 272),
        "loss": (0 + 1 + 0) / 3,  # each batch's rows 0, 1 and 0 (the padded row's loss dropped)
    }
    assert {key: summary[key] for key in by_hand} == pytest.approx(by_hand)


@pytest.mark.parametrize("test_time_flips, dice", [(None, 0.5), (False, 0.5), (True, 0.0)])
def test_the_epoch_validation_mirrors_only_when_asked(test_time_flips, dice):
    arguments = () if test_time_flips is None else (test_time_flips,)  # None: the default
    records = _half_and_half_records()
    summary = evaluate.evaluate_source(LeftHalfPredictor(), records, make_tiny_config(), *arguments)
    assert summary["dice"] == pytest.approx(dice)  # mirrored, 0.45 everywhere: nothing predicted


RED, WHITE = (255, 0, 0), (255, 255, 255)


def _pixels_of(rgb, colour) -> np.ndarray:
    return np.all(rgb == colour, axis=-1)


@pytest.mark.parametrize("test_time_flips", [False, True])
def test_overlays_outline_the_prediction_in_red_over_the_expert_in_white(test_time_flips):
    config = make_tiny_config()
    config.eval.test_time_flips = test_time_flips  # mirrored, the stand-in predicts nothing
    overlays = evaluate.overlays_of(LeftHalfPredictor(), _half_and_half_records(), [2, 0], config)
    assert [slice_id for slice_id, _ in overlays] == ["2", "0"]
    (_, right_box), (_, left_half) = (rgb for rgb in overlays)
    assert right_box.shape == left_half.shape == (32, 32, 3)
    assert bool(_pixels_of(right_box, RED).any()) is not test_time_flips
    assert _pixels_of(right_box, WHITE).sum() == 12  # the 4 x 4 box's outline
    # Predicted exactly where the expert drew: red covers white.
    assert bool(_pixels_of(left_half, WHITE).any()) is test_time_flips
    for rgb in (right_box, left_half):  # elsewhere the slice itself: black
        assert not rgb[~_pixels_of(rgb, RED) & ~_pixels_of(rgb, WHITE)].any()


def test_validation_overlays_are_the_first_slices_up_to_num_overlays():
    config = make_tiny_config()
    config.eval.num_overlays = 2
    records = _half_and_half_records()
    ids = [
        [
            slice_id
            for slice_id, _ in evaluate.validation_overlays(LeftHalfPredictor(), records, config, count)
        ]
        for count in (None, 5, 0)
    ]
    assert ids == [["0", "1"], ["0", "1", "2"], []]


@pytest.mark.parametrize("test_time_flips", [False, True])
def test_collected_slices_are_mirrored_as_configured_with_hd95_in_pixels(test_time_flips):
    config = make_tiny_config()
    config.eval.test_time_flips = test_time_flips  # mirrored, the stand-in predicts nothing
    records = _half_and_half_records()
    collected = evaluate.collect_slices(LeftHalfPredictor(), records, config)
    predicted = np.zeros((32, 32), bool)
    predicted[:, :16] = not test_time_flips
    assert collected["unit"] == "pixels"  # the records carry no spacing
    for row, record in zip(collected["rows"], records, strict=True):
        target = record["mask"] > 0
        assert row["predicted_pixels"] == predicted.sum()
        by_hand = independent_hd95(predicted, target, (1.0, 1.0)) if predicted.any() else float("inf")
        assert row["hd95"] == pytest.approx(by_hand)


def test_a_volume_with_lesion_and_nothing_predicted_has_no_hd95_rather_than_infinity():
    config = make_tiny_config()
    config.eval.test_time_flips = True  # mirrored, the stand-in predicts nothing
    records = _half_and_half_records()
    for index, record in enumerate(records):
        record.update(case_id="a", slice_index=index)
    collected = evaluate.collect_slices(LeftHalfPredictor(), records, config)
    summary = evaluate.summarize_collected(collected, config)
    assert summary["test_time_flips"] is True
    volumes = summary["per_volume"]
    assert volumes["hd95_num_volumes"] == 0 and volumes["hd95"] is None
    assert volumes["cases"]["a"] == {
        "dice": 0.0,
        "jaccard": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "specificity": 1.0,
        "hd95": None,  # the JSON has no infinity
        "num_slices": 3,
    }


def test_the_split_summary_by_hand_counts():
    config = make_tiny_config()
    config.eval.batch_size = 5
    records = _half_and_half_records()
    for expert in (np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)):
        records.append({"image": np.zeros((32, 32), np.uint8), "mask": expert, "id": str(len(records))})
    records[-1]["mask"][31, 31] = 255  # one pixel of lesion
    collected = evaluate.collect_slices(LeftHalfPredictor(), records, config)
    summary = evaluate.summarize_collected(collected, config)
    predicted = np.zeros((32, 32), bool)
    predicted[:, :16] = True
    finite = [independent_hd95(predicted, record["mask"] > 0, (1.0, 1.0)) for record in records[:3]]
    finite.append(independent_hd95(predicted, records[4]["mask"] > 0, (1.0, 1.0)))
    assert summary["loss"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)  # each image's row in its batch
    assert summary["hd95"] == pytest.approx(np.mean(finite))  # the empty expert mask's slice counted apart
    assert summary["num_slices_with_lesion"] == 4  # the one-pixel lesion counts, the empty slice not
    assert (summary["image_size"], summary["test_time_flips"]) == (32, False)
    assert summary["conventions"] == reports.CONVENTIONS
    # Stored at the model's size, the stored-size figures are the same.
    assert summary["original_resolution"]["dice"] == pytest.approx(summary["dice"])


def test_slice_metadata_scales_the_stored_spacing_in_float64_and_says_none_without_one():
    record = {
        "image": np.zeros((64, 96), np.float32),
        "mask": None,
        "id": 7,
        "case_id": "a",
        "slice_index": 3,
    }
    assert evaluate.slice_metadata(record, 32) == {
        "id": "7",
        "case_id": "a",
        "slice_index": 3,
        "pixel_spacing": None,
        "slice_spacing": None,
    }
    record["spacing"] = np.array([0.7, 0.8, 5.0], np.float32)  # as stored; scaled by 64 / 32 and 96 / 32
    meta = evaluate.slice_metadata(record, 32)
    # In Python floats (float64) from the stored float32 values: float32 arithmetic would give 2.4000000954.
    assert meta["pixel_spacing"] == (float(np.float32(0.7)) * 2, float(np.float32(0.8)) * 3)
    assert meta["slice_spacing"] == 5.0


def test_written_overlays_are_the_best_and_worst_with_file_safe_names_replacing_old_ones(tmp_path):
    config = make_tiny_config()
    config.eval.num_overlays = 1
    records = _half_and_half_records()
    for record, slice_id in zip(records, ("Case 1/a", "b:2", "x y.Z-9_q"), strict=True):
        record["id"] = slice_id
    # Dice 1, 0.5 and 0 (the counts of the left-half prediction against each expert mask).
    rows = [
        {"tp": 512, "fp": 0, "fn": 0, "lesion_pixels": 512, "predicted_pixels": 512},
        {"tp": 256, "fp": 256, "fn": 256, "lesion_pixels": 512, "predicted_pixels": 512},
        {"tp": 0, "fp": 512, "fn": 16, "lesion_pixels": 16, "predicted_pixels": 512},
    ]
    folder = tmp_path / "overlays"
    folder.mkdir()
    (folder / "best_01_stale.png").write_bytes(b"")
    written = evaluate.write_overlays(LeftHalfPredictor(), records, rows, config, folder)
    expected = [folder / "best_01_Case_1_a.png", folder / "worst_01_x_y.Z-9_q.png"]
    assert written == expected and sorted(folder.iterdir()) == expected


def test_a_subset_keeps_its_sources_name_and_split():
    class Named(list):
        name, split = "semiseg", "validation"

    subset = evaluate._subset(Named([{"id": "a"}, {"id": "b"}]), [1])
    assert (subset.name, subset.split, subset[0]) == ("semiseg", "validation", {"id": "b"})
    plain = evaluate._subset([{"id": "a"}], [0])
    assert (plain.name, plain.split) == ("", "")


def test_a_one_slice_volume_has_the_3d_hd95_of_its_slice_in_mm():
    # 30 px (a model of depth 1 allows it): 900 pixels pack into 113 bytes, 4 bits of padding.
    prediction, target = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    prediction[4:10, 4:10], target[6:14, 5:9] = True, True
    meta = {"slice_index": 7, "pixel_spacing": (0.7, 1.3), "slice_spacing": 5.0}
    packed = [(meta, np.packbits(prediction), np.packbits(target))]
    expected = independent_hd95(prediction[..., None], target[..., None], (0.7, 1.3, 5.0))
    assert evaluate._volume_hd95(packed, 30, "mm") == pytest.approx(expected)


def test_evaluate_workdir_scores_the_asked_checkpoint_and_writes_its_metrics(tiny_state, tmp_path, capsys):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    later = tiny_state.replace(step=tiny_state.step + 5)
    run_checkpoints.save("best", 1, tiny_state, meta)
    run_checkpoints.save("latest", 2, later, meta)
    run_checkpoints.close()
    config = make_tiny_config()
    config.eval.split = "validation"  # eval.checkpoint is best; step 2 is asked for
    summary = evaluate.evaluate_workdir(config, tmp_path, checkpoint_step=2)
    assert (summary["step"], summary["split"], summary["threshold"]) == (
        int(tiny_state.step) + 5,
        "validation",
        0.5,
    )
    assert summary["num_slices"] == len(datasets.load_source(config.data, "validation"))
    assert json.loads((tmp_path / "metrics" / "validation.json").read_text()) == summary
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"validation: dice {summary['dice']:.4f} ")


def test_the_default_split_is_the_test_split_when_present_else_validation(tmp_path):
    # Issue 27's one command scores the held-out COVID-SemiSeg test split when a user has it, and the
    # validation split of the public training release otherwise.
    from helpers import data_config, make_semiseg, save_png

    config = make_tiny_config()
    config.data = data_config(tmp_path / "without", "semiseg", make_semiseg(tmp_path / "semiseg"))
    assert config.eval.split == "test" and evaluate.default_split(config) == "validation"
    testing = tmp_path / "semiseg" / "Dataset" / "TestingSet"
    for folder in ("LungInfection-Test/Imgs", "LungInfection-Test/GT", "MultiClassInfection-Test/GT"):
        save_png(testing / folder / "100.png", np.zeros((24, 20), np.uint8))
    config.data = data_config(tmp_path / "with", "semiseg", tmp_path / "semiseg")
    assert evaluate.default_split(config) == "test"
    config.eval.split = "validation"  # an explicit choice is kept
    assert evaluate.default_split(config) == "validation"


def test_an_evaluation_that_falls_back_to_validation_says_so(tmp_path, monkeypatch, capsys):
    from helpers import data_config, make_semiseg, save_png

    scored = []
    summary = {
        "dice": 0.5,
        "jaccard": 0.25,
        "f_score": 0.5,
        "global_dice": 0.5,
        "hd95": None,
        "num_slices": 2,
    }
    monkeypatch.setattr(evaluate.inference, "build_model", lambda config: None)
    monkeypatch.setattr(evaluate.steps, "restore_state", lambda config, workdir, step, model: None)
    monkeypatch.setattr(evaluate.predictors, "for_config", lambda config, model, state: None)
    monkeypatch.setattr(evaluate, "evaluate_state", lambda p, c, w, split: scored.append(split) or summary)
    config = make_tiny_config()
    manual_dir = make_semiseg(tmp_path / "semiseg")
    config.data = data_config(tmp_path / "without", "semiseg", manual_dir)
    evaluate.evaluate_workdir(config, tmp_path / "run")
    notice = (
        f"eval.split=test: data.name='semiseg' has no test split in {manual_dir}; "
        "scoring the validation split instead"
    )
    lines = capsys.readouterr().out.splitlines()  # after the dataset preparation's lines
    assert scored == ["validation"]
    assert lines[-2] == notice and lines[-1].startswith("validation: dice 0.5000 ")
    # With the held-out test split present, the test split is scored and nothing is said.
    testing = manual_dir / "Dataset" / "TestingSet"
    for folder in ("LungInfection-Test/Imgs", "LungInfection-Test/GT", "MultiClassInfection-Test/GT"):
        save_png(testing / folder / "100.png", np.zeros((24, 20), np.uint8))
    config.data = data_config(tmp_path / "with", "semiseg", manual_dir)
    evaluate.evaluate_workdir(config, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert scored[-1] == "test" and lines[-1].startswith("test: dice 0.5000 ")
    assert not any(line.startswith("eval.split") for line in lines)
    # An explicit validation split is not a fallback.
    config.eval.split = "validation"
    evaluate.evaluate_workdir(config, tmp_path / "run")
    assert capsys.readouterr().out.splitlines() == [
        f"validation: dice 0.5000 jaccard 0.2500 f_score 0.5000 global_dice 0.5000 hd95 n/a (2 slices) -> "
        f"{tmp_path / 'run' / 'metrics' / 'validation'}.json"
    ]
    summary.update(hd95=3.14159, hd95_unit="mm")
    evaluate.evaluate_workdir(config, tmp_path / "run")
    assert " hd95 3.14 mm (2 slices) -> " in capsys.readouterr().out
    # A dataset without a manual directory and without a test split is named as such.
    monkeypatch.setattr(evaluate.datasets, "has_split", lambda data, split: False)
    synthetic = make_tiny_config()
    evaluate.evaluate_workdir(synthetic, tmp_path / "run")
    assert capsys.readouterr().out.splitlines()[0] == (
        "eval.split=test: data.name='synthetic' has no test split in its data; "
        "scoring the validation split instead"
    )


def test_a_train_full_run_is_scored_only_on_the_test_split(tmp_path, monkeypatch):
    config = make_tiny_config()
    config.data.train_split, config.eval.checkpoint = "train_full", "last"
    has_test = {"test": False}
    monkeypatch.setattr(datasets, "has_split", lambda data, split: has_test[split])
    message = (
        "eval.split: data.train_split=train_full trains on the validation slices, so scoring them would "
        "report training Dice; score the test split (Dataset/TestingSet in data.manual_dir) or train with "
        "data.train_split=train"
    )
    for split in ("test", "validation"):  # the test split absent (falls back), or validation asked for
        config.eval.split = split
        with pytest.raises(UserError) as error:
            evaluate.default_split(config)
        assert str(error.value) == message
    has_test["test"] = True
    config.eval.split = "test"
    assert evaluate.default_split(config) == "test"
    config.data.train_split, config.eval.split = "train", "validation"
    assert evaluate.default_split(config) == "validation"
