"""DRAFT (issue #25): lungs and infection from one model on Ma et al.'s 2-D slices (`ma2020_2d`).

Two independent sigmoids (`model.head='multilabel'`): `lungs` (Ma et al.'s `lungs/` masks) and
`infection` (`covid/`), which overlap: every infection pixel of the 1614 slices lies inside the lung
mask. Trained on the mean per-channel soft Dice, on the `blocks` split (contiguous file numbers, in volume
order), so that few patients straddle train and test (the volume boundaries were not recorded, so one
patient can still straddle a block edge). Evaluation is to report lung and infection Dice and the lung
involvement (infection inside the lungs as a share of lung area) against the experts' masks:

    python -m rdunet_jax.main --config configs/ma2020_lungs.py \\
        --config.data.manual_dir=../shared/data/covid19-ct-seg-2d

Evaluation writes `per_class` (lungs, infection) and `involvement` (per slice and per volume) into
metrics/<split>.json; the top-level metrics score the infection class. The training recipe is not tuned yet
(experiments/results/multiclass/ has a short run).
"""

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """Lungs and infection on ma2020_2d, blocked split, with model variant `variant`."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant or "rdunet")
    config.name = f"{config.model.variant}-ma2020-lungs"
    config.data.name = "ma2020_2d"
    config.data.image_size = 256
    config.data.split_scheme = "blocks"
    config.data.split_fractions = (0.6, 0.2, 0.2)
    config.model.head = "multilabel"
    config.data.classes = ("lungs", "infection")
    config.loss = "dice"
    config.eval.split = "test"
    return config
