"""The config schema: variants, validation of every key, and a fuzz of invalid configs."""

import ast
import fractions
import functools
import importlib.util
import json
import math
import re

import numpy as np
import pytest
from helpers import REPO_ROOT, config_from_file, make_consistency_config, make_tiny_config, refusal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rdunet_jax import config_lib, config_validation, models, train
from rdunet_jax import losses as losses_lib
from rdunet_jax.errors import UserError

# Keys and values that must be refused, whatever a config file or override sets.
NOT_AN_INT = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans())
INVALID_VALUES = {
    "num_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "data.num_train": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "data.num_validation": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "data.num_test": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "batch_size": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "lr_decay_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "log_every_steps": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "checkpoint_every_steps": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    "checkpoint_every_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "eval.overlay_every_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "eval.validate_every_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), NOT_AN_INT),
    "warmup_epochs": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    "learning_rate": st.one_of(
        st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan), st.none(), st.text(max_size=3)
    ),
    "lr_decay_factor": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.none()),
    "name": st.one_of(st.just(""), st.just(".."), st.text(min_size=1, max_size=5).map(lambda t: t + "/x")),
    "data.image_size": st.one_of(
        st.integers(max_value=0), st.integers(1, 500).filter(lambda n: n % 4), NOT_AN_INT
    ),
    "data.zoom_range": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.none()),
    "data.rotation_degrees": st.one_of(
        st.floats(min_value=180.001), st.floats(max_value=-1e-9), st.none(), st.text(max_size=2)
    ),
    "data.flip": st.one_of(st.integers(), st.none(), st.text(max_size=2)),
    "model.batch_norm_frozen": st.one_of(st.integers(), st.none(), st.text(max_size=2)),
    "model.batch_norm_by_source": st.one_of(st.integers(), st.none(), st.text(max_size=2)),
    "data.unlabelled_intensity_matching": st.one_of(st.integers(), st.none(), st.text(max_size=2)),
    "selftrain.student_batch_size": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    "selftrain.student_seed": st.one_of(
        st.integers(max_value=-2), st.integers(min_value=2**32), st.just(-1.0), NOT_AN_INT
    ),
    "data.train_split": st.text(max_size=6).filter(lambda t: t not in ("train", "train_full")),
    "data.split_fractions": st.one_of(
        st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3).filter(lambda f: abs(sum(f) - 1) > 1e-3),
        st.lists(st.floats(0.01, 1.0), max_size=2),
        st.none(),
    ),
    "data.hu_window": st.one_of(
        st.tuples(st.floats(0, 100), st.floats(-100, 0)), st.tuples(st.integers()), st.none()
    ),
    "model.features": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "model.block": st.text(max_size=8).filter(lambda t: t not in ("plain", "residual")),
    "model.dtype": st.text(max_size=8).filter(lambda t: t not in ("float32", "bfloat16")),
    "model.dropout_rate": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.none()),
    "model.batch_norm_momentum": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.none()),
    "model.skip_dilation_rates": st.one_of(
        st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=4).filter(
            lambda rates: len(rates) != 2
        ),
        st.lists(st.lists(st.integers(-3, 0), min_size=1, max_size=3), min_size=2, max_size=2),
        st.lists(
            st.lists(st.floats(0.5, 3.5).filter(lambda x: x != int(x)), min_size=1), min_size=2, max_size=2
        ),
        st.none(),
    ),
    "model.encoder_dilation_rates": st.one_of(
        st.lists(st.integers(1, 4), min_size=1, max_size=6).filter(lambda rates: len(rates) != 3),
        st.lists(st.integers(-3, 0), min_size=3, max_size=3),
        st.none(),
    ),
    "eval.threshold": st.one_of(st.floats(min_value=1.0), st.floats(max_value=0.0), st.none()),
    "eval.num_overlays": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    "eval.test_time_flips": st.one_of(st.integers(), st.none()),
    "eval.checkpoint": st.text(max_size=8).filter(lambda t: t not in ("best", "last")),
    "loss": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("dice", "dice_bce")), st.none()),
    "model.head": st.one_of(st.text(max_size=10).filter(lambda t: t not in config_lib.HEADS), st.none()),
}


# Each key's requirement in the words its error message uses: '<key>: must be <requirement>, got <value>'.
REQUIREMENTS = {
    "num_epochs": "a positive integer",
    "data.num_train": "a positive integer",
    "data.num_validation": "a positive integer",
    "data.num_test": "a positive integer",
    "batch_size": "a positive integer",
    "lr_decay_epochs": "a positive integer",
    "log_every_steps": "a positive integer",
    "checkpoint_every_steps": "a non-negative integer",
    "checkpoint_every_epochs": "a positive integer",
    "eval.overlay_every_epochs": "a positive integer",
    "eval.validate_every_epochs": "a positive integer",
    "seed": "an integer from 0 to 2**32-1",
    "warmup_epochs": "a non-negative integer",
    "learning_rate": "a positive number",
    "lr_decay_factor": "a positive number",
    "name": "a non-empty name without '/'",
    "data.image_size": "a positive integer",
    "data.zoom_range": "a number in [0, 1)",
    "data.rotation_degrees": "a number of degrees in [0, 180]",
    "data.flip": "True or False",
    "model.batch_norm_frozen": "True or False",
    "model.batch_norm_by_source": "True or False",
    "data.unlabelled_intensity_matching": "one of ['none', 'window', 'histogram']",
    "selftrain.student_batch_size": "a non-negative integer (0: the teacher's batch_size)",
    "selftrain.student_seed": "-1 (the run's seed) or an integer from 0 to 2**32-1",
    "data.train_split": "'train' or 'train_full'",
    "data.split_fractions": "3 positive numbers summing to 1",
    "data.hu_window": "(lower, upper) Hounsfield units with lower < upper",
    "model.features": "a positive integer",
    "model.block": "'plain' or 'residual'",
    "model.dtype": "'float32' or 'bfloat16'",
    "model.dropout_rate": "a number in [0, 1)",
    "model.batch_norm_momentum": "a number in [0, 1)",
    "model.skip_dilation_rates": "() or one schedule of positive integer dilation rates per skip ({depth})",
    "model.encoder_dilation_rates": "() or one positive integer dilation rate per encoder level ({levels})",
    "eval.threshold": "a number in (0, 1)",
    "eval.num_overlays": "a non-negative integer",
    "eval.test_time_flips": "True or False",
    "eval.checkpoint": "'best' or 'last'",
    "loss": "one of ['dice', 'dice_bce', 'dice_weighted', 'dice_bce_weighted']",
    "model.head": "one of ['binary', 'exclusive', 'multilabel']",
}


def _expected_message(key, value, depth):
    """The one-line error a config whose only invalid key is `key` must raise, for a model of `depth`."""
    if key == "data.image_size" and type(value) is int and value > 0:  # an integer the pools cannot halve
        return f"data.image_size: {value} is not divisible by 2**model.depth = {2**depth}"
    requirement = REQUIREMENTS[key].format(depth=depth, levels=depth + 1)
    return f"{key}: must be {requirement}, got {value!r}"


def _set(config, key, value):
    *parents, leaf = key.split(".")
    section = config
    for part in parents:
        section = section[part]
    with section.ignore_type():
        section[leaf] = value


def test_every_variant_and_shipped_config_is_valid():
    for variant in config_lib.MODEL_VARIANTS:
        config_validation.validate(config_lib.apply_model_variant(config_lib.base_config(), variant))
    config_validation.validate(make_tiny_config())


def test_unknown_variant_and_unknown_key_are_named():
    unknown = r"^model.variant: unknown variant 'vnet'; choose one of \['rdunet', 'resdunet', 'residual', "
    with pytest.raises(UserError, match=unknown):
        config_lib.apply_model_variant(config_lib.base_config(), "vnet")
    config = make_tiny_config()
    config.model.variant = "vnet"  # set directly: validation names it the same way
    with pytest.raises(UserError, match=unknown):
        config_validation.validate(config)
    config = make_tiny_config()
    config.num_epoch = 3  # a typo adds a key in a config file; it must not be silently ignored
    with pytest.raises(UserError, match=r"^num_epoch: unknown config key \(did you mean num_epochs\?\)$"):
        config_validation.validate(config)


def test_image_size_must_divide_by_the_pools():
    config = make_tiny_config()
    config.data.image_size = 34
    with pytest.raises(UserError, match=r"^data.image_size: 34 is not divisible by 2\*\*model.depth = 4$"):
        config_validation.validate(config)


def test_the_students_seed_is_the_runs_or_a_seed_of_its_own():
    config = make_tiny_config()
    for value in (-1, 0, 2**32 - 1):
        _set(config, "selftrain.student_seed", value)
        config_validation.validate(config)
    for value in (-1.0, -2, 2**32, True):
        config = make_tiny_config()  # a float set once would make the later ints floats
        _set(config, "selftrain.student_seed", value)
        message = "selftrain.student_seed: must be -1 (the run's seed) or an integer from 0 to 2**32-1, got"
        with pytest.raises(UserError, match=f"^{re.escape(f'{message} {value!r}')}$"):
            config_validation.validate(config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_invalid_configs_end_in_one_line_naming_the_key_and_the_requirement(data):
    key = data.draw(st.sampled_from(sorted(INVALID_VALUES)), label="key")
    value = data.draw(INVALID_VALUES[key], label="value")
    config = make_tiny_config()
    _set(config, key, value)
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    stored = functools.reduce(lambda section, part: section[part], key.split("."), config)
    assert str(raised.value) == _expected_message(key, stored, config.model.depth)  # lists are held as tuples


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["batch_size", "model.depth", "learning_rate", "model.skip_dilation_rates"]))
def test_invalid_config_fails_before_writing_anything(tmp_path, key):
    config = make_tiny_config()
    _set(config, key, {"batch_size": 0, "model.depth": -1, "learning_rate": -1.0}.get(key, ((0,), (1,))))
    workdir = tmp_path / key
    with pytest.raises(UserError):
        train.train_and_evaluate(config, workdir)
    assert not workdir.exists()


def test_setting_the_variant_name_alone_is_refused():
    config = config_lib.base_config()  # the full RDU-net's model keys
    config.model.variant = "unet"
    with pytest.raises(
        UserError, match=r"^model.variant: 'unet' does not match the model keys \(block: residual"
    ):
        config_validation.validate(config)
    config_validation.validate(config_lib.apply_model_variant(config, "unet"))


def test_eval_split_is_named_when_misspelt():
    config = make_tiny_config()
    config.eval.split = "tset"
    with pytest.raises(UserError, match=r"^eval.split: must be"):
        config_validation.validate(config)


def test_apply_overrides_sets_dotted_and_top_level_keys_and_nothing_else():
    config = config_lib.base_config()
    untouched = config_lib.base_config()
    returned = config_lib.apply_overrides(
        config, {"model.dtype": "bfloat16", "data.image_size": 96, "batch_size": 3}
    )
    assert returned is config
    assert (config.model.dtype, config.data.image_size, config.batch_size) == ("bfloat16", 96, 3)
    untouched.model.dtype, untouched.data.image_size, untouched.batch_size = "bfloat16", 96, 3
    assert config.to_dict() == untouched.to_dict()


# The speed options' choices as the README and the experiments name them, written out by hand.
SPEED_CHOICES = {
    "upsample_impl": "one of ['resize', 'stencil']",
    "dropout_impl": "one of ['flax', 'bits']",
    "pool_impl": "one of ['reduce_window', 'reshape']",
    "batch_norm_impl": "one of ['flax', 'closed_form']",
    "dilation_impl": "one of ['auto', 'xla', 'space_to_batch']",
    "remat": "True or False",
}


@pytest.mark.parametrize("key", sorted(SPEED_CHOICES))
@pytest.mark.parametrize("value", ["nearest", 1, None])
def test_bad_speed_option_names_the_key_and_its_choices(key, value):
    """remat=1 is refused too: a choice must have the choice's type, not only compare equal to it."""
    config = make_tiny_config()
    _set(config, f"model.{key}", value)
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value) == f"model.{key}: must be {SPEED_CHOICES[key]}, got {value!r}"
    assert sorted(config_lib.SPEED_OPTIONS) == sorted(SPEED_CHOICES)


def test_upgrade_gives_a_config_saved_before_the_speed_options_the_forms_it_ran_with():
    saved = {"name": "old_run", "model": {"features": 16, "pool_impl": "reshape"}}  # a config.json's JSON
    upgraded = config_lib.upgrade(saved)
    assert upgraded["model"] == {
        "features": 16,
        "pool_impl": "reshape",  # a key the config has stays as it is
        "upsample_impl": "resize",
        "dropout_impl": "flax",
        "batch_norm_impl": "flax",
        "remat": False,
        "dilation_impl": "auto",
    }
    assert saved["model"] == {"features": 16, "pool_impl": "reshape"}  # the saved config is not changed
    config = config_lib.base_config()
    with config.unlocked():
        del config.model.batch_norm_impl
    config.lock()  # as ml_collections' flags hand a config over
    upgraded = config_lib.upgrade(config)
    assert upgraded.model.batch_norm_impl == "flax" and upgraded.model.upsample_impl == "stencil"
    assert "batch_norm_impl" not in config.model
    config_validation.validate(upgraded)


@pytest.mark.parametrize(
    "head, classes, loss",
    [
        ("binary", ("lesion",), "dice"),
        ("exclusive", ("ggo", "consolidation"), "dice_ce"),
        ("multilabel", ("lungs", "infection"), "dice_bce"),
    ],
)
def test_each_head_with_its_classes_and_loss_is_valid(head, classes, loss):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = head, classes, loss
    config_validation.validate(config)


@pytest.mark.parametrize(
    "head, classes, loss, message",
    [
        (
            "binary",
            ("ggo", "consolidation"),
            "dice",
            "data.classes: must be one class name for model.head='binary'",
        ),
        ("exclusive", (), "dice", "data.classes: must be a non-empty tuple of distinct class names"),
        (
            "exclusive",
            ("ggo", "ggo"),
            "dice",
            "data.classes: must be a non-empty tuple of distinct class names",
        ),
        (
            "exclusive",
            ("ground glass",),
            "dice",
            "data.classes: must be a non-empty tuple of distinct class names",
        ),
        ("exclusive", "ggo", "dice", "data.classes: must be a non-empty tuple of distinct class names"),
        (
            "exclusive",
            ("ggo",),
            "dice_bce",
            "loss: must be one of ['dice', 'dice_ce'] for model.head='exclusive'",
        ),
        (
            "multilabel",
            ("lungs",),
            "dice_ce",
            "loss: must be one of ['dice', 'dice_bce'] for model.head='multilabel'",
        ),
    ],
)
def test_head_classes_and_loss_mismatches_are_named(head, classes, loss, message):
    config = make_tiny_config()
    config.model.head, config.loss = head, loss
    _set(config, "data.classes", classes)
    with pytest.raises(UserError) as error:
        config_validation.validate(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_config_written_before_heads_existed_is_a_binary_one():
    config = make_tiny_config()
    del config.model["head"]
    del config.data["classes"]
    config_validation.validate(config)
    config.loss = "dice_ce"
    binary_losses = r"\['dice', 'dice_bce', 'dice_weighted', 'dice_bce_weighted'\]"
    with pytest.raises(UserError, match=rf"^loss: must be one of {binary_losses}, got 'dice_ce'$"):
        config_validation.validate(config)


@pytest.mark.parametrize(
    "file_name, head, classes",
    [
        ("semiseg_multiclass.py", "exclusive", ("ggo", "consolidation")),
        ("ma2020_lungs.py", "multilabel", ("lungs", "infection")),
    ],
)
def test_the_multiclass_configs_are_valid_and_name_their_classes(file_name, head, classes):
    config = config_from_file(file_name)
    config_validation.validate(config)
    assert (config.model.head, tuple(config.data.classes)) == (head, classes)


# The paper's training setup (Amer, Ye, Janan, ICCVW 2021), as issue 23 and the README record it. The
# PDF is not in the repository: these are its settings in our words, not its sentences.
PAPER_SETUP = (
    "350 epochs; Adam, learning rate 1e-3 divided by 10 every 20 epochs; batch size 8; dropout 0.5; "
    "Dice loss; augmentation by random flips and random zoom in [0.9, 1.1]; 256x256 inputs; 16 feature "
    "maps doubling at each of four down-samplings; squeeze-and-excitation with reduction 8; DC modules "
    "of dilation rates (1,2,3,3,2,1) on the two shallowest skip connections and (1,2,2,1) on the two "
    "deepest"
)


def _rdunet_recipe():
    return config_from_file("rdunet.py")


@pytest.mark.parametrize("make_config", [config_lib.base_config, _rdunet_recipe], ids=["base", "rdunet.py"])
def test_the_defaults_are_the_papers_training_setup(make_config):
    config = make_config()
    assert config.num_epochs == 350, PAPER_SETUP
    assert (config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor) == (1e-3, 20, 0.1)
    assert config.batch_size == 8
    assert config.model.dropout_rate == 0.5
    assert config.loss == "dice" and losses_lib.LOSSES[config.loss] is losses_lib.soft_dice_loss
    assert config.data.flip is True and config.data.rotation_degrees == 0.0
    assert (1 - config.data.zoom_range, 1 + config.data.zoom_range) == pytest.approx((0.9, 1.1))
    assert config.data.image_size == 256
    model = config.model
    assert (model.variant, model.block, model.use_se) == ("rdunet", "residual", True)
    assert (model.features, model.depth, model.se_reduction) == (16, 4, 8)
    assert [tuple(rates) for rates in model.skip_dilation_rates] == [
        (1, 2, 3, 3, 2, 1),
        (1, 2, 3, 3, 2, 1),
        (1, 2, 2, 1),
        (1, 2, 2, 1),
    ]
    assert tuple(model.encoder_dilation_rates) == ()

    # The built model, read from its parameters: widths 16 to 256, Dense C -> C/8 in every
    # squeeze-and-excitation unit, six convolutions in the DC modules of the two shallowest skips
    # (16 and 32 channels) and four in the two deepest (64 and 128).
    built = models.build_model(model)
    assert built.dropout_rate == 0.5
    params = models.abstract_variables(built, 16)["params"]
    blocks = [params[f"EncoderDecoderBlock_{index}"] for index in range(2 * model.depth + 1)]
    encoder_widths = [
        block["ResidualBlock_0"]["DoubleConv_0"]["Conv_1"]["kernel"].shape[-1] for block in blocks
    ]
    assert encoder_widths[:5] == [16, 32, 64, 128, 256]
    for block in blocks:
        width = block["ResidualBlock_0"]["DoubleConv_0"]["Conv_1"]["kernel"].shape[-1]
        assert block["SqueezeExcitation_0"]["Dense_0"]["kernel"].shape == (width, width // 8)
    cascades = {
        module["Conv_0"]["kernel"].shape[-1]: sum(name.startswith("Conv_") for name in module)
        for name, module in params.items()
        if name.startswith("DilatedCascade_")
    }
    assert cascades == {16: 6, 32: 6, 64: 4, 128: 4}


def test_validation_counts_mixed_rows_as_the_input_pipeline_does():
    from rdunet_jax import input_pipeline

    for batch_size in range(1, 17):
        for fraction in [step * 0.03 for step in range(34)]:
            expected = input_pipeline.pseudo_per_batch(batch_size, fraction)
            assert config_validation._mixed_rows(batch_size, fraction) == expected, (batch_size, fraction)


def test_the_reference_documents_every_config_key_and_no_other():
    """docs/reference.md's "Config keys" table names each key of `base_config()` (several may share a row)."""
    text = (REPO_ROOT / "docs" / "reference.md").read_text()
    table = text.split("\n## Config keys\n")[1].split("\n## ")[0]
    documented = {
        key
        for line in table.splitlines()
        if line.startswith("| `")
        for key in re.findall(r"`([^`]+)`", line.split("|")[1])
    }
    keys = set(config_lib.flatten(config_lib.to_json(config_lib.base_config())))
    assert (sorted(keys - documented), sorted(documented - keys)) == ([], [])  # (undocumented, unknown)


def _documented_value(cell: str):
    """A default as the reference table writes it: `word` or a bare word, '' , True/False, a number, a tuple,
    and `(rates)x2` for a schedule repeated on two skips."""
    cell = cell.strip().strip("`")
    repeated = re.sub(r"(\([^()]*\))x2", r"\1, \1", cell)  # (1,2,2,1)x2 -> (1,2,2,1), (1,2,2,1)
    if repeated != cell:
        cell = f"({repeated})"
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return cell  # a bare word or path


def _as_tuples(value):
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def test_the_reference_tables_defaults_are_base_configs():
    """docs/reference.md's "Config keys" table's default column, read by hand-written rules, is
    `base_config()`'s value of every key (a changed default is a changed documented behaviour)."""
    text = (REPO_ROOT / "docs" / "reference.md").read_text()
    table = text.split("\n## Config keys\n")[1].split("\n## ")[0]
    defaults = config_lib.flatten(config_lib.to_json(config_lib.base_config()))
    checked = 0
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, default_cell = line.split(" | ")[:2]
        keys = re.findall(r"`([^`]+)`", keys_cell)
        # Several keys share a row as `a`, `b`: their defaults are split at the commas outside brackets.
        cells = re.split(r",\s*(?![^()]*\))", default_cell) if len(keys) > 1 else [default_cell]
        assert len(cells) == len(keys), line
        for key, cell in zip(keys, cells, strict=True):
            expected = _documented_value(cell)
            assert _as_tuples(defaults[key]) == _as_tuples(expected), (key, cell)
            checked += 1
    assert checked == len(defaults)


# --- Self-training, mixed-in sources and consistency training: whole messages, written out by hand -------


def _refusal(config, changes: dict) -> str:
    """The whole message of the UserError validation raises once each dotted key of `changes` is set."""
    for key, value in changes.items():
        _set(config, key, value)
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    return str(raised.value)


def _selftrain_config():
    """The tiny config with one self-training round over 6 unlabelled slices (student batch: batch_size 4)."""
    config = make_tiny_config(num_unlabelled=6)
    config.selftrain.rounds = 1
    return config


@pytest.mark.parametrize(
    "make_config, changes, message",
    [
        (
            _selftrain_config,
            {"data.pseudo_label_dir": None},
            "data.pseudo_label_dir: must be a path string ('' for off), got None",
        ),
        (
            make_tiny_config,
            {"data.extra_labelled_dir": 0},
            "data.extra_labelled_dir: must be a path string ('' for off), got 0",
        ),
        (
            _selftrain_config,
            {"data.extra_labelled_dir": "ma2020", "loss": "dice_weighted"},
            "data.extra_labelled_dir: self-training's student mixes in pseudo-labels, which cannot be mixed "
            "in together with other labelled slices; set selftrain.rounds=0 for joint training",
        ),
        (
            _selftrain_config,
            {"selftrain.confidence_threshold": 1.0},
            "selftrain.confidence_threshold: must be a probability in [0.5, 1), got 1.0",
        ),
        (
            _selftrain_config,
            {"selftrain.student_lr_decay_epochs": 0},
            "selftrain.student_lr_decay_epochs: must be a positive integer, got 0",
        ),
        (
            _selftrain_config,
            {"selftrain.student_num_epochs": 1.5},
            "selftrain.student_num_epochs: must be a positive integer, got 1.5",
        ),
        (
            _selftrain_config,
            {"selftrain.student_batch_size": 1},
            "data.pseudo_fraction: 0.5 of the student's batch of 1 (selftrain.student_batch_size, else "
            "batch_size) rounds to no pseudo-labelled row",
        ),
        (
            make_consistency_config,
            {"batch_size": 1},
            "data.unlabelled_fraction: 0.5 of a batch of 1 rounds to no unlabelled row",
        ),
        (
            make_consistency_config,
            {"consistency.noise_std": math.inf},
            "consistency.noise_std: must be a non-negative number, got inf",
        ),
        (
            make_consistency_config,
            {"model.head": "exclusive", "data.classes": ("ggo", "consolidation"), "loss": "dice"},
            "consistency.weight: mean teacher is built for model.head='binary', got 'exclusive'",
        ),
        (
            _selftrain_config,
            {"model.head": "exclusive", "data.classes": ("ggo", "consolidation"), "loss": "dice"},
            "selftrain.rounds: pseudo-labels are lesion masks, for model.head='binary', got 'exclusive'",
        ),
        (
            make_tiny_config,
            {"data.extra_min_lesion_fraction": 0.05},
            "data.extra_min_lesion_fraction: it filters the pseudo-labelled or extra labelled slices, and "
            "this config mixes in neither (selftrain.rounds, data.pseudo_label_dir, data.extra_labelled_dir)",
        ),
        *(
            (
                make_config,
                {"model.batch_norm_by_source": True, **changes},
                "model.batch_norm_by_source: it splits batches that mix in pseudo-labelled or extra labelled "
                "slices, and this config mixes in neither (selftrain.rounds, data.pseudo_label_dir, "
                "data.extra_labelled_dir) or freezes BatchNorm (model.batch_norm_frozen)",
            )
            for make_config, changes in (
                (make_tiny_config, {}),
                (make_consistency_config, {}),  # mean teacher's unlabelled rows are not split
                (_selftrain_config, {"model.batch_norm_frozen": True}),
            )
        ),
    ],
)
def test_semi_supervised_refusals_are_one_whole_line(make_config, changes, message):
    assert _refusal(make_config(), changes) == message


def test_semi_supervised_keys_accept_their_bounds_and_choices():
    config = _selftrain_config()
    config.selftrain.confidence_threshold = 0.5  # a probability in [0.5, 1): 0.5 keeps every pixel
    config.selftrain.weighting = "confidence"
    # The student filters its pseudo-labelled slices and reads the pool matched to the labelled slices.
    config.data.extra_min_lesion_fraction, config.data.unlabelled_intensity_matching = 0.05, "window"
    config.model.batch_norm_by_source = True  # the student's batches mix in pseudo-labelled slices
    config_validation.validate(config)
    joint = make_tiny_config()
    joint.data.extra_labelled_dir, joint.model.batch_norm_by_source = "/data/ma2020", True
    joint.loss = "dice_weighted"
    config_validation.validate(joint)
    config = make_consistency_config()
    config.consistency.confidence_threshold = 0.5
    config.data.unlabelled_intensity_matching = "histogram"  # consistency training reads the pool too
    config_validation.validate(config)


def test_a_config_written_before_heads_existed_may_self_train_or_train_for_consistency():
    for config in (_selftrain_config(), make_consistency_config()):
        del config.model["head"]
        config_validation.validate(config)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data.cv_folds": 1}, "data.cv_folds: must be 0 (off) or an integer >= 2, got 1"),
        (
            {"data.cv_folds": 5, "data.cv_fold": 5},
            "data.cv_fold: must be an integer in [0, 4] (data.cv_folds=5), got 5",
        ),
        (
            {"data.cv_folds": 5, "data.train_split": "train_full", "eval.checkpoint": "last"},
            "data.train_split: must be 'train' when data.cv_folds > 0 (train_full holds the held-out fold), "
            "got 'train_full'",
        ),
        (
            {"data.train_split": "train_full"},  # its validation slices are training slices
            "eval.checkpoint: must be 'last' when data.train_split=train_full, got 'best'",
        ),
        ({"data.split_scheme": "volumes"}, "data.split_scheme: must be 'random' or 'blocks', got 'volumes'"),
        (
            {"data.split_fractions": (0.0, 0.5, 0.5)},
            "data.split_fractions: must be 3 positive numbers summing to 1, got (0.0, 0.5, 0.5)",
        ),
        (  # thirds that are not int or float (a config file may hold any Python value)
            {"data.split_fractions": (fractions.Fraction(1, 3),) * 3},
            "data.split_fractions: must be 3 positive numbers summing to 1, got (Fraction(1, 3), "
            "Fraction(1, 3), Fraction(1, 3))",
        ),
    ],
)
def test_split_refusals_are_one_whole_line(changes, message):
    assert _refusal(make_tiny_config(), changes) == message


def test_two_folds_are_the_fewest_cross_validation_takes():
    config = make_tiny_config(cv_folds=2, cv_fold=1)
    config_validation.validate(config)


@pytest.mark.parametrize(
    "variant, differences",
    [
        (
            "unet",
            "block: residual (variant: plain); use_se: True (variant: False); "
            "DC modules on the skips: True (variant: False)",
        ),
        (
            "resdunet",
            "DC modules on the skips: True (variant: False); encoder dilation: False (variant: True)",
        ),
    ],
)
def test_a_variant_name_that_does_not_match_the_model_keys_lists_each_difference(variant, differences):
    config = config_lib.base_config()  # the full RDU-net's model keys
    config.model.variant = variant
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value) == (
        f"model.variant: {variant!r} does not match the model keys ({differences}); "
        f"choose a variant with the config argument, e.g. configs/rdunet.py:{variant}"
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "."}, "name: must be a non-empty name without '/', got '.'"),
        ({"compilation_cache_dir": 3}, "compilation_cache_dir: must be a path string ('' for off), got 3"),
        ({"model_init": 3}, "model_init: must be a string, got 3"),
        (
            {"data.rotation_degrees": 181},
            "data.rotation_degrees: must be a number of degrees in [0, 180], got 181.0",
        ),
        ({"eval.threshold": 0}, "eval.threshold: must be a number in (0, 1), got 0.0"),
        (
            {"eval.split": "tset"},
            "eval.split: must be 'train', 'validation', 'test' or 'train_full', got 'tset'",
        ),
        # 36 divides by 2 * depth but not by 2 ** depth: the pools halve the image depth times.
        (
            {"model.depth": 3, "data.image_size": 36},
            "data.image_size: 36 is not divisible by 2**model.depth = 8",
        ),
    ],
)
def test_key_refusals_are_one_whole_line(changes, message):
    assert _refusal(make_tiny_config(), changes) == message


@pytest.mark.parametrize(
    "changes",
    [
        {"model.dtype": "bfloat16"},
        {"data.rotation_degrees": 180},
        *({"eval.split": split} for split in ("train", "validation", "test", "train_full")),
    ],
    ids=str,
)
def test_keys_accept_their_bounds_and_choices(changes):
    config = make_tiny_config()
    for key, value in changes.items():
        _set(config, key, value)
    config_validation.validate(config)


@pytest.mark.parametrize(
    "key, message",
    [
        # A nested typo is named by its whole dotted path, and so is its nearest known key.
        ("data.imagesize", "data.imagesize: unknown config key (did you mean data.image_size?)"),
        ("zqxj", "zqxj: unknown config key"),  # nothing close: no hint
    ],
)
def test_an_unknown_key_is_named_with_its_nearest_known_key_if_any(key, message):
    # A key the schema lacks, as a config file or override adds it.
    assert _refusal(make_tiny_config(), {key: 1}) == message


def test_a_key_a_config_files_config_lacks_is_named_before_a_run_reads_it():
    # A config file not built on base_config would otherwise fail deep inside a run with a KeyError.
    config = make_tiny_config()
    with config.unlocked():
        del config.data["rotation_degrees"]
        del config["selftrain"]
    with pytest.raises(UserError) as raised:
        config_validation.check_complete(config)
    assert str(raised.value) == (
        "data.rotation_degrees: missing from the config; build it on rdunet_jax.config_lib.base_config()"
    )
    config_validation.check_complete(make_tiny_config())


@pytest.mark.parametrize(
    "installed, missing", [((), "onnx and onnxruntime"), (("onnx",), "onnxruntime")], ids=["none", "onnx"]
)
def test_onnxruntime_without_its_packages_says_which_to_install(monkeypatch, installed, missing):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: find_spec(name) if name in installed else None
    )
    config = make_tiny_config()
    config.eval.runtime = "onnxruntime"
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value) == (
        f"eval.runtime: 'onnxruntime' needs {missing}, not installed: pip install -e '.[onnx]'"
    )


@pytest.mark.parametrize("mode", ["evaluate", "export", "predict"])
def test_a_runs_model_is_scored_exported_and_run_only_with_its_data_settings(tmp_path, mode):
    from rdunet_jax import evaluate, onnx_export, predict

    config = make_tiny_config()
    config.data.cv_folds, config.data.cv_fold = 5, 0
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_json(config)))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "slice.png")
    calls = {
        "evaluate": lambda changed: evaluate.evaluate_workdir(changed, tmp_path),
        "export": lambda changed: onnx_export.export_workdir(changed, tmp_path, tmp_path / "model.onnx"),
        "predict": lambda changed: predict.predict_path(
            changed, tmp_path, tmp_path / "slice.png", tmp_path / "out"
        ),
    }
    other_fold = config.copy_and_resolve_references()
    other_fold.data.cv_fold = 1  # its training slices
    assert refusal(calls[mode], other_fold) == (
        f"data.cv_fold: 0 in {tmp_path / 'config.json'}, 1 now; --mode={mode} takes the run's data settings "
        "(data paths, augmentation and eval.* may differ)"
    )
    larger = config.copy_and_resolve_references()
    larger.data.image_size = 64
    assert refusal(calls[mode], larger).startswith("data.image_size: 32 in ")
    # Paths and evaluation settings may change: the checks pass, and the missing checkpoint is what stops.
    moved = config.copy_and_resolve_references()
    moved.data.data_dir, moved.eval.split, moved.eval.threshold = str(tmp_path / "x"), "validation", 0.4
    moved.data.zoom_range, moved.data.intensity_range = 0.3, 0.1  # a self-trained student's augmentation
    config_lib.check_run_data(moved, tmp_path, mode)
    config_lib.check_run_data(other_fold, tmp_path / "no_record", mode)  # a folder without config.json


def test_a_run_recorded_before_the_speed_options_differs_from_todays_forms_and_matches_the_ones_it_ran(
    tmp_path,
):
    # Its config.json lacks the speed keys: it ran their `before_key` forms, not today's defaults, so
    # resuming it with today's defaults would continue with other dropout masks and layer forms.
    stored = config_lib.to_json(config_lib.base_config())
    for key in config_lib.SPEED_OPTIONS:
        del stored["model"][key]
    today = config_lib.base_config()
    # Hand-listed: the options whose default is no longer the form they replaced.
    changed = ["model.batch_norm_impl", "model.dropout_impl", "model.pool_impl", "model.upsample_impl"]
    assert config_lib.differing_keys(stored, config_lib.to_json(today)) == changed
    as_it_ran = config_lib.base_config()
    with as_it_ran.unlocked():
        for key, option in config_lib.SPEED_OPTIONS.items():
            as_it_ran.model[key] = option.before_key
    assert config_lib.differing_keys(stored, config_lib.to_json(as_it_ran)) == []
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UserError) as refused:
        config_lib.check_against_run(today, tmp_path, lambda key, before, now: True, "why")
    now = today.model.batch_norm_impl
    assert (
        str(refused.value) == f"model.batch_norm_impl: 'flax' in {tmp_path / 'config.json'}, {now!r} now; why"
    )
    config_lib.check_against_run(as_it_ran, tmp_path, lambda key, before, now: True, "why")


def test_a_key_added_since_a_run_was_recorded_held_its_default_then():
    # What older code ran: the default of a key it did not have yet, named as the value then.
    stored = config_lib.to_json(config_lib.base_config())
    del stored["data"]["extra_fraction"]
    current = config_lib.base_config()
    default = current.data.extra_fraction
    assert config_lib.changes(stored, config_lib.to_json(current)) == []
    current.data.extra_fraction = 0.25
    assert config_lib.changes(stored, config_lib.to_json(current)) == [("data.extra_fraction", default, 0.25)]
    # A key the schema no longer has: its value then, and none now.
    stored["data"]["retired"] = 3
    assert config_lib.changes(stored, config_lib.to_json(current))[0] == (
        "data.extra_fraction",
        default,
        0.25,
    )
    assert ("data.retired", 3, None) in config_lib.changes(stored, config_lib.to_json(current))


def test_the_json_form_of_a_config_has_its_keys_sorted_at_every_level_and_lists_for_tuples():
    values = config_lib.to_json(config_lib.base_config())

    def check(section):
        assert list(section) == sorted(section)
        for value in section.values():
            assert not isinstance(value, tuple)
            if isinstance(value, dict):
                check(value)

    check(values)
    assert values["data"]["hu_window"] == list(config_lib.base_config().data.hu_window)
