"""The config schema: defaults for every key, the paper's model variants, and validation.

Config files under `configs/` start from `base_config()` and change only what their recipe needs, so
every run's config has the same keys and `--config.KEY=VALUE` overrides work everywhere.
"""

import difflib
import importlib.util

import ml_collections

from rdunet_jax import input_pipeline, losses, models, orientation
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
    # The training (and validation) loss, a key of losses.LOSSES: 'dice' is the paper's soft Dice,
    # 'dice_bce' adds binary cross-entropy (nnU-Net's default).
    config.loss = "dice"
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
    # Speed options (see rdunet_jax/models.py); none changes the parameters, so checkpoints are shared.
    # 'stencil' computes the same bilinear up-sampling as 'resize' (jax.image.resize) to float
    # tolerance, 5% faster per CPU train step at 256 px.
    config.model.upsample_impl = "stencil"
    # 'bits' draws the same Bernoulli dropout masks from fewer random bits: a 2.7% faster train step on a
    # 2-core CPU and 97 MB fewer temporaries (experiments/README.md). Its masks differ from 'flax'
    # (`nn.Dropout`) for the same key: the default until 2026-11-29, set it to reproduce earlier runs.
    config.model.dropout_impl = "bits"
    # Recompute each block's activations in the backward pass: less memory, more time.
    config.model.remat = False
    # 'reshape' computes the same 2x2 max-pooling without XLA's select-and-scatter in the gradient: a
    # 4.6% faster train step on a 2-core CPU, 70 MB fewer temporaries, same loss (experiments/README.md).
    # Runs before 2026-11-29 used 'reduce_window': set it to reproduce them to the digit.
    config.model.pool_impl = "reshape"
    # 'space_to_batch' computes the same dilated convolutions over the input's phases, whose gradient
    # XLA hands to cuDNN's fast kernels on a GPU (30x faster there, 2.8x slower on a CPU); 'auto' picks
    # it on GPUs and 'xla' elsewhere.
    config.model.dilation_impl = "auto"
    # 'closed_form' is nn.BatchNorm with the textbook gradient written out (a custom VJP, first-order
    # reverse mode only): the same function to float tolerance, a 7.8% faster train step on a 2-core
    # CPU, 207 MB fewer temporaries (experiments/README.md). 'flax' (nn.BatchNorm) was the default until
    # 2026-11-29: set it to reproduce earlier runs to the digit.
    config.model.batch_norm_impl = "closed_form"

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
    # Random in-plane rotation in [-rotation_degrees, rotation_degrees] (0 = off, the paper's setting).
    config.data.rotation_degrees = 0.0
    # Splits of ma2020_2d (by slice) and nifti (by case): 'random' is the paper's seeded random split,
    # 'blocks' takes contiguous runs of files (volume order), so fewer neighbouring slices straddle splits.
    config.data.split_scheme = "random"
    config.data.split_fractions = (0.6, 0.2, 0.2)
    config.data.split_seed = 0
    # k-fold cross-validation (0 = off): the pool (semiseg's train_full, else train + validation) is cut
    # into cv_folds folds by a cv_seed-seeded permutation of ids; fold cv_fold is `validation`, the rest
    # `train`; `test` is unchanged. Every run of a study with the same cv_* keys sees identical folds.
    config.data.cv_folds = 0
    config.data.cv_fold = 0
    config.data.cv_seed = 0
    # Hounsfield-unit window (lower, upper) mapped to [0, 1] for nifti slices: the lung window W1500/L-600.
    config.data.hu_window = input_pipeline.LUNG_WINDOW
    # The in-plane orientation of the training slices, two letters for the patient directions in which
    # rows and columns increase ('PL': radiological display); prediction turns every volume this way
    # from its affine. 'auto' (also what a config without the key means): the dataset's own orientation
    # (orientation.DATASET_ORIENTATIONS); 'voxel': volumes in their stored voxel order, unturned.
    config.data.orientation = orientation.AUTO
    # Self-training (rdunet_jax/selftrain.py). The phantom's unlabelled pool (semiseg's is the release's).
    config.data.num_unlabelled = 0
    # A folder of pseudo-labels (rdunet_jax/datasets/pseudo_labels.py): when set, training batches mix
    # them in, `pseudo_fraction` of each batch, with their per-pixel weights in the loss.
    config.data.pseudo_label_dir = ""
    config.data.pseudo_fraction = 0.5
    # Joint training: a folder of Ma et al.'s 2-D slices (ma2020_2d's layout) whose every slice joins the
    # training batches, `extra_fraction` of each batch, as extra labelled data.
    config.data.extra_labelled_dir = ""
    config.data.extra_fraction = 0.5
    # Random contrast and brightness change of up to this much (0 = off): the student's extra noise.
    config.data.intensity_range = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.threshold = 0.5
    config.eval.batch_size = 16
    # Which checkpoint training evaluates at its end: 'best' (lowest validation loss) or 'last' (the final
    # epoch). Under cross-validation the validation set is the held-out fold, so 'best' picks the epoch on
    # the very slices it is scored on; 'last' keeps the fold unseen.
    config.eval.checkpoint = "best"
    # Average the probabilities of the identity, left-right, up-down and both flips (nnU-Net mirroring).
    config.eval.test_time_flips = False
    # Ground-truth lesions below this area are "small" in the lesion-size table: mm^2 when the data
    # carries pixel spacing (nifti), pixels at data.image_size otherwise.
    config.eval.small_lesion_area = 100.0
    # Best and worst slices drawn as overlays by evaluation (and slices per volume by prediction).
    config.eval.num_overlays = 4
    # What runs the model in evaluation (--mode evaluate, and after training) and --mode predict: 'jax'
    # (XLA), or 'onnxruntime' (the model exported to ONNX, on the CPU: 0.66x XLA's time per slice on 2
    # cores, same probabilities to 1e-7; needs the `onnx` extra). Training always runs in JAX.
    config.eval.runtime = "jax"

    # Teacher-student self-training (rdunet_jax/selftrain.py): 0 rounds is plain training; each round
    # pseudo-labels the unlabelled split with the previous model (flip TTA) and trains a student from
    # scratch on the labelled slices plus those pseudo-labels.
    config.selftrain = ml_collections.ConfigDict()
    config.selftrain.rounds = 0
    # A pixel is confident when its probability is at least this far from undecided: p >= t or p <= 1 - t.
    config.selftrain.confidence_threshold = 0.9
    # 'threshold': weight 1 on confident pixels; 'confidence': weight |2p - 1| on them; 0 elsewhere.
    config.selftrain.weighting = "threshold"
    config.selftrain.student_num_epochs = 150
    config.selftrain.student_lr_decay_epochs = 75
    config.selftrain.student_intensity_range = 0.1
    return config


def apply_model_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets `config.model` to one of the paper's variants (see `MODEL_VARIANTS`)."""
    if variant not in MODEL_VARIANTS:
        raise UserError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    config.model.variant = variant
    for key, value in MODEL_VARIANTS[variant].items():
        config.model[key] = value
    return config


def _get(config, key):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _require(config, key, predicate, description: str) -> None:
    """Raises UserError '<key>: must be <description>, got <value>' unless predicate(value) holds."""
    value = _get(config, key)
    try:
        valid = bool(predicate(value))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"{key}: must be {description}, got {value!r}")


def _flat_keys(config, prefix="") -> set[str]:
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _check_known_keys(config) -> None:
    """A key the schema does not know is a typo that would silently be ignored: refuse it."""
    known = _flat_keys(base_config())
    for key in sorted(_flat_keys(config) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{key}: unknown config key{hint}")


def _check_speed_options(config) -> None:
    """The `model.*` keys that change speed and memory but not the parameters (see models.py)."""
    speed_choices = (
        ("upsample_impl", models.UPSAMPLE_IMPLS),
        ("dropout_impl", models.DROPOUT_IMPLS),
        ("pool_impl", models.POOL_IMPLS),
        ("dilation_impl", models.DILATION_IMPLS),
        ("batch_norm_impl", models.BATCH_NORM_IMPLS),
    )
    for key, choices in speed_choices:
        description = f"one of {list(choices)}"
        _require(config, f"model.{key}", lambda value, choices=choices: value in choices, description)
    _require(config, "model.remat", lambda value: isinstance(value, bool), "True or False")


def _is_rate_schedule(rates) -> bool:
    return all(_is_int(rate) and rate > 0 for rate in rates)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config before anything is built or compiled; raises UserError naming the bad key."""
    _check_known_keys(config)
    positive_int = (lambda value: _is_int(value) and value > 0, "a positive integer")
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
        _require(config, key, *positive_int)
    for key in ("learning_rate", "lr_decay_factor", "eval.small_lesion_area"):
        _require(
            config, key, lambda value: _is_number(value) and 0 < value < float("inf"), "a positive number"
        )
    _require(config, "seed", lambda value: _is_int(value) and value >= 0, "a non-negative integer")
    _require(
        config,
        "checkpoint_every_steps",
        lambda value: _is_int(value) and value >= 0,
        "a non-negative integer",
    )
    _require(
        config, "eval.num_overlays", lambda value: _is_int(value) and value >= 0, "a non-negative integer"
    )
    _require(
        config,
        "name",
        lambda value: isinstance(value, str) and value and "/" not in value and value not in (".", ".."),
        "a non-empty name without '/'",
    )
    _require(
        config, "compilation_cache_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    for key in ("model.use_se", "data.flip", "eval.test_time_flips"):
        _require(config, key, lambda value: isinstance(value, bool), "True or False")
    _require(config, "model.block", lambda value: value in ("plain", "residual"), "'plain' or 'residual'")
    _require(config, "model.dtype", lambda value: value in ("float32", "bfloat16"), "'float32' or 'bfloat16'")
    _check_speed_options(config)
    for key in ("model.dropout_rate", "model.batch_norm_momentum", "data.zoom_range"):
        _require(config, key, lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)")
    _require(
        config,
        "data.rotation_degrees",
        lambda value: _is_number(value) and 0 <= value <= 180,
        "a number of degrees in [0, 180]",
    )
    _require(
        config, "eval.threshold", lambda value: _is_number(value) and 0 < value < 1, "a number in (0, 1)"
    )
    _require(
        config, "data.train_split", lambda value: value in ("train", "train_full"), "'train' or 'train_full'"
    )
    for key in ("data.manual_dir", "data.data_dir", "data.name", "eval.split"):
        _require(config, key, lambda value: isinstance(value, str), "a string")
    for key in ("data.num_train", "data.num_validation", "data.num_test"):
        _require(config, key, lambda value: _is_int(value) and value >= 0, "a non-negative integer")
    model = config.model
    divisor = 2**model.depth
    if config.data.image_size % divisor:
        raise UserError(
            f"data.image_size: {config.data.image_size} is not divisible by 2**model.depth = {divisor}"
        )
    _require(
        config,
        "model.skip_dilation_rates",
        lambda schedules: (
            len(schedules) in (0, model.depth) and all(_is_rate_schedule(schedule) for schedule in schedules)
        ),
        f"() or one schedule of positive integer dilation rates per skip ({model.depth})",
    )
    _require(
        config,
        "model.encoder_dilation_rates",
        lambda rates: len(rates) in (0, model.depth + 1) and _is_rate_schedule(rates),
        f"() or one positive integer dilation rate per encoder level ({model.depth + 1})",
    )
    _require(
        config,
        "eval.split",
        lambda value: value in ("train", "validation", "test", "train_full"),
        "'train', 'validation', 'test' or 'train_full'",
    )
    _require(config, "eval.checkpoint", lambda value: value in ("best", "last"), "'best' or 'last'")
    _require(config, "eval.runtime", lambda value: value in ("jax", "onnxruntime"), "'jax' or 'onnxruntime'")
    _check_runtime_installed(config)
    _require(config, "loss", lambda value: value in losses.LOSSES, f"one of {list(losses.LOSSES)}")
    _check_variant(config)
    _check_data_splits(config)
    _check_selftrain(config)


def _check_selftrain(config) -> None:
    """The keys of self-training and of training on pseudo-labels."""
    _require(
        config, "data.num_unlabelled", lambda value: _is_int(value) and value >= 0, "a non-negative integer"
    )
    _require(
        config, "data.pseudo_label_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    _require(
        config, "data.extra_labelled_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    if config.data.pseudo_label_dir and config.data.extra_labelled_dir:
        raise UserError("data.extra_labelled_dir: cannot be mixed in together with data.pseudo_label_dir")
    weighted = sorted(losses.WEIGHTED_LOSSES.values())
    if (config.data.pseudo_label_dir or config.data.extra_labelled_dir) and config.loss not in weighted:
        # Mixed batches carry a weight channel beside the mask, which only the weighted losses read.
        raise UserError(
            f"loss: training on mixed batches needs a weighted loss {weighted}, got {config.loss!r}"
        )
    for key in (
        "data.pseudo_fraction",
        "data.extra_fraction",
        "data.intensity_range",
        "selftrain.student_intensity_range",
    ):
        _require(config, key, lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)")
    _require(
        config, "selftrain.rounds", lambda value: _is_int(value) and value >= 0, "a non-negative integer"
    )
    _require(
        config,
        "selftrain.confidence_threshold",
        lambda value: _is_number(value) and 0.5 <= value < 1,
        "a probability in [0.5, 1)",
    )
    _require(
        config,
        "selftrain.weighting",
        lambda value: value in ("threshold", "confidence"),
        "'threshold' or 'confidence'",
    )
    for key in ("selftrain.student_num_epochs", "selftrain.student_lr_decay_epochs"):
        _require(config, key, lambda value: _is_int(value) and value > 0, "a positive integer")


def _check_runtime_installed(config) -> None:
    """`eval.runtime='onnxruntime'` needs the `onnx` extra: said before training, not after it."""
    if config.eval.runtime != "onnxruntime":
        return
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"eval.runtime: 'onnxruntime' needs {' and '.join(missing)}, not installed: "
            "pip install -e '.[onnx]'"
        )


def _structure(model_keys) -> dict:
    """What makes one paper variant another: block type, SE, DC modules on skips, encoder dilation."""
    return {
        "block": model_keys["block"],
        "use_se": model_keys["use_se"],
        "DC modules on the skips": bool(tuple(model_keys["skip_dilation_rates"])),
        "encoder dilation": bool(tuple(model_keys["encoder_dilation_rates"])),
    }


def _check_variant(config) -> None:
    """`model.variant` names the model the `model.*` keys build; setting it alone must not mislabel a run."""
    variant = config.model.variant
    if variant not in MODEL_VARIANTS:
        raise UserError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    expected, actual = _structure(MODEL_VARIANTS[variant]), _structure(config.model)
    differences = [
        f"{name}: {actual[name]} (variant: {expected[name]})"
        for name in expected
        if expected[name] != actual[name]
    ]
    if differences:
        raise UserError(
            f"model.variant: {variant!r} does not match the model keys ({'; '.join(differences)}); "
            f"choose a variant with the config argument, e.g. configs/rdunet.py:{variant}"
        )


def _check_data_splits(config) -> None:
    """Checks the split and intensity-window keys of `config.data`."""
    _require(config, "data.split_scheme", lambda value: value in ("random", "blocks"), "'random' or 'blocks'")
    _require(
        config,
        "data.split_fractions",
        lambda fractions: (
            len(fractions) == 3
            and all(_is_number(value) and value > 0 for value in fractions)
            and abs(sum(fractions) - 1.0) <= 1e-6
        ),
        "3 positive numbers summing to 1",
    )
    _require(config, "data.split_seed", lambda value: _is_int(value) and value >= 0, "a non-negative integer")
    _check_cross_validation(config)
    _require(
        config,
        "data.hu_window",
        lambda window: (
            len(window) == 2 and all(_is_number(value) for value in window) and window[0] < window[1]
        ),
        "(lower, upper) Hounsfield units with lower < upper",
    )
    if "orientation" in config.data:  # a config written before the key existed means 'auto'
        _require(
            config,
            "data.orientation",
            lambda value: value in orientation.ORIENTATION_CHOICES,
            f"one of {list(orientation.ORIENTATION_CHOICES)}",
        )


def _check_cross_validation(config) -> None:
    """Checks `data.cv_folds`, `data.cv_fold` and `data.cv_seed`."""
    _require(
        config,
        "data.cv_folds",
        lambda value: _is_int(value) and (value == 0 or value >= 2),
        "0 (off) or an integer >= 2",
    )
    _require(config, "data.cv_seed", lambda value: _is_int(value) and value >= 0, "a non-negative integer")
    folds = config.data.cv_folds
    if not folds:
        _require(
            config, "data.cv_fold", lambda value: _is_int(value) and value >= 0, "a non-negative integer"
        )
        return
    _require(
        config,
        "data.cv_fold",
        lambda value: _is_int(value) and 0 <= value < folds,
        f"an integer in [0, {folds - 1}] (data.cv_folds={folds})",
    )
    # train_full is the whole pool, held-out fold included: training on it would leak.
    _require(
        config,
        "data.train_split",
        lambda value: value == "train",
        "'train' when data.cv_folds > 0 (train_full holds the held-out fold)",
    )
