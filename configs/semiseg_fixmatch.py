"""FixMatch on COVID-SemiSeg (issue #27's second consistency-regularisation alternative):
configs/semiseg.py's recipe with one of the release's 1,600 unlabelled slices on top of its 4 labelled
ones a step, learnt from through the model's own confident pseudo-labels of it (rdunet_jax/fixmatch.py):

    python -m rdunet_jax.main --config configs/semiseg_fixmatch.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

One fold of the cross-validation (the pool is used in every fold, never the held-out fold's labels; all
five: experiments/fixmatch_cv_runs.txt):

    python -m rdunet_jax.main --config configs/semiseg_fixmatch.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/fixmatch-cv0 \\
        --config.data.cv_folds=5 --config.data.cv_fold=0 --config.eval.split=validation

Built on 2026-12-02: every setting below was fixed before any run on the real slices (FixMatch's weight 1
and confidence 0.95; its 7 unlabelled images per labelled one are not used: 1 unlabelled slice per 4
labelled, as self-training's student mixes its pseudo-labelled slices). Cross-validated on the 5 folds
on a 2-core CPU (about an hour a fold): 0.717 held-out Dice against the plain recipe's 0.743, -0.026
[-0.047, -0.007] per slice, worse on 4 of the 5 folds (experiments/results/recipe/selftrain-small.md).
Kept as the second consistency baseline.
"""

import pathlib

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """The semiseg recipe with FixMatch on the unlabelled pool."""
    config = config_lib.config_module(pathlib.Path(__file__).with_name("semiseg.py")).get_config(variant)
    config.name = f"{config.model.variant}-semiseg-fixmatch"
    config.consistency.method = "fixmatch"
    # As self-training's student: the unlabelled slice comes on top of the recipe's 4 labelled slices a
    # step (batch 5, a fifth unlabelled), for the recipe's 300 epochs and schedule, and the pool's wider
    # display window is matched to the labelled slices' first (`window`).
    config.batch_size = 5
    config.data.unlabelled_fraction = 0.2
    config.data.unlabelled_intensity_matching = "window"
    # The unlabelled row carries weight 0, which only the weighted form of the recipe's Dice loss reads;
    # the supervised term is the mean over the 5 rows, 4/5 of the labelled rows' mean (so against that,
    # the consistency weight is 1.25).
    config.loss = "dice_weighted"
    # FixMatch's weight 1 and confidence 0.95. Its strong view here, of the unlabelled slice only:
    # contrast x0.7-1.3 and brightness +-0.15 (3 times the student's jitter), plus Gaussian noise 0.05
    # (mean teacher's), intensity only so the pseudo-label stays aligned (FixMatch's RandAugment and
    # Cutout would move or hide lesions). A ramp-up over the first 20 epochs, since the untrained model's
    # confident pixels are background nearly everywhere.
    config.consistency.weight = 1.0
    config.consistency.confidence_threshold = 0.95
    config.consistency.strong_intensity_range = 0.3
    config.consistency.noise_std = 0.05
    config.consistency.rampup_epochs = 20
    # Saved and validated every 10th epoch, scored with the last checkpoint, as configs/semiseg_selftrain.py.
    config.checkpoint_every_epochs = 10
    config.eval.validate_every_epochs = 10
    return config
