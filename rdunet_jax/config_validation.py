"""Validation of a config: each key checked against its type, range or choices (the schema and its tables
are in config_lib), so a bad key fails in one line naming it before anything is built or compiled."""

import difflib
import importlib.util

import ml_collections

from rdunet_jax import config_lib, losses, orientation
from rdunet_jax.errors import UserError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


_NON_NEGATIVE_INT = (lambda value: _is_int(value) and value >= 0, "a non-negative integer")
_LAST_WITH_TRAIN_FULL = "'last' when data.train_split=train_full"
_POSITIVE = (lambda value: _is_int(value) and value >= 1, "a positive integer")
# The dropout key's seed: jax.random.PRNGKey(2**32) is PRNGKey(0), and 2**63 overflows.
_SEED = (lambda value: _is_int(value) and 0 <= value < 2**32, "an integer from 0 to 2**32-1")
_STUDENT_SEED = (
    lambda value: (_is_int(value) and value == -1) or _SEED[0](value),
    f"-1 (the run's seed) or {_SEED[1]}",
)


def _require(config, key, predicate, description: str) -> None:
    """Raises UserError '<key>: must be <description>, got <value>' unless predicate(value) holds."""
    value = config[key]  # a ConfigDict resolves the dotted path itself
    try:
        valid = bool(predicate(value))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"{key}: must be {description}, got {value!r}")


def _check_known_keys(config) -> None:
    """A key the schema does not know is a typo that would silently be ignored: refuse it."""
    known = config_lib.flat_keys(config_lib.base_config())
    for key in sorted(config_lib.flat_keys(config) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{key}: unknown config key{hint}")


def check_complete(config) -> None:
    """UserError naming the first schema key a config file's config lacks (it would fail deep in a run); not
    for a run's saved config.json, which may predate keys that the code reads as their earlier meaning."""
    for key in sorted(config_lib.flat_keys(config_lib.base_config()) - config_lib.flat_keys(config)):
        raise UserError(f"{key}: missing from the config; build it on rdunet_jax.config_lib.base_config()")


def _check_speed_options(config) -> None:
    """The `model.*` keys of SPEED_OPTIONS, each one of its choices, of the choice's type (remat=1 is not
    remat=True)."""
    for key, option in config_lib.SPEED_OPTIONS.items():
        allowed = {(type(choice), choice) for choice in option.choices}
        on_off = all(isinstance(choice, bool) for choice in option.choices)
        description = "True or False" if on_off else f"one of {list(option.choices)}"
        _require(config, f"model.{key}", lambda value, ok=allowed: (type(value), value) in ok, description)


def _is_rate_schedule(rates) -> bool:
    return all(_is_int(rate) and rate > 0 for rate in rates)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config before anything is built or compiled; raises UserError naming the bad key."""
    _check_known_keys(config)
    counts = ("num_epochs", "batch_size", "lr_decay_epochs", "log_every_steps", "checkpoint_every_epochs")
    sizes = ("data.image_size", "model.features", "model.depth", "model.se_reduction", "eval.batch_size")
    for key in (*counts, *sizes, "eval.overlay_every_epochs", "eval.validate_every_epochs"):
        _require(config, key, *_POSITIVE)
    for key in ("learning_rate", "lr_decay_factor", "eval.small_lesion_area"):
        _require(
            config, key, lambda value: _is_number(value) and 0 < value < float("inf"), "a positive number"
        )
    for key in ("checkpoint_every_steps", "eval.num_overlays", "warmup_epochs"):
        _require(config, key, *_NON_NEGATIVE_INT)
    _require(config, "seed", *_SEED)
    _require(
        config,
        "name",
        lambda value: isinstance(value, str) and value and "/" not in value and value not in (".", ".."),
        "a non-empty name without '/'",
    )
    _require(
        config, "compilation_cache_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    booleans = ("model.use_se", "model.batch_norm_frozen", "model.batch_norm_by_source", "data.flip")
    for key in (*booleans, "eval.test_time_flips"):
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
    full = config.data.train_split == "train_full"  # validation is then on training slices: never chosen on
    _require(config, "eval.checkpoint", lambda value: value == "last" or not full, _LAST_WITH_TRAIN_FULL)
    for key in ("model_init", "data.manual_dir", "data.data_dir", "data.name", "eval.split"):
        _require(config, key, lambda value: isinstance(value, str), "a string")
    for key in ("data.num_train", "data.num_validation", "data.num_test"):  # TFDS writes no empty split
        _require(config, key, *_POSITIVE)
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
    _check_head_and_classes(config)
    _check_variant(config)
    _check_data_splits(config)
    _check_selftrain(config)
    _check_consistency(config)


def _mixed_rows(batch_size: int, fraction: float) -> int:
    """input_pipeline.pseudo_per_batch, without importing the input pipeline at validation: the rows of a
    batch mixed in from another source, the nearest whole number, at least one row left labelled."""
    return min(int(batch_size * fraction + 0.5), batch_size - 1)


def _check_consistency(config) -> None:
    """The keys of mean-teacher and FixMatch training, and what they cannot be combined with."""
    non_negative = (lambda value: _is_number(value) and 0 <= value < float("inf"), "a non-negative number")
    unit = (lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)")
    for key, check in (
        ("consistency.weight", non_negative),
        ("consistency.ema_decay", unit),
        ("consistency.rampup_epochs", _NON_NEGATIVE_INT),
        ("consistency.noise_std", non_negative),
        ("consistency.strong_intensity_range", unit),
        ("consistency.min_lesion_fraction", unit),
        ("data.unlabelled_fraction", unit),
        ("consistency.confidence_threshold", (lambda value: unit[0](value) and value >= 0.5, "in [0.5, 1)")),
    ):
        _require(config, key, *check)
    methods = config_lib.CONSISTENCY_METHODS
    _require(config, "consistency.method", lambda value: value in methods, " or ".join(map(repr, methods)))
    strong = config.consistency.strong_intensity_range or config.consistency.noise_std
    if config.consistency.method == "fixmatch" and not strong:
        raise UserError(
            "consistency.strong_intensity_range: FixMatch's strong view needs it or noise_std > 0"
        )
    if config.consistency.method != "fixmatch" and config.consistency.min_lesion_fraction:
        raise UserError(
            "consistency.min_lesion_fraction: only consistency.method='fixmatch' reads this slice filter"
        )
    weight, fraction = config.consistency.weight, config.data.unlabelled_fraction
    if fraction and not weight:
        raise UserError(
            "data.unlabelled_fraction: unlabelled slices train only through consistency.weight > 0"
        )
    if not weight:
        return
    method = {"mean_teacher": "mean teacher", "fixmatch": "FixMatch"}[config.consistency.method]
    if not fraction:
        raise UserError(
            f"consistency.weight: {method} needs unlabelled slices: set data.unlabelled_fraction > 0"
        )
    if not _mixed_rows(config.batch_size, fraction):  # batch_size is a positive integer here
        raise UserError(
            f"data.unlabelled_fraction: {fraction} of a batch of {config.batch_size} rounds to no "
            "unlabelled row"
        )
    if config.model.get("head", "binary") != "binary":
        raise UserError(
            f"consistency.weight: {method} is built for model.head='binary', got {config.model.head!r}"
        )
    for key in ("data.pseudo_label_dir", "data.extra_labelled_dir"):
        if config.data[key.split(".")[1]]:
            raise UserError(f"{key}: cannot be mixed in together with {method}'s unlabelled slices")
    if config.selftrain.rounds:
        raise UserError(f"consistency.weight: {method} and selftrain.rounds > 0 are alternatives; set one")
    weighted = sorted(losses.WEIGHTED_LOSSES.values())
    if config.loss not in weighted:
        raise UserError(
            f"loss: {method}'s mixed batches need a weighted loss {weighted}, got {config.loss!r}"
        )


def _check_selftrain(config) -> None:
    """The keys of self-training and of training on pseudo-labels."""
    _require(config, "data.num_unlabelled", *_NON_NEGATIVE_INT)
    _require(
        config, "data.pseudo_label_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    _require(
        config, "data.extra_labelled_dir", lambda value: isinstance(value, str), "a path string ('' for off)"
    )
    if config.data.pseudo_label_dir and config.data.extra_labelled_dir:
        raise UserError("data.extra_labelled_dir: cannot be mixed in together with data.pseudo_label_dir")
    if config.selftrain.rounds and config.data.extra_labelled_dir:
        raise UserError(
            "data.extra_labelled_dir: self-training's student mixes in pseudo-labels, which cannot be mixed "
            "in together with other labelled slices; set selftrain.rounds=0 for joint training"
        )
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
        config,
        "data.extra_min_lesion_fraction",
        lambda value: _is_number(value) and 0 <= value < 1,
        "a share of the slice in [0, 1)",
    )
    _require(config, "selftrain.rounds", *_NON_NEGATIVE_INT)
    _require(
        config,
        "selftrain.confidence_threshold",
        lambda value: _is_number(value) and 0.5 <= value < 1,
        "a probability in [0.5, 1)",
    )
    for key, choices in (
        ("selftrain.weighting", ("threshold", "confidence")),
        ("selftrain.student_init", ("scratch", "teacher")),
    ):
        _require(config, key, lambda value, ok=choices: value in ok, " or ".join(map(repr, choices)))
    for key in ("selftrain.student_num_epochs", "selftrain.student_lr_decay_epochs"):
        _require(config, key, *_POSITIVE)
    _require(
        config,
        "data.unlabelled_intensity_matching",
        lambda value: value in config_lib.INTENSITY_MATCHING_MODES,
        f"one of {list(config_lib.INTENSITY_MATCHING_MODES)}",
    )
    _require(
        config,
        "selftrain.student_batch_size",
        lambda value: _is_int(value) and value >= 0,
        "a non-negative integer (0: the teacher's batch_size)",
    )
    _require(config, "selftrain.student_seed", *_STUDENT_SEED)
    student_batch = config.selftrain.student_batch_size or config.batch_size
    fraction = config.data.pseudo_fraction
    if config.selftrain.rounds and not _mixed_rows(student_batch, fraction):
        raise UserError(
            f"data.pseudo_fraction: {fraction} of the student's batch of {student_batch} "
            "(selftrain.student_batch_size, else batch_size) rounds to no pseudo-labelled row"
        )
    # A source whose share of the batch rounds to no row would be left out unseen (batch_size is valid here).
    for source, key in (("pseudo_label_dir", "pseudo_fraction"), ("extra_labelled_dir", "extra_fraction")):
        share, batch = config.data[key], config.batch_size
        if config.data[source] and not _mixed_rows(batch, share):
            raise UserError(f"data.{key}: {share} of a batch of {batch} rounds to no row of data.{source}")
    head = config.model.get("head", "binary")
    # data.pseudo_label_dir needs a weighted loss (above), which only the binary head has.
    if config.selftrain.rounds and head != "binary":
        raise UserError(
            f"selftrain.rounds: pseudo-labels are lesion masks, for model.head='binary', got {head!r}"
        )
    mixes_extra = config.selftrain.rounds or config.data.pseudo_label_dir or config.data.extra_labelled_dir
    if config.data.extra_min_lesion_fraction and not mixes_extra:
        raise UserError(
            "data.extra_min_lesion_fraction: it filters the pseudo-labelled or extra labelled slices, and "
            "this config mixes in neither (selftrain.rounds, data.pseudo_label_dir, data.extra_labelled_dir)"
        )
    if config.model.get("batch_norm_by_source") and (
        not mixes_extra or config.model.get("batch_norm_frozen")
    ):
        raise UserError(
            "model.batch_norm_by_source: it splits batches that mix in pseudo-labelled or extra labelled "
            "slices, and this config mixes in neither (selftrain.rounds, data.pseudo_label_dir, "
            "data.extra_labelled_dir) or freezes BatchNorm (model.batch_norm_frozen)"
        )
    reads_pool = config.selftrain.rounds or config.data.pseudo_label_dir or config.consistency.weight
    if config.data.unlabelled_intensity_matching != "none" and not reads_pool:
        raise UserError(
            "data.unlabelled_intensity_matching: only the unlabelled split is matched, and this config does "
            "not read it (selftrain.rounds, data.pseudo_label_dir or consistency.weight)"
        )


def _check_head_and_classes(config) -> None:
    """`model.head`, `data.classes` and the `loss` the head trains with (configs written before the head
    existed mean the binary head)."""
    head = config.model.get("head", "binary")
    if "head" in config.model:
        _require(
            config, "model.head", lambda value: value in config_lib.HEADS, f"one of {list(config_lib.HEADS)}"
        )
    if "classes" in config.data:
        _require(
            config,
            "data.classes",
            lambda names: (
                not isinstance(names, str)
                and len(names) >= 1
                and all(isinstance(name, str) and name.isidentifier() for name in names)
                and len(set(names)) == len(names)
            ),
            "a non-empty tuple of distinct class names (letters, digits, '_')",
        )
        if head == "binary":
            _require(
                config,
                "data.classes",
                lambda names: len(names) == 1,
                "one class name for model.head='binary'",
            )
    choices = losses.LOSSES_BY_HEAD[head]
    for_head = "" if head == "binary" else f" for model.head={head!r}"
    _require(config, "loss", lambda value: value in choices, f"one of {list(choices)}{for_head}")


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
    expected, actual = _structure(config_lib.variant_keys(variant)), _structure(config.model)
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
    _require(config, "data.split_seed", *_NON_NEGATIVE_INT)
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
    _require(config, "data.cv_seed", *_NON_NEGATIVE_INT)
    folds = config.data.cv_folds
    if not folds:
        _require(config, "data.cv_fold", *_NON_NEGATIVE_INT)
        return
    _require(
        config,
        "data.cv_fold",
        lambda value: _is_int(value) and 0 <= value < folds,
        f"an integer in [0, {folds - 1}] (data.cv_folds={folds})",
    )
    # train_full is the whole pool, held-out fold included: training on it would leak.
    reason = "'train' when data.cv_folds > 0 (train_full holds the held-out fold)"
    _require(config, "data.train_split", lambda value: value == "train", reason)
