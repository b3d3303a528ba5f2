"""Shared test constructors and paths: the tiny config the suite compiles once, and where its caches go."""

import importlib.util
import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CACHE = REPO_ROOT / ".pytest_cache" / "xla"
# Prepared phantom datasets of the tests, kept out of the user's ~/tensorflow_datasets.
TEST_DATA_DIR = REPO_ROOT / ".pytest_cache" / "tensorflow_datasets"
# `--set` items of the experiment scripts' tests: a one-level model of 2 feature maps on 8 phantom slices.
TINY_MODEL = [
    "model.features=2",
    "model.depth=1",
    "model.skip_dilation_rates=[[1]]",
    "data.num_train=8",
    f"data.data_dir={TEST_DATA_DIR}",
]


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


def experiment_command(module: str) -> list[str]:
    """`python -m experiments.<module>` with this interpreter (run it with `checkout_environment()`)."""
    return [sys.executable, "-m", f"experiments.{module}"]


def checkout_environment() -> dict:
    """This environment with this checkout first on PYTHONPATH: a child started in any folder imports this
    checkout's `experiments` and `rdunet_jax`."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
