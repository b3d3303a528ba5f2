"""experiments.best_epoch_optimism against a hand-made log."""

import json

import pytest

from experiments import best_epoch_optimism


def test_the_lowest_loss_epochs_dice_minus_the_last_ones_within_each_horizon(tmp_path):
    # By hand: within 40 epochs the lowest loss is epoch 20 (Dice 0.70), the last validated epoch 30 (0.65):
    # +0.05; over 300 the lowest is the last, epoch 50: 0. Epoch 40 was not validated.
    log = [
        {"epoch": 10, "val_loss": 0.5, "val_dice": 0.60},
        {"epoch": 20, "val_loss": 0.4, "val_dice": 0.70},
        {"epoch": 30, "val_loss": 0.45, "val_dice": 0.65},
        {"epoch": 40, "loss": 0.3},
        {"epoch": 50, "val_loss": 0.3, "val_dice": 0.80},
    ]
    stage = tmp_path / "teacher"
    stage.mkdir()
    (stage / "train_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    report = best_epoch_optimism.main([str(stage), str(stage)])
    assert report[40] == pytest.approx((0.05, 0.05, 0.05))
    assert report[300] == pytest.approx((0.0, 0.0, 0.0))
