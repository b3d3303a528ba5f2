"""Shared fixtures: a persistent compilation cache and tiny configs, so the suite compiles little."""

import pathlib

import jax
import pytest

from rdunet_jax import config_lib, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CACHE = REPO_ROOT / ".pytest_cache" / "xla"
# Prepared phantom datasets of the tests, kept out of the user's ~/tensorflow_datasets.
TEST_DATA_DIR = REPO_ROOT / ".pytest_cache" / "tensorflow_datasets"

train.enable_compilation_cache(str(TEST_CACHE))


def make_tiny_config(**data_overrides):
    """A few-second config of the full model: 4 feature maps, 2 levels, 32 px, 8 phantom slices."""
    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.name = "tiny"
    config.num_epochs = 2
    config.batch_size = 4
    config.learning_rate = 1e-2
    config.log_every_steps = 1
    config.compilation_cache_dir = str(TEST_CACHE)
    config.model.features = 4
    config.model.depth = 2
    config.model.skip_dilation_rates = ((1, 2, 1), (1, 2, 1))
    config.data.image_size = 32
    config.data.num_train = 8
    config.data.num_validation = 4
    config.data.num_test = 4
    config.data.data_dir = str(TEST_DATA_DIR)
    config.data.update(data_overrides)
    return config


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_state():
    """A freshly initialised train state of the tiny config (built once per session)."""
    config = make_tiny_config()
    model = train.setup_run(config)
    return train.create_train_state(config, model, steps_per_epoch=2)


@pytest.fixture(scope="session")
def cpu_device():
    return jax.devices("cpu")[0]
