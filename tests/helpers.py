"""Shared test constructors and paths: the tiny config the suite compiles once, and where its caches go."""

import importlib.util
import os
import pathlib
import subprocess
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
TINY_MODEL_FLAGS = [part for item in TINY_MODEL for part in ("--set", item)]


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


def run_tiny_experiment(module: str, arguments: list[str], folder) -> subprocess.CompletedProcess:
    """`python -m experiments.<module> ARGUMENTS` on the TINY_MODEL in a fresh process started in `folder`;
    fails the test, with the end of its stderr, unless it exits 0."""
    command = [sys.executable, "-m", f"experiments.{module}", *arguments, *TINY_MODEL_FLAGS]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=folder, env=checkout_environment()
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def checkout_environment() -> dict:
    """This environment with this checkout first on PYTHONPATH: a child started in any folder imports this
    checkout's `experiments` and `rdunet_jax`."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
