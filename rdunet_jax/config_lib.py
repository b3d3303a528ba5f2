"""The config schema: defaults for every key, the paper's model variants, and validation.

Config files under `configs/` start from `base_config()` and change only what their recipe needs, so
every run's config has the same keys and `--config.KEY=VALUE` overrides work everywhere.
"""

import ml_collections

from rdunet_jax import models
from rdunet_jax.errors import UserError

# The paper's model family, by name: each entry is a set of `model.*` overrides.
MODEL_VARIANTS = {
    "unet": dict(block="plain", use_se=False, skip_dilation_rates=(), encoder_dilation_rates=()),
    "residual": dict(block="residual", use_se=False, skip_dilation_rates=(), encoder_dilation_rates=()),
    "residual_se": dict(block="residual", use_se=True, skip_dilation_rates=(), encoder_dilation_rates=()),
    "rdunet": dict(
        block="residual",
        use_se=True,
        skip_dilation_rates=models.PAPER_SKIP_DILATION_RATES,
        encoder_dilation_rates=(),
    ),
    "resdunet": dict(
        block="residual",
        use_se=True,
        skip_dilation_rates=(),
        encoder_dilation_rates=models.RESDUNET_ENCODER_DILATION_RATES,
    ),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, at the paper's values where the paper gives one."""
    config = ml_collections.ConfigDict()
    config.name = "rdunet"
    config.seed = 0
    config.num_epochs = 350
    config.batch_size = 8
    config.learning_rate = 1e-3
    config.lr_decay_epochs = 20
    config.lr_decay_factor = 0.1
    config.log_every_steps = 10
    # 0 saves `latest` at the end of each epoch only; N > 0 also every N steps (with the data position).
    config.checkpoint_every_steps = 0
    # '' disables the persistent XLA compilation cache; '~' is expanded.
    config.compilation_cache_dir = "~/.cache/rdunet_jax/xla"

    config.model = ml_collections.ConfigDict()
    config.model.variant = "rdunet"
    config.model.features = 16
    config.model.depth = 4
    config.model.block = "residual"
    config.model.use_se = True
    config.model.se_reduction = 8
    config.model.skip_dilation_rates = models.PAPER_SKIP_DILATION_RATES
    config.model.encoder_dilation_rates = ()
    config.model.dropout_rate = 0.5
    # Flax's convention (new = momentum * old + (1 - momentum) * batch); Keras' default is 0.99.
    config.model.batch_norm_momentum = models.BATCH_NORM_MOMENTUM
    config.model.dtype = "float32"

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"
    config.data.image_size = 256
    config.data.manual_dir = ""
    # `train_full` (semiseg) trains on every labelled slice.
    config.data.train_split = "train"
    config.data.data_dir = ""
    config.data.num_train = 160
    config.data.num_validation = 32
    config.data.num_test = 32
    config.data.flip = True
    config.data.zoom_range = 0.1
    # Splits of ma2020_2d (by slice) and nifti (by case): 'random' is the paper's seeded random split,
    # 'blocks' takes contiguous runs of files (volume order), so fewer neighbouring slices straddle splits.
    config.data.split_scheme = "random"
    config.data.split_fractions = (0.6, 0.2, 0.2)
    config.data.split_seed = 0
    # Hounsfield-unit window (lower, upper) mapped to [0, 1] for nifti slices: the lung window W1500/L-600.
    config.data.hu_window = (-1350.0, 150.0)

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.threshold = 0.5
    config.eval.batch_size = 16
    # Average the probabilities of the identity, left-right, up-down and both flips (nnU-Net mirroring).
    config.eval.test_time_flips = False
    # Ground-truth lesions below this area are "small" in the lesion-size table: mm^2 when the data
    # carries pixel spacing (nifti), pixels at data.image_size otherwise.
    config.eval.small_lesion_area = 100.0
    # Best and worst slices drawn as overlays by evaluation (and slices per volume by prediction).
    config.eval.num_overlays = 4
    return config


def apply_model_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets `config.model` to one of the paper's variants (see `MODEL_VARIANTS`)."""
    if variant not in MODEL_VARIANTS:
        raise UserError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    config.model.variant = variant
    for key, value in MODEL_VARIANTS[variant].items():
        config.model[key] = value
    return config


def _positive(config, key, kind=int):
    value = config
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise UserError(f"{key}: must be a positive {kind.__name__}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config before anything is built or compiled; raises UserError naming the bad key."""
    for key in (
        "num_epochs",
        "batch_size",
        "lr_decay_epochs",
        "log_every_steps",
        "data.image_size",
        "model.features",
        "model.depth",
        "model.se_reduction",
        "eval.batch_size",
    ):
        _positive(config, key)
    for key in ("learning_rate", "lr_decay_factor"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"{key}: must be a positive number, got {value!r}")
    model = config.model
    if model.block not in ("plain", "residual"):
        raise UserError(f"model.block: must be 'plain' or 'residual', got {model.block!r}")
    if not 0.0 <= model.dropout_rate < 1.0:
        raise UserError(f"model.dropout_rate: must be in [0, 1), got {model.dropout_rate!r}")
    if not 0.0 <= model.batch_norm_momentum < 1.0:
        raise UserError(f"model.batch_norm_momentum: must be in [0, 1), got {model.batch_norm_momentum!r}")
    if model.dtype not in ("float32", "bfloat16"):
        raise UserError(f"model.dtype: must be 'float32' or 'bfloat16', got {model.dtype!r}")
    divisor = 2**model.depth
    if config.data.image_size % divisor:
        raise UserError(
            f"data.image_size: {config.data.image_size} is not divisible by 2**model.depth = {divisor}"
        )
    skip_rates = tuple(model.skip_dilation_rates)
    if skip_rates and len(skip_rates) != model.depth:
        raise UserError(
            f"model.skip_dilation_rates: needs one schedule per skip ({model.depth}), got {len(skip_rates)}"
        )
    for schedule in skip_rates:
        _check_rates("model.skip_dilation_rates", schedule)
    encoder_rates = tuple(model.encoder_dilation_rates)
    if encoder_rates and len(encoder_rates) != model.depth + 1:
        raise UserError(
            f"model.encoder_dilation_rates: needs one rate per encoder level ({model.depth + 1}), "
            f"got {len(encoder_rates)}"
        )
    _check_rates("model.encoder_dilation_rates", encoder_rates)
    if not 0.0 < config.eval.threshold < 1.0:
        raise UserError(f"eval.threshold: must be in (0, 1), got {config.eval.threshold!r}")
    if not 0.0 <= config.data.zoom_range < 1.0:
        raise UserError(f"data.zoom_range: must be in [0, 1), got {config.data.zoom_range!r}")
    _check_data_splits(config.data)


def _check_data_splits(data) -> None:
    """Checks the split and intensity-window keys of `config.data`."""
    if data.split_scheme not in ("random", "blocks"):
        raise UserError(f"data.split_scheme: must be 'random' or 'blocks', got {data.split_scheme!r}")
    fractions = tuple(data.split_fractions)
    if (
        len(fractions) != 3
        or any(
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            for value in fractions
        )
        or abs(sum(fractions) - 1.0) > 1e-6
    ):
        raise UserError(f"data.split_fractions: must be 3 positive numbers summing to 1, got {fractions!r}")
    if isinstance(data.split_seed, bool) or not isinstance(data.split_seed, int) or data.split_seed < 0:
        raise UserError(f"data.split_seed: must be a non-negative int, got {data.split_seed!r}")
    window = tuple(data.hu_window)
    if (
        len(window) != 2
        or not all(isinstance(value, (int, float)) for value in window)
        or window[0] >= window[1]
    ):
        raise UserError(
            f"data.hu_window: must be (lower, upper) Hounsfield units with lower < upper, got {window!r}"
        )


def _check_rates(key, rates):
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise UserError(f"{key}: dilation rates must be positive integers, got {tuple(rates)!r}")
