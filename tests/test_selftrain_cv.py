"""experiments.selftrain_cv: each fold's student against its own teacher and the recipe's record, by hand."""

import json

import numpy as np
import pytest
from helpers import recipe_records

from experiments import ensemble_cv, selftrain_cv


def _stage(folder, fold: int, slice_dice: dict, epoch_seconds: tuple, num_epochs: int | None = None):
    """A scored stage that logged one epoch a second count, of `num_epochs` (default: all of them)."""
    (folder / "metrics").mkdir(parents=True)
    scoring = {"threshold": 0.5, "test_time_flips": True, "checkpoint": "last"}
    data = {"cv_fold": fold, "image_size": 128}  # scored as the recipe's record was
    config = {"data": data, "eval": scoring, "num_epochs": num_epochs or len(epoch_seconds)}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics" / "validation_slices.csv").write_text(
        "id,dice\n" + "".join(f"{slice_id},{dice}\n" for slice_id, dice in slice_dice.items())
    )
    log = [{"epoch": epoch, "seconds": s} for epoch, s in enumerate(epoch_seconds, start=1)]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))


def _assert_paired_differences(lines, expected: dict) -> None:
    """Each "<compared> - <reference>" line of the table gives the expected mean and interval over the 3
    slices. The 95% percentile bootstrap of 3 values is [their min, their max]: 1 resample in 27 is the
    smallest value thrice, more than the 2.5% tail, so the bounds tell a mis-pairing the mean cannot."""
    for prefix, value in expected.items():
        line = next(line for line in lines if line.startswith(prefix))
        assert f"over 3 held-out slices: {value} (95% bootstrap)" in line, line


@pytest.fixture
def workdirs(tmp_path, monkeypatch):
    recipe_records(tmp_path / "records", monkeypatch, {0: {"a": 0.5, "b": 0.7}, 1: {"c": 0.6}})
    fold0, fold1, unfinished = tmp_path / "st-cv0", tmp_path / "st-cv1", tmp_path / "st-cv2"
    _stage(fold0 / "teacher", 0, {"a": 0.6, "b": 0.6}, (60, 60))
    _stage(fold0 / "student1", 0, {"a": 0.9, "b": 0.7}, (120, 120, 60))
    _stage(fold1 / "teacher", 1, {"c": 0.8}, (60,))
    _stage(fold1 / "student1", 1, {"c": 0.7}, (60,))
    _stage(unfinished / "teacher", 2, {"d": 0.1}, (60,))  # its student never finished
    return [fold1, fold0, unfinished]


def test_each_fold_row_pairs_the_student_with_its_teacher_and_the_record(workdirs, capsys):
    assert selftrain_cv.main([str(path) for path in workdirs]) == 0
    out = capsys.readouterr()
    assert "skipped" in out.err and "st-cv2" in out.err
    lines = out.out.splitlines()
    # fold 0: record (0.5 + 0.7) / 2, teacher 0.6, student 0.8; 2 + 5 training minutes. Rows by fold.
    assert lines[2] == "| 0 | 0.600 | 0.600 | 0.800 | +0.200 | +0.200 | 2 + 5 |"
    assert lines[3] == "| 1 | 0.600 | 0.800 | 0.700 | -0.100 | +0.100 | 1 + 1 |"
    # Pooled over the 3 slices, and over the fold means (teacher 0.6, 0.8; the record's 0.6 twice).
    assert any(line.startswith("| teachers | 0.667 [") and "| 0.700 [" in line for line in lines)
    assert any(line.startswith("| students | 0.767 [") and "| 0.750 [" in line for line in lines)
    assert "| recipe record | 0.600 [0.500, 0.700] | 0.600 [0.600, 0.600] |" in lines
    # Per slice: student - teacher +0.3, +0.1, -0.1; - record +0.4, 0, +0.1; teacher - record +0.1, -0.1,
    # +0.2.
    expected = {
        "Student - teacher": "0.1000 [-0.1000, 0.3000]",
        "Student - recipe": "0.1667 [0.0000, 0.4000]",
        "Teacher - recipe": "0.0667 [-0.1000, 0.2000]",
    }
    _assert_paired_differences(lines, expected)


def test_a_fold_twice_or_on_other_slices_is_refused(workdirs, tmp_path, capsys):
    again = tmp_path / "again-cv0"
    for stage in ("teacher", "student1"):
        _stage(again / stage, 0, {"a": 0.1, "b": 0.1}, (60,))
    assert selftrain_cv.main([str(workdirs[1]), str(again)]) == 2
    assert f"{again}: fold 0 again (also in {workdirs[1]})" in capsys.readouterr().err
    other = tmp_path / "other-cv1"
    _stage(other / "teacher", 1, {"c": 0.8}, (60,))
    _stage(other / "student1", 1, {"z": 0.8}, (60,))  # another cv_seed cut another fold
    assert selftrain_cv.main([str(other)]) == 2
    error = capsys.readouterr().err
    assert f"{other} (student), fold 1: scored 1 slices, the recipe's record 1, 2 not in both" in error
    # Scored otherwise than the record (at 256 px, without the flips): another measurement of the slices.
    larger = tmp_path / "larger-cv1"
    _stage(larger / "teacher", 1, {"c": 0.8}, (60,))
    _stage(larger / "student1", 1, {"c": 0.8}, (60,))
    config = json.loads((larger / "student1" / "config.json").read_text())
    config["data"]["image_size"], config["eval"]["test_time_flips"] = 256, False
    (larger / "student1" / "config.json").write_text(json.dumps(config))
    assert selftrain_cv.main([str(larger)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{larger / 'student1'}, fold 1: scored otherwise than the recipe's record: data.image_size=256 "
            "(the record's 128), eval.test_time_flips=False (the record's True)"
        )
    )
    swapped = tmp_path / "swapped-cv1"
    _stage(swapped / "teacher", 1, {"z": 0.8}, (60,))  # the teacher on other slices, the student not
    _stage(swapped / "student1", 1, {"c": 0.8}, (60,))
    assert selftrain_cv.main([str(swapped)]) == 2
    error = capsys.readouterr().err
    assert f"{swapped} (teacher), fold 1: scored 1 slices, the recipe's record 1, 2 not in both" in error


def test_the_teacher_and_student_together_are_their_mean_probability_thresholded(
    workdirs, monkeypatch, capsys
):
    ids = {0: ["a", "b"], 1: ["c"]}
    masks = {0: [[[1, 1], [0, 0]], [[0, 1], [1, 1]]], 1: [[[1, 0], [0, 0]]]}
    probabilities = {
        ("st-cv0", "teacher"): [[[0.9, 0.2], [0.1, 0.1]], [[0.1, 0.8], [0.8, 0.2]]],
        ("st-cv0", "student1"): [[[0.5, 0.9], [0.3, 0.1]], [[0.8, 0.6], [0.3, 0.4]]],
        ("st-cv1", "teacher"): [[[0.6, 0.6], [0.0, 0.0]]],
        ("st-cv1", "student1"): [[[0.2, 0.2], [0.0, 0.0]]],
    }

    def fold_predictions(config, workdir):
        fold = config.data.cv_fold
        stage = (workdir.parent.name, workdir.name)
        return ids[fold], np.array(probabilities[stage], np.float32), np.array(masks[fold], np.uint8)

    monkeypatch.setattr(ensemble_cv, "fold_predictions", fold_predictions)
    for workdir in workdirs[:2]:
        for stage in ("teacher", "student1"):
            (workdir / stage / "checkpoints" / "latest").mkdir(parents=True)
    slices_csv = workdirs[0].parent / "slices.csv"
    assert (
        selftrain_cv.main(["--ensemble", "--slices_csv", str(slices_csv)] + [str(p) for p in workdirs[:2]])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    # Every held-out slice's Dice of each model, as the paired differences below imply them.
    assert slices_csv.read_text().splitlines() == [
        "fold,id,recipe,teacher,student,ensemble",
        "0,a,0.500000,0.600000,0.900000,1.000000",
        "0,b,0.700000,0.600000,0.700000,0.800000",
        "1,c,0.600000,0.800000,0.700000,0.000000",
    ]
    # The means, thresholded at 0.5: a [[0.7, 0.55], [0.2, 0.1]] -> Dice 1; b [[0.45, 0.7], [0.55, 0.3]]
    # -> 2 x 2 / (2 + 3) = 0.8; c [[0.4, 0.4], [0, 0]] -> nothing predicted, Dice 0.
    assert lines[2] == "| 0 | 0.600 | 0.600 | 0.800 | 0.900 | +0.200 | +0.200 | 2 + 5 |"
    assert lines[3] == "| 1 | 0.600 | 0.800 | 0.700 | 0.000 | -0.100 | +0.100 | 1 + 1 |"
    assert any(line.startswith("| teacher + student | 0.600 [") and "| 0.450 [" in line for line in lines)
    # Per slice: - student +0.1, +0.1, -0.7; - teacher +0.4, +0.2, -0.8; - record +0.5, +0.1, -0.6.
    expected = {
        "Teacher + student - student": "-0.1667 [-0.7000, 0.1000]",
        "Teacher + student - teacher": "-0.0667 [-0.8000, 0.4000]",
        "Teacher + student - recipe": "0.0000 [-0.6000, 0.5000]",
    }
    _assert_paired_differences(lines, expected)


def test_an_ensemble_without_checkpoints_is_refused_naming_the_stage(workdirs, capsys):
    assert selftrain_cv.main(["--ensemble", str(workdirs[0])]) == 2
    assert f"{workdirs[0] / 'teacher'}: no checkpoint to ensemble" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stage, setting, value, message",
    [
        ("student1", "threshold", 0.4, "the teacher and the student are thresholded differently"),
        (
            "teacher",
            "test_time_flips",
            False,
            "scored with eval.test_time_flips=False, eval.checkpoint='last'",
        ),
        ("student1", "checkpoint", "best", "scored with eval.test_time_flips=True, eval.checkpoint='best'"),
    ],
)
def test_an_ensemble_of_stages_scored_otherwise_is_refused(workdirs, capsys, stage, setting, value, message):
    for name in ("teacher", "student1"):
        (workdirs[1] / name / "checkpoints" / "latest").mkdir(parents=True)
    config_file = workdirs[1] / stage / "config.json"
    config = json.loads(config_file.read_text())
    config["eval"][setting] = value
    config_file.write_text(json.dumps(config))
    assert selftrain_cv.main(["--ensemble", str(workdirs[1])]) == 2
    assert message in capsys.readouterr().err


def test_an_ensemble_whose_stages_scored_other_slices_is_refused(workdirs, monkeypatch, capsys):
    def fold_predictions(config, workdir):
        ids = ["a", "b"] if workdir.name == "teacher" else ["b", "a"]
        return ids, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8)

    monkeypatch.setattr(ensemble_cv, "fold_predictions", fold_predictions)
    for name in ("teacher", "student1"):
        (workdirs[1] / name / "checkpoints" / "latest").mkdir(parents=True)
    assert selftrain_cv.main(["--ensemble", str(workdirs[1])]) == 2
    assert f"{workdirs[1]}: the teacher and the student scored other slices" in capsys.readouterr().err


def test_the_student_of_the_last_round_trained_to_its_last_epoch_is_the_one_scored(workdirs, capsys):
    # Fold 1 ran two rounds: student 2 (Dice 0.2 on slice c) is the recipe's result, not student 1.
    _stage(workdirs[0] / "student2", 1, {"c": 0.2}, (60, 60))
    # Fold 2's student was evaluated halfway through its 3 epochs: skipped, not counted.
    _stage(workdirs[2] / "student1", 2, {"d": 0.9}, (60,), num_epochs=3)
    assert selftrain_cv.main([str(path) for path in workdirs]) == 0
    out = capsys.readouterr()
    assert (
        f"(skipped {workdirs[2]}: student1 not trained to its last epoch and scored on the validation"
        in out.err
    )
    lines = out.out.splitlines()
    assert lines[3] == "| 1 | 0.600 | 0.800 | 0.200 | -0.600 | -0.400 | 1 + 2 |"
    assert len([line for line in lines if line.startswith("| 2 |")]) == 0


def test_missing_files_and_no_finished_workdir_are_one_line_errors(workdirs, capsys):
    (workdirs[1] / "teacher" / "train_log.jsonl").unlink()
    assert selftrain_cv.main([str(workdirs[1])]) == 2
    assert capsys.readouterr().err == f"error: {workdirs[1] / 'teacher' / 'train_log.jsonl'}: missing\n"
    (workdirs[1] / "teacher" / "metrics" / "validation_slices.csv").unlink()
    assert selftrain_cv.main([str(workdirs[1])]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {workdirs[1] / 'teacher' / 'metrics' / 'validation_slices.csv'}: missing\n"
    )
    assert selftrain_cv.main([str(workdirs[2])]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: no workdir holds a student trained to its last epoch and scored on validation"
    )
