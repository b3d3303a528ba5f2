"""The Residual Dilated U-net on COVID-SemiSeg (MedSeg's 50 training slices; `semiseg`).

Trains on the release's train.txt (45 slices), validates on val.txt (5), and evaluates on the 48-slice
testing set when Dataset/TestingSet is present (else on validation):

    python -m rdunet_jax.main --config configs/semiseg.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

The part after ':' picks one of the paper's model variants (default rdunet), as in configs/rdunet.py.

Tune the recipe by cross-validation over the 50 labelled slices, never on the test split: fold k of 5
(a seeded permutation of slice ids, the same folds as experiments/run_study.py) is held out and evaluated:

    for k in 0 1 2 3 4; do python -m rdunet_jax.main --config configs/semiseg.py \
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/semiseg-cv$k \
        --config.data.cv_folds=5 --config.data.cv_fold=$k --config.eval.split=validation; done

The cross-validated Dice is the mean of the five runs' metrics/validation.json `dice` (the mean per-slice
Dice, the measure of the published COVID-SemiSeg results).
"""

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """The paper's training recipe on semiseg with model variant `variant`."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant or "rdunet")
    config.name = f"{config.model.variant}-semiseg"
    config.data.name = "semiseg"
    config.data.image_size = 256
    config.eval.split = "test"
    return config
