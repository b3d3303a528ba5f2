"""Metrics against hand-computed values, including the empty-mask rules."""

import numpy as np
import pytest

from rdunet_jax import metrics


def _masks(rows):
    return np.array(rows, dtype=np.uint8)


def test_confusion_counts_per_slice():
    prediction = np.array([_masks([[1, 1], [0, 0]]), _masks([[0, 0], [0, 0]])])
    target = np.array([_masks([[1, 0], [1, 0]]), _masks([[0, 0], [0, 1]])])
    tp, fp, fn, tn = metrics.confusion_counts(prediction, target)
    np.testing.assert_array_equal(tp, [1, 0])
    np.testing.assert_array_equal(fp, [1, 0])
    np.testing.assert_array_equal(fn, [1, 1])
    np.testing.assert_array_equal(tn, [1, 3])


def test_slice_metrics_hand_computed():
    # TP=3, FP=1, FN=2, TN=4
    result = metrics.slice_metrics([3], [1], [2], [4])
    assert result["dice"][0] == pytest.approx(6 / 9)
    assert result["jaccard"][0] == pytest.approx(3 / 6)
    assert result["precision"][0] == pytest.approx(3 / 4)
    assert result["recall"][0] == pytest.approx(3 / 5)
    assert result["specificity"][0] == pytest.approx(4 / 5)


def test_both_empty_scores_one_and_one_empty_scores_zero():
    # slice 0: mask and prediction empty; slice 1: lesion missed; slice 2: false alarm
    result = metrics.slice_metrics([0, 0, 0], [0, 0, 5], [0, 4, 0])
    for name in ("dice", "jaccard", "precision", "recall"):
        assert result[name][0] == 1.0
    assert result["dice"][1] == 0.0 and result["recall"][1] == 0.0 and result["precision"][1] == 0.0
    assert result["dice"][2] == 0.0 and result["precision"][2] == 0.0 and result["recall"][2] == 0.0


def test_summary_means_f_score_and_pooled_values():
    # slice A: TP=8 FP=0 FN=0 (perfect); slice B: TP=1 FP=1 FN=2
    summary = metrics.summarize([8, 1], [0, 1], [0, 2], [10, 10])
    assert summary["num_slices"] == 2
    assert summary["dice"] == pytest.approx((1.0 + 2 / 5) / 2)
    assert summary["jaccard"] == pytest.approx((1.0 + 1 / 4) / 2)
    precision, recall = (1.0 + 1 / 2) / 2, (1.0 + 1 / 3) / 2
    assert summary["precision"] == pytest.approx(precision)
    assert summary["recall"] == pytest.approx(recall)
    assert summary["f_score"] == pytest.approx(2 * precision * recall / (precision + recall))
    # The F-score is not mean Dice: the paper's formula would have repeated Dice.
    assert summary["f_score"] != pytest.approx(summary["dice"])
    assert summary["global_dice"] == pytest.approx(2 * 9 / (2 * 9 + 1 + 2))
    assert summary["dice_std"] == pytest.approx(np.std([1.0, 0.4]))
