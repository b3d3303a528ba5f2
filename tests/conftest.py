"""Shared fixtures: a persistent compilation cache and tiny configs, so the suite compiles little."""

import importlib.util
import pathlib

import jax
import pytest

from rdunet_jax import devices, models, steps

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CACHE = REPO_ROOT / ".pytest_cache" / "xla"
# Prepared phantom datasets of the tests, kept out of the user's ~/tensorflow_datasets.
TEST_DATA_DIR = REPO_ROOT / ".pytest_cache" / "tensorflow_datasets"

devices.enable_compilation_cache(str(TEST_CACHE))


def make_tiny_config(**data_overrides):
    """`configs/demo.py:tiny` (4 feature maps, 2 levels, 32 px, 8 phantom slices), with the tests' caches:
    in-process tests and the command-line tests compile the same shapes once."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO_ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.num_epochs = 2
    config.compilation_cache_dir = str(TEST_CACHE)
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
    model = models.build_model(config.model)
    return steps.create_train_state(config, model, steps_per_epoch=2)


@pytest.fixture(scope="session")
def cpu_device():
    return jax.devices("cpu")[0]
