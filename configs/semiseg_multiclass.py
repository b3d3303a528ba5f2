"""Ground-glass opacity and consolidation on COVID-SemiSeg, one exclusive head (issue #25):

    python -m rdunet_jax.main --config configs/semiseg_multiclass.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

COVID-SemiSeg's palette masks (`MultiClassInfection-Train/GT`, and `MultiClassInfection-Test/GT` when the
testing set is present) give each lesion pixel one class: 1 ground-glass opacity, 2 consolidation. The
model ends in a softmax over background, `ggo` and `consolidation` (`model.head='exclusive'`) and trains
on the mean foreground soft Dice plus cross-entropy (nnU-Net's loss). The rest is the binary recipe of
configs/semiseg.py (128 px, 300 epochs, batch 4, no dropout, learning rate /10 at epoch 150).

Chosen by 5-fold cross-validation over the 50 training slices (the test split untouched), against two
candidates, each on the same folds, scored with the last checkpoint on the held-out fold: the soft Dice
alone (`--config.loss=dice`) and the binary r256 recipe (256 px, 100 epochs, dropout 0.5). Dice + CE was
best on every class; per slice, the others trail it on consolidation by 0.12-0.13 (intervals clear of 0).
Dice per slice, mean over the slices holding the class (95% bootstrap over them):

    ggo            0.553 [0.486, 0.618]   (48 slices)
    consolidation  0.399 [0.316, 0.483]   (39 slices)
    any lesion     0.724 [0.689, 0.756]   (50 slices)

Table, commands and times: experiments/results/multiclass/README.md. One fold by hand:

    python -m rdunet_jax.main --config configs/semiseg_multiclass.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/semiseg-mc-cv0 \\
        --config.data.cv_folds=5 --config.data.cv_fold=0 --config.eval.split=validation
"""

import pathlib

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """COVID-SemiSeg's two lesion classes with model variant `variant`, from the binary recipe."""
    config = config_lib.config_module(pathlib.Path(__file__).with_name("semiseg.py")).get_config(variant)
    config.name = f"{config.model.variant}-semiseg-multiclass"
    config.model.head = "exclusive"
    config.data.classes = ("ggo", "consolidation")
    config.loss = "dice_ce"
    return config
