"""The config schema: variants, validation of every key, and a fuzz of invalid configs."""

import functools
import math

import pytest
from conftest import make_tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdunet_jax import config_lib, train
from rdunet_jax.errors import UserError

# Keys and values that must be refused, whatever a config file or override sets.
NOT_AN_INT = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans())
INVALID_VALUES = {
    "num_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "batch_size": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "lr_decay_epochs": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "log_every_steps": st.one_of(st.integers(max_value=0), NOT_AN_INT),
    "checkpoint_every_steps": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
    "seed": st.one_of(st.integers(max_value=-1), NOT_AN_INT),
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
}


# Each key's requirement in the words its error message uses: '<key>: must be <requirement>, got <value>'.
REQUIREMENTS = {
    "num_epochs": "a positive integer",
    "batch_size": "a positive integer",
    "lr_decay_epochs": "a positive integer",
    "log_every_steps": "a positive integer",
    "checkpoint_every_steps": "a non-negative integer",
    "seed": "a non-negative integer",
    "learning_rate": "a positive number",
    "lr_decay_factor": "a positive number",
    "name": "a non-empty name without '/'",
    "data.image_size": "a positive integer",
    "data.zoom_range": "a number in [0, 1)",
    "data.rotation_degrees": "a number of degrees in [0, 180]",
    "data.flip": "True or False",
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
        config_lib.validate(config_lib.apply_model_variant(config_lib.base_config(), variant))
    config_lib.validate(make_tiny_config())


def test_unknown_variant_and_unknown_key_are_named():
    with pytest.raises(UserError, match="model.variant: unknown variant 'vnet'"):
        config_lib.apply_model_variant(config_lib.base_config(), "vnet")
    config = make_tiny_config()
    config.num_epoch = 3  # a typo adds a key in a config file; it must not be silently ignored
    with pytest.raises(UserError, match=r"^num_epoch: unknown config key \(did you mean num_epochs\?\)$"):
        config_lib.validate(config)


def test_image_size_must_divide_by_the_pools():
    config = make_tiny_config()
    config.data.image_size = 34
    with pytest.raises(UserError, match=r"^data.image_size: 34 is not divisible by 2\*\*model.depth = 4$"):
        config_lib.validate(config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_invalid_configs_end_in_one_line_naming_the_key_and_the_requirement(data):
    key = data.draw(st.sampled_from(sorted(INVALID_VALUES)), label="key")
    value = data.draw(INVALID_VALUES[key], label="value")
    config = make_tiny_config()
    _set(config, key, value)
    with pytest.raises(UserError) as raised:
        config_lib.validate(config)
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
        config_lib.validate(config)
    config_lib.validate(config_lib.apply_model_variant(config, "unet"))


def test_eval_split_is_named_when_misspelt():
    config = make_tiny_config()
    config.eval.split = "tset"
    with pytest.raises(UserError, match=r"^eval.split: must be"):
        config_lib.validate(config)
