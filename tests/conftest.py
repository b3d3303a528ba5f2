"""Shared fixtures: a persistent compilation cache and tiny configs, so the suite compiles little (the
constructors they use are in helpers.py).

A test module's whole-run fixture (a finished tiny run its tests read) is session-scoped, built once a
worker: pytest-xdist's work stealing interleaves modules on a worker, and pytest tears a module-scoped
fixture down whenever the next test comes from another module, so one CI run built the self-training
fixture three times (13-26 s each). Its tests copy the run before changing it, or only rerun it unchanged.
"""

import jax
import pytest
from helpers import ONE_LEVEL, TEST_CACHE, make_tiny_config

from rdunet_jax import devices, models, steps

devices.enable_compilation_cache(str(TEST_CACHE))


def _one_level_tiny_config():
    config = make_tiny_config()
    config.model.update(ONE_LEVEL)
    return config


def _fresh_train_state(config):
    return steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_state():
    """A freshly initialised train state of the tiny config (built once per session)."""
    return _fresh_train_state(make_tiny_config())


@pytest.fixture
def one_level_config():
    """The tiny config at one level (helpers.ONE_LEVEL), for tests whose checks do not depend on the depth."""
    return _one_level_tiny_config()


@pytest.fixture(scope="session")
def one_level_state():
    """A freshly initialised train state of the one-level tiny config (built once per session)."""
    return _fresh_train_state(_one_level_tiny_config())


@pytest.fixture(scope="session")
def cpu_device():
    return jax.devices("cpu")[0]
