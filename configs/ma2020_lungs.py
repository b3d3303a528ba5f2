"""Lungs and infection from one model on Ma et al.'s 2-D slices (`ma2020_2d`, issue #25):

    python -m rdunet_jax.main --config configs/ma2020_lungs.py \\
        --config.data.manual_dir=../shared/data/covid19-ct-seg-2d

Two independent sigmoids (`model.head='multilabel'`): `lungs` (Ma et al.'s `lungs/` masks) and
`infection` (`covid/`), which overlap: every infection pixel of the 1614 slices lies inside the lung
mask. Trained on the mean per-channel soft Dice, on the `blocks` split (contiguous file numbers, in volume
order), so that few patients straddle train and test (the volume boundaries were not recorded, so one
patient can still straddle a block edge). Evaluation reports lung and infection Dice and the lung
involvement (infection inside the lungs as a share of lung area) against the experts' masks, in `per_class`
and `involvement` of metrics/<split>.json; the top-level metrics score the infection class.

The schedule is what fits the 2-core CPU (30 minutes): 128 px, 8 epochs of batch 8, the learning rate /10
after 6, no dropout. On the test split (323 slices): lung Dice 0.953, infection 0.571, involvement error
11.7 percentage points (experiments/results/multiclass/README.md). The paper's schedule is a config away:
`--config.data.image_size=256 --config.num_epochs=350 --config.lr_decay_epochs=20 --config.batch_size=8
--config.model.dropout_rate=0.5 --config.eval.small_lesion_area=100` (a GPU's work).
"""

from rdunet_jax import config_lib, reports


def get_config(variant: str = "rdunet"):
    """Lungs and infection on ma2020_2d, blocked split, with model variant `variant`."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant or "rdunet")
    config.name = f"{config.model.variant}-ma2020-lungs"
    config.data.name = "ma2020_2d"
    config.data.image_size = 128
    config.num_epochs = 8
    config.lr_decay_epochs = 6
    config.batch_size = 8
    config.model.dropout_rate = 0.0
    config.eval.small_lesion_area = reports.small_lesion_area(config.data.image_size)
    config.data.split_scheme = "blocks"
    config.data.split_fractions = (0.6, 0.2, 0.2)
    config.model.head = "multilabel"
    config.data.classes = ("lungs", "infection")
    config.loss = "dice"
    config.eval.split = "test"
    return config
