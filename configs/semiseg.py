"""The Residual Dilated U-net on COVID-SemiSeg (MedSeg's 50 training slices; `semiseg`).

Trains on the release's train.txt (45 slices), validates on val.txt (5), and evaluates on the 48-slice
testing set when Dataset/TestingSet is present (else on validation):

    python -m rdunet_jax.main --config configs/semiseg.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

The part after ':' picks one of the paper's model variants (default rdunet), as in configs/rdunet.py.

The recipe is `RECIPE_CANDIDATES[CHOSEN_RECIPE]`, chosen by 5-fold cross-validation over the 50 labelled
slices (never on the test split): every candidate is an arm of the `recipe` study, run on the same folds
as the other studies, whose table gives each candidate's cross-validated Dice:

    python experiments/run_study.py recipe --data_root ../shared/data

One fold by hand (fold k of 5 is held out and scored, with the last checkpoint, so it stays unseen):

    python -m rdunet_jax.main --config configs/semiseg.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/semiseg-cv0 \\
        --config.data.cv_folds=5 --config.data.cv_fold=0 --config.eval.split=validation
"""

from rdunet_jax import config_lib

# Config changes on top of the paper's settings (256 px, rdunet, Dice loss, Adam 1e-3, flips and zoom).
# The paper's schedule (350 epochs, /10 every 20) does not fit the 60 minutes this recipe may take on a
# 2-core CPU; 100 epochs of 45 slices at 256 px do (about 4,500 images at about 0.5 s each).
_BASE_RECIPE = {
    "data.image_size": 256,
    "num_epochs": 100,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "lr_decay_epochs": 40,
    "data.zoom_range": 0.1,
    "eval.test_time_flips": True,
    "eval.checkpoint": "last",
}
RECIPE_CANDIDATES = {
    "r256": _BASE_RECIPE,
    "r256_zoom02": _BASE_RECIPE | {"data.zoom_range": 0.2},
    "r256_dropout02": _BASE_RECIPE | {"model.dropout_rate": 0.2},
}
CHOSEN_RECIPE = "r256"


def apply_recipe(config, name: str = CHOSEN_RECIPE):
    """Sets the keys of recipe `name` in `config` (returned)."""
    for key, value in RECIPE_CANDIDATES[name].items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


def get_config(variant: str = "rdunet"):
    """The chosen recipe on semiseg with model variant `variant`."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant or "rdunet")
    config.name = f"{config.model.variant}-semiseg"
    config.data.name = "semiseg"
    config.eval.split = "test"
    return apply_recipe(config)
