"""DRAFT (issue #25): ground-glass opacity and consolidation on COVID-SemiSeg, one exclusive head.

COVID-SemiSeg's palette masks (`MultiClassInfection-Train/GT`, and `MultiClassInfection-Test/GT` when the
testing set is present) give each lesion pixel one class: 1 ground-glass opacity, 2 consolidation. The
model ends in a softmax over background, `ggo` and `consolidation` (`model.head='exclusive'`) and trains
on the mean foreground soft Dice plus cross-entropy (nnU-Net's loss; consolidation covers 37% of the
lesion pixels and 39 of the 50 slices, so cross-entropy's per-pixel gradient matters more than for the
binary mask). The starting point is the binary recipe chosen in configs/semiseg.py; the multi-class
recipe is to be chosen by cross-validation over the 50 training slices only, never on the test split:

    python -m rdunet_jax.main --config configs/semiseg_multiclass.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

The head is wired end to end (model, training, per-class evaluation, prediction, ONNX); the recipe is still
the binary one: the multi-class cross-validation is to choose it (experiments/results/multiclass/).
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
