"""The cross-validation run lists of experiments/*_cv_runs.txt (gpu_session.sh's cv phase): every line names a
candidate, a fold, a shipped config and overrides that make a valid config; a GPU session is too short to find
a typo there."""

import pathlib

import pytest

from experiments import common
from rdunet_jax import config_validation

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
RUN_LISTS = sorted(EXPERIMENTS.glob("*_cv_runs.txt"))


@pytest.mark.parametrize("run_list", RUN_LISTS, ids=[path.name for path in RUN_LISTS])
def test_every_line_is_a_valid_config_of_a_fold(run_list):
    lines = [line.split() for line in run_list.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert lines
    for candidate, fold, config_path, *overrides in lines:
        assert 0 <= int(fold) < 5 and candidate
        assert all(override.startswith("--config.") and "=" in override for override in overrides), overrides
        settings = [override.removeprefix("--config.") for override in overrides]
        config = common.load_config(str(EXPERIMENTS.parent / config_path), settings)
        config.data.cv_folds, config.data.cv_fold, config.eval.split = 5, int(fold), "validation"
        config_validation.validate(config)
