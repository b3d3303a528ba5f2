"""The config schema: defaults for every key, the paper's model variants, the speed options.

Config files under `configs/` start from `base_config()` and change only what their recipe needs, so
every run's config has the same keys and `--config.KEY=VALUE` overrides work everywhere. The checks of
each key are in config_validation.py.
"""

import contextlib
import copy
import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

import ml_collections

from rdunet_jax import heads, input_pipeline, layers, orientation
from rdunet_jax.errors import UserError

# The paper's DC-module schedules, one per skip from shallow to deep, and ResDUNet's encoder rates.
PAPER_SKIP_DILATION_RATES = ((1, 2, 3, 3, 2, 1), (1, 2, 3, 3, 2, 1), (1, 2, 2, 1), (1, 2, 2, 1))
RESDUNET_ENCODER_DILATION_RATES = (4, 3, 2, 1, 1)

# The paper's model family, by name: each entry is a set of `model.*` overrides.
MODEL_VARIANTS = {
    "unet": dict(block="plain", use_se=False, skip_dilation_rates=(), encoder_dilation_rates=()),
    "residual": dict(block="residual", use_se=False, skip_dilation_rates=(), encoder_dilation_rates=()),
    "residual_se": dict(block="residual", use_se=True, skip_dilation_rates=(), encoder_dilation_rates=()),
    "rdunet": dict(
        block="residual",
        use_se=True,
        skip_dilation_rates=PAPER_SKIP_DILATION_RATES,
        encoder_dilation_rates=(),
    ),
    "resdunet": dict(
        block="residual",
        use_se=True,
        skip_dilation_rates=(),
        encoder_dilation_rates=RESDUNET_ENCODER_DILATION_RATES,
    ),
}


@dataclasses.dataclass(frozen=True)
class SpeedOption:
    """A `model.*` key that changes speed and memory but never the parameters (so checkpoints are shared):
    its choices, and the value a config saved before the key existed ran with (not today's default)."""

    choices: tuple
    before_key: Any


# Every speed option (the forms are in rdunet_jax/layers.py; their defaults and figures in base_config).
SPEED_OPTIONS = {
    "upsample_impl": SpeedOption(tuple(layers.UPSAMPLINGS), before_key="resize"),
    "dropout_impl": SpeedOption(tuple(layers.DROPOUTS), before_key="flax"),
    "pool_impl": SpeedOption(tuple(layers.POOLS), before_key="reduce_window"),
    "batch_norm_impl": SpeedOption(tuple(layers.NORMS), before_key="flax"),
    "remat": SpeedOption((False, True), before_key=False),
    "dilation_impl": SpeedOption(("auto", *layers.CONVOLUTIONS), before_key="auto"),
}


def speed_options(model_config) -> dict:
    """The speed options a `model` section runs with: its own values, and for each key the section
    predates, the value it ran with."""
    return {key: model_config.get(key, option.before_key) for key, option in SPEED_OPTIONS.items()}


def upgrade(config):
    """A copy of a saved config (ConfigDict or its JSON dict) with each speed option it predates set to
    the value it ran with, so that it describes the run it records."""
    upgraded = copy.deepcopy(config)
    if "model" not in upgraded:
        return upgraded
    model = upgraded["model"]
    unlocked = model.unlocked() if isinstance(model, ml_collections.ConfigDict) else contextlib.nullcontext()
    with unlocked:
        for key, value in speed_options(model).items():
            if key not in model:
                model[key] = value
    return upgraded


# `model.head` choices: see base_config.
HEADS = heads.HEADS
DEFAULT_CLASSES = ("lesion",)
# Keys that change how often a run logs, draws overlays and saves, or where it caches compiled programs:
# never what it computes (resume is exact), so a finished run or stage counts as the same run without them.
BOOKKEEPING_KEYS = (
    "compilation_cache_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "checkpoint_every_epochs",
    "eval.num_overlays",
    "eval.overlay_every_epochs",
)

# Consistency regularisation on the unlabelled split (`consistency.method`).
CONSISTENCY_METHODS = ("mean_teacher", "fixmatch")

# How the unlabelled pool's intensities are matched to the labelled slices' (datasets/intensity_matching.py).
INTENSITY_MATCHING_MODES = ("none", "window", "histogram")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, at the paper's values where the paper gives one."""
    config = ml_collections.ConfigDict()
    config.name = "rdunet"
    config.seed = 0
    # A run folder whose scored checkpoint's parameters and BatchNorm statistics start training instead of
    # random ones (fine-tuning a pretrained model, e.g. one trained on another dataset); the optimizer, its
    # schedule and the data order start fresh. '' initialises at random (`seed`). A run that has its own
    # checkpoint resumes from it.
    config.model_init = ""
    config.num_epochs = 350
    config.batch_size = 8
    config.learning_rate = 1e-3
    config.lr_decay_epochs = 20
    config.lr_decay_factor = 0.1
    # Epochs over which the learning rate rises linearly to the staircase's value (0: none, the paper's):
    # a fresh Adam's first updates are about the learning rate in size for every parameter.
    config.warmup_epochs = 0
    # The training (and validation) loss, a key of losses.LOSSES: 'dice' is the paper's soft Dice,
    # 'dice_bce' adds binary cross-entropy (nnU-Net's default).
    config.loss = "dice"
    config.log_every_steps = 10
    # 0 saves `latest` at the end of each epoch only; N > 0 also every N steps (with the data position).
    config.checkpoint_every_steps = 0
    # `latest` at every N-th epoch end (and the last, and on a stop); a save costs about a second of CPU,
    # as long as a small model's whole epoch on a GPU. A resume repeats the epochs since, bit-identically.
    config.checkpoint_every_epochs = 1
    # '' disables the persistent XLA compilation cache; '~' is expanded.
    config.compilation_cache_dir = "~/.cache/rdunet_jax/xla"

    config.model = ml_collections.ConfigDict()
    config.model.variant = "rdunet"
    config.model.features = 16
    config.model.depth = 4
    config.model.block = "residual"
    config.model.use_se = True
    config.model.se_reduction = 8
    config.model.skip_dilation_rates = PAPER_SKIP_DILATION_RATES
    config.model.encoder_dilation_rates = ()
    config.model.dropout_rate = 0.5
    # Flax's convention (new = momentum * old + (1 - momentum) * batch); Keras' default is 0.99.
    config.model.batch_norm_momentum = layers.BATCH_NORM_MOMENTUM
    # True: BatchNorm normalises by its running statistics in training too and keeps them (fine-tuning):
    # a model trained on batches mixing two datasets' slices depends on those batches' statistics, so
    # batches of one dataset alone shift every layer (issue 27's fine-tuning runs). Not architecture.
    config.model.batch_norm_frozen = False
    # True: a batch mixing sources normalises its labelled rows and the others each by their own statistics,
    # the running ones following the labelled rows' (domain-specific batch statistics; docs/reference.md).
    config.model.batch_norm_by_source = False
    config.model.dtype = "float32"
    # Speed options (SPEED_OPTIONS; forms in layers.py, figures from experiments/README.md) keep the
    # parameters. Configs saved without a key ran its `before_key` form: set it to rerun them to the digit.
    # 'stencil' computes the same bilinear up-sampling as 'resize' (jax.image.resize) to float
    # tolerance, 5% faster per CPU train step at 256 px.
    config.model.upsample_impl = "stencil"
    # 'bits' draws the same Bernoulli dropout masks from fewer random bits: a 2.7% faster train step on a
    # 2-core CPU and 97 MB fewer temporaries. Its masks differ from 'flax' (`nn.Dropout`) for the same key.
    config.model.dropout_impl = "bits"
    # Recompute each block's activations in the backward pass: less memory, more time.
    config.model.remat = False
    # 'reshape' computes the same 2x2 max-pooling without XLA's select-and-scatter in the gradient: a
    # 4.6% faster train step on a 2-core CPU, 70 MB fewer temporaries, same loss.
    config.model.pool_impl = "reshape"
    # 'space_to_batch' computes the same dilated convolutions over the input's phases, whose gradient
    # XLA hands to cuDNN's fast kernels on a GPU (H200: 14.4 against 0.45 ms for a 16-channel 256x256
    # layer, batch 8, bfloat16; 2.8x slower on a CPU); 'auto' picks it on GPUs and 'xla' elsewhere.
    config.model.dilation_impl = "auto"
    # 'closed_form' is nn.BatchNorm with the textbook gradient written out (a custom VJP, first-order
    # reverse mode only): the same function to float tolerance, a 7.8% faster train step on a 2-core
    # CPU, 207 MB fewer temporaries.
    config.model.batch_norm_impl = "closed_form"
    # The output head: 'binary' (one sigmoid channel, the paper's), 'exclusive' (softmax over background
    # and the classes of `data.classes`: one class per pixel) or 'multilabel' (one sigmoid per class:
    # classes may overlap, e.g. lungs and infection inside them).
    config.model.head = "binary"

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
    # Class names, one per foreground value of the label map (value k is class k, 0 is background): the
    # keys of per-class metrics. A 'binary' head has one class, the lesion.
    config.data.classes = DEFAULT_CLASSES
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
    # Extra slices (pseudo-labelled or Ma et al.'s) whose mask covers less than this share of the slice
    # are left out (0 keeps all): the expert-labelled slices are 14% lesion, every one holding some, the
    # pool's pseudo-labels 3.6% (16% of them none) and Ma et al.'s 1.8%.
    config.data.extra_min_lesion_fraction = 0.0
    # Mean teacher: this share of each training batch is unlabelled slices (weight 0 in the supervised
    # loss), which only the consistency term (`consistency.*`) learns from.
    config.data.unlabelled_fraction = 0.0
    # Match each unlabelled slice's intensities to the labelled training slices' (semiseg's pool is mostly
    # stored in another display window): 'none', 'window' (a linear map of the 5th and 95th percentiles)
    # or 'histogram' (cumulative histogram matching); datasets/intensity_matching.py.
    config.data.unlabelled_intensity_matching = "none"
    # Random contrast and brightness change of up to this much (0 = off): the student's extra noise.
    config.data.intensity_range = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.threshold = 0.5
    config.eval.batch_size = 16
    # Which checkpoint training evaluates at its end: 'best' (lowest validation loss) or 'last' (the final
    # epoch). Under cross-validation 'best' picks the epoch on the held-out fold it is scored on; 'last' not.
    config.eval.checkpoint = "best"
    # Validate (and keep the `best` checkpoint) after every n-th epoch and the last one. Validation does not
    # touch the train state, so with eval.checkpoint 'last' this changes only the log: the same weights to
    # the bit. With 'best', the best is chosen among the validated epochs.
    config.eval.validate_every_epochs = 1
    # Average the probabilities of the identity, left-right, up-down and both flips (nnU-Net mirroring).
    config.eval.test_time_flips = False
    # Ground-truth lesions below this area are "small" in the lesion-size table: mm^2 when the data
    # carries pixel spacing (nifti), pixels at data.image_size otherwise.
    config.eval.small_lesion_area = 100.0
    # Best and worst slices drawn as overlays by evaluation (and slices per volume by prediction).
    config.eval.num_overlays = 4
    # TensorBoard's overlays are predicted again with flips: every epoch they took a fifth of a CPU run's
    # wall time (1.9 s of 12 at 128 px, experiments/epoch_overhead.py), for images that change little.
    config.eval.overlay_every_epochs = 10
    # What runs the model in evaluation (--mode evaluate, and after training) and --mode predict: 'jax'
    # (XLA), or 'onnxruntime' (the model exported to ONNX, on the CPU: 0.66x XLA's time per slice on 2
    # cores, probabilities within 1e-5 of XLA's; needs the `onnx` extra). Training always runs in JAX.
    config.eval.runtime = "jax"

    # Teacher-student self-training (rdunet_jax/selftrain.py): 0 rounds is plain training; each round
    # pseudo-labels the unlabelled split with the previous model (flip TTA) and trains a student
    # (`student_init`) on the labelled slices plus those pseudo-labels.
    config.selftrain = ml_collections.ConfigDict()
    config.selftrain.rounds = 0
    # A pixel is confident in the label the mask gives it: lesion with p >= t, background with p <= 1 - t.
    config.selftrain.confidence_threshold = 0.9
    # 'threshold': weight 1 on confident pixels; 'confidence': weight |2p - 1| on them; 0 elsewhere.
    config.selftrain.weighting = "threshold"
    config.selftrain.student_num_epochs = 150
    config.selftrain.student_lr_decay_epochs = 75
    config.selftrain.student_intensity_range = 0.1
    # 'scratch' (Noisy Student's); 'teacher': from the weights that made its pseudo-labels, a fresh optimizer.
    config.selftrain.student_init = "scratch"
    # The student's batch (0: `batch_size`); a larger one adds the pseudo-labelled rows on top of the
    # labelled ones: batch 5 with data.pseudo_fraction 0.2 is 4 labelled + 1 pseudo-labelled slice a step.
    config.selftrain.student_batch_size = 0
    # The student's `seed` (-1: the run's), to draw the student again from the same teacher.
    config.selftrain.student_seed = -1

    # Mean teacher (rdunet_jax/mean_teacher.py): 0 trains without it; > 0 weighs the consistency between
    # the student (the batch plus Gaussian noise of `noise_std`) and the moving average of its parameters
    # (`ema_decay`), ramped up over `rampup_epochs`; needs data.unlabelled_fraction > 0 and a weighted loss.
    config.consistency = ml_collections.ConfigDict()
    config.consistency.weight = 0.0
    config.consistency.ema_decay = 0.99
    config.consistency.rampup_epochs = 20
    config.consistency.noise_std = 0.05
    # 'fixmatch' (rdunet_jax/fixmatch.py) in place of the moving average: the model's own pseudo-labels of
    # the batch, kept where at least `confidence_threshold` sure either way, teach its predictions of the
    # batch's strong view (contrast and brightness jitter of `strong_intensity_range`, plus the noise);
    # only the slices whose pseudo-label is at least `min_lesion_fraction` lesion teach (0: all).
    config.consistency.method = "mean_teacher"
    config.consistency.confidence_threshold = 0.95
    config.consistency.strong_intensity_range = 0.3
    config.consistency.min_lesion_fraction = 0.0
    return config


def variant_keys(variant: str) -> dict:
    """The `model.*` keys of one of the paper's variants, by name."""
    if variant not in MODEL_VARIANTS:
        raise UserError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    return MODEL_VARIANTS[variant]


def apply_model_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets `config.model` to one of the paper's variants (see `MODEL_VARIANTS`)."""
    overrides = variant_keys(variant)
    config.model.variant = variant
    for key, value in overrides.items():
        config.model[key] = value
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets each dotted key of `overrides` (e.g. {"model.dtype": "bfloat16"}) in `config` (returned).

    Args:
        config: the config to change in place.
        overrides: dotted key -> value; a key without a dot names a top-level key.
    """
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[leaf] = value
    return config


def to_json(config) -> dict:
    """The config as plain JSON values (tuples become lists), keys sorted: what records and stages store."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


# Bookkeeping too when a run is scored with its last checkpoint: it then picks no weights.
LAST_CHECKPOINT_BOOKKEEPING_KEYS = ("eval.validate_every_epochs",)


def computed_keys(values: dict) -> dict:
    """The flat keys of a config's JSON less `BOOKKEEPING_KEYS` (and, for a run scored with its last
    checkpoint, `LAST_CHECKPOINT_BOOKKEEPING_KEYS`): what a run computes depends on these."""
    flat = flatten(values)
    dropped = BOOKKEEPING_KEYS
    if flat.get("eval.checkpoint") == "last":
        dropped += LAST_CHECKPOINT_BOOKKEEPING_KEYS
    return {key: value for key, value in flat.items() if key not in dropped}


def differing_keys(stored: dict, current: dict) -> list[str]:
    """The computed keys (`computed_keys`) in which a run recorded as `stored` (its config's JSON) differs
    from `current`, sorted. A speed option the record predates is the form it ran with (`upgrade`); any other
    key added to the schema since is the same when `current` holds its default (what older code ran); a
    stored key the schema no longer has differs."""
    stored, current = computed_keys(upgrade(stored)), computed_keys(current)
    defaults = flatten(to_json(base_config()))
    changed = {key for key, value in current.items() if stored.get(key, defaults.get(key)) != value}
    return sorted(changed | (set(stored) - set(current)))


# Where a run's data are read from: the same data may sit elsewhere on another machine.
DATA_PATH_KEYS = ("data.data_dir", "data.manual_dir", "data.pseudo_label_dir", "data.extra_labelled_dir")
# Of those, the sources that are off when empty: turning one on or off changes what a run trains on.
OPTIONAL_SOURCE_KEYS = ("data.pseudo_label_dir", "data.extra_labelled_dir")


# The speed options' keys: another form computes the same model to other digits, so they matter for a
# resume (bit-identical) but not for a finished run or stage, which is only evaluated or reused.
SPEED_KEYS = tuple(f"model.{key}" for key in SPEED_OPTIONS)


def makes_another_run(key: str, before, now, finished: bool) -> bool:
    """Whether `key` going from `before` to `now` makes a recorded run (or stage) another one: not data that
    only moved (a path; a source turned on or off does count), nor, for a `finished` run, a speed option."""
    moved = key in DATA_PATH_KEYS and (key not in OPTIONAL_SOURCE_KEYS or bool(before) == bool(now))
    return not moved and not (finished and key in SPEED_KEYS)


# The data settings that decide which slices a split holds and what the model is fed (not augmentation).
SCORED_DATA_KEYS = tuple(
    f"data.{key}"
    for key in (
        *("name", "train_split", "split_fractions", "split_scheme", "split_seed"),
        *("cv_folds", "cv_fold", "cv_seed", "num_train", "num_validation", "num_test"),
        *("image_size", "hu_window", "orientation", "classes"),
    )
)


def changes(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, value then, value now) of each of `differing_keys(stored, current)`, in its order. A key the
    record lacks held its default then, or the form it ran before it existed (`upgrade`)."""
    then, now, defaults = flatten(upgrade(stored)), flatten(current), flatten(to_json(base_config()))
    return [(key, then.get(key, defaults.get(key)), now.get(key)) for key in differing_keys(stored, current)]


def check_against_run(config, workdir, counts, why: str) -> None:
    """UserError naming the first key for which `counts(key, value then, value now)` holds and in which
    `config` differs from the run's recorded `<workdir>/config.json` (nothing when there is none), ending
    in `why`."""
    if not workdir:
        return
    recorded = pathlib.Path(workdir) / "config.json"
    if not recorded.is_file():
        return
    for key, before, now in changes(json.loads(recorded.read_text()), to_json(config)):
        if counts(key, before, now):
            raise UserError(f"{key}: {before!r} in {recorded}, {now!r} now; {why}")


def check_run_data(config, workdir, mode: str) -> None:
    """UserError naming the first of SCORED_DATA_KEYS in which `config` differs from the run's recorded
    config.json: evaluating, exporting or predicting a run's model with others would score slices it
    trained on (another `cv_fold`) or feed it another size, and overwrite its honest metrics."""
    why = f"--mode={mode} takes the run's data settings (data paths, augmentation and eval.* may differ)"
    check_against_run(config, workdir, lambda key, before, now: key in SCORED_DATA_KEYS, why)


def flatten(values: dict, prefix: str = "") -> dict:
    """{'a.b': value} from a config's nested JSON dicts."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_keys(config) -> set[str]:
    """The dotted keys of a config ('a.b')."""
    return set(flatten(to_json(config)))


def config_module(path):
    """The config file at `path` as a module: config files are run by path (`--config`), not imported as
    a package, so one that builds on another (configs/semiseg_*.py on semiseg.py) loads it this way."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
