"""experiments.ensemble_cv: ensemble Dice against hand-computed values, its table, and its errors."""

import numpy as np

from experiments import ensemble_cv


def test_the_ensemble_averages_probabilities_before_thresholding():
    masks = np.array([[[1.0, 0.0]]])  # one 1x2 slice, lesion on the left pixel
    confident = np.array([[[0.9, 0.6]]])  # alone: both pixels, Dice 2 / (2 + 1)
    doubtful = np.array([[[0.3, 0.2]]])  # alone: nothing, Dice 0
    np.testing.assert_allclose(ensemble_cv.ensemble_slice_dice([confident], masks, 0.5), [2 / 3])
    np.testing.assert_allclose(ensemble_cv.ensemble_slice_dice([doubtful], masks, 0.5), [0.0])
    # Mean (0.6, 0.4): exactly the lesion.
    np.testing.assert_allclose(ensemble_cv.ensemble_slice_dice([confident, doubtful], masks, 0.5), [1.0])


def test_original_resolution_scores_the_mean_resized_to_each_stored_mask():
    # Mean of the members: left column 0.8, right 0.2; resized to 2x4 the left two columns stay >= 0.5.
    first = np.array([[[1.0, 0.4], [1.0, 0.4]]])
    second = np.array([[[0.6, 0.0], [0.6, 0.0]]])
    stored = np.zeros((2, 4))
    stored[:, :3] = 1  # 6 lesion pixels, 4 predicted: Dice 8 / 10
    dice = ensemble_cv.ensemble_slice_dice([first, second], [stored], 0.5)
    np.testing.assert_allclose(dice, [0.8])
    # The same slice stored at the model's size is scored without resizing.
    at_model_size = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    np.testing.assert_allclose(ensemble_cv.ensemble_slice_dice([first, second], at_model_size, 0.5), [1.0])


def test_the_table_pairs_each_ensemble_with_its_first_member():
    scores = {
        ("a", "b"): {
            "folds": [0.7, 0.8],
            "slices": {"s1": [0.6], "s2": [0.9]},
            "first_member": {"s1": [0.5], "s2": [0.7]},
        }
    }
    table = ensemble_cv.markdown_table(scores)
    assert table[0].startswith("| Ensemble | fold0 | fold1 | mean [95% CI] |")
    # t-interval of (0.7, 0.8): 0.75 +- 12.706 * 0.05; per-slice differences 0.1 and 0.2, mean 0.15.
    assert table[2].startswith("| a + b | 0.700 | 0.800 | 0.750 [0.115, 1.385] | 0.1500 [0.1000, 0.2000] |")


def test_unknown_arms_and_untrained_members_are_one_line_errors(tmp_path, capsys):
    roots = ["--data_root", str(tmp_path / "data"), "--runs_root", str(tmp_path / "runs")]
    assert ensemble_cv.main(["--ensemble", "r128_e200_dropout0,r999", *roots]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --ensemble: r999 is not an arm of the recipe study; choose from [")
    assert ensemble_cv.main(["--ensemble", "r128_e200_dropout0,r128_e200", *roots]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.startswith("error: --ensemble: r128_e200_dropout0 fold 0 has no checkpoint in ")
    assert error.endswith("python -m experiments.run_study recipe --arms r128_e200_dropout0")
