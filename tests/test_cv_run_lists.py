"""The cross-validation run lists of experiments/*_cv_runs.txt (gpu_session.sh's cv phase): every line names a
candidate, a fold, a shipped config and overrides that make a valid config; a GPU session is too short to find
a typo there."""

import ast
import pathlib

import pytest

from rdunet_jax import config_lib, config_validation

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
RUN_LISTS = sorted(EXPERIMENTS.glob("*_cv_runs.txt"))


def _value(text: str):
    """An override's value as ml_collections' flags read it: a Python literal, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@pytest.mark.parametrize("run_list", RUN_LISTS, ids=[path.name for path in RUN_LISTS])
def test_every_line_is_a_valid_config_of_a_fold(run_list):
    lines = [line.split() for line in run_list.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert lines
    for candidate, fold, config_path, *overrides in lines:
        assert 0 <= int(fold) < 5 and candidate
        config = config_lib.config_module(EXPERIMENTS.parent / config_path).get_config()
        settings = {}
        for override in overrides:
            key, _, text = override.removeprefix("--config.").partition("=")
            assert override.startswith("--config.") and text, override
            settings[key] = _value(text)
        config_lib.apply_overrides(config, settings)
        config.data.cv_folds, config.data.cv_fold, config.eval.split = 5, int(fold), "validation"
        config_validation.validate(config)
