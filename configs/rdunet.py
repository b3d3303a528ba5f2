"""The paper's recipe: the Residual Dilated U-net on Ma et al.'s 2-D COVID-19 CT slices (`ma2020_2d`).

256x256 slices, a seeded random 60/20/20 split of slices as in the paper, Dice loss, Adam at 1e-3 with a
staircase decay, random flips and zoom. Point `data.manual_dir` at the folder holding ct/, covid/, lungs/:

    python -m rdunet_jax.main --config configs/rdunet.py \\
        --config.data.manual_dir=../shared/data/covid19-ct-seg-2d

The part after ':' picks one of the paper's model variants (default rdunet):

    python -m rdunet_jax.main --config configs/rdunet.py:unet|residual|residual_se|rdunet|resdunet ...

`--config.data.split_scheme=blocks` splits contiguous runs of file numbers instead (files are in volume
order), which keeps neighbouring slices of one patient out of both sides of a split.
"""

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """The paper's training recipe on ma2020_2d with model variant `variant`."""
    config = config_lib.apply_model_variant(config_lib.base_config(), variant or "rdunet")
    config.name = f"{config.model.variant}-ma2020_2d"
    config.data.name = "ma2020_2d"
    config.data.image_size = 256
    config.data.split_scheme = "random"
    config.data.split_fractions = (0.6, 0.2, 0.2)
    config.eval.split = "test"
    return config
