"""experiments.selftrain_cv: each fold's student against its own teacher and the recipe's record, by hand."""

import json

import pytest

from experiments import cv_table, selftrain_cv


def _stage(folder, fold: int, slice_dice: dict, epoch_seconds: tuple):
    (folder / "metrics").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"data": {"cv_fold": fold}}))
    (folder / "metrics" / "validation_slices.csv").write_text(
        "id,dice\n" + "".join(f"{slice_id},{dice}\n" for slice_id, dice in slice_dice.items())
    )
    (folder / "train_log.jsonl").write_text("".join(json.dumps({"seconds": s}) + "\n" for s in epoch_seconds))


@pytest.fixture
def workdirs(tmp_path, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    for fold, dice in ((0, {"a": 0.5, "b": 0.7}), (1, {"c": 0.6})):
        record = {"slices": {"id": list(dice), "dice": list(dice.values())}}
        (records / f"{cv_table.RECIPE_ARM}-fold{fold}-seed0.json").write_text(json.dumps(record))
    monkeypatch.setattr(cv_table, "RECORDS", records)
    fold0, fold1, unfinished = tmp_path / "st-cv0", tmp_path / "st-cv1", tmp_path / "st-cv2"
    _stage(fold0 / "teacher", 0, {"a": 0.6, "b": 0.6}, (60, 60))
    _stage(fold0 / "student1", 0, {"a": 0.9, "b": 0.7}, (120, 120, 60))
    _stage(fold1 / "teacher", 1, {"c": 0.8}, (60,))
    _stage(fold1 / "student1", 1, {"c": 0.7}, (60,))
    _stage(unfinished / "teacher", 2, {"d": 0.1}, (60,))  # its student never finished
    return [fold0, fold1, unfinished]


def test_each_fold_row_pairs_the_student_with_its_teacher_and_the_record(workdirs, capsys):
    assert selftrain_cv.main([str(path) for path in workdirs]) == 0
    out = capsys.readouterr()
    assert "skipped" in out.err and "st-cv2" in out.err
    lines = out.out.splitlines()
    # fold 0: record (0.5 + 0.7) / 2, teacher 0.6, student 0.8; 2 + 5 training minutes.
    assert "| 0 | 0.600 | 0.600 | 0.800 | +0.200 | +0.200 | 2 + 5 |" in lines
    assert "| 1 | 0.600 | 0.800 | 0.700 | -0.100 | +0.100 | 1 + 1 |" in lines
    # Pooled per slice: student - teacher +0.3, +0.1, -0.1 (mean 0.1); - record +0.4, 0, +0.1.
    teacher_line = next(line for line in lines if line.startswith("Student - teacher"))
    record_line = next(line for line in lines if line.startswith("Student - recipe"))
    assert "over 3 held-out slices: 0.1000 [" in teacher_line
    assert "over 3 held-out slices: 0.1667 [" in record_line
