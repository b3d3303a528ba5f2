"""A seconds-long run of experiments.compiler_options_ab at a tiny size, and its option parsing."""

import json

import pytest
from helpers import run_tiny_experiment

from experiments import compiler_options_ab


@pytest.mark.slow
def test_each_variant_is_timed_against_the_projects_step(tmp_path):
    output = tmp_path / "ab.json"
    default_scheduler = json.dumps({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
    arguments = ["--image_size", "16", "--batch_size", "2", "--rounds", "2"]
    arguments += ["--option", f"xla_default={default_scheduler}", "--json", str(output)]
    arguments += ["--model_option", "pool_window=model.pool_impl=reduce_window"]
    completed = run_tiny_experiment("compiler_options_ab", arguments, tmp_path)
    report = json.loads(output.read_text())
    variants = report["variants"]
    assert list(variants) == ["project", "xla_default", "pool_window"]
    assert variants["project"]["ratio_vs_project"] == 1.0
    assert variants["project"]["max_difference_vs_project"] == 0.0
    assert variants["xla_default"]["options"]["xla_cpu_scheduler_type"] == "CPU_SCHEDULER_TYPE_DEFAULT"
    # Another schedule of the same program: the same loss to float tolerance.
    assert variants["xla_default"]["max_difference_vs_project"] < 1e-5
    assert len(variants["xla_default"]["times_s"]) == 2
    # Another form of the same model from the same parameters: the same loss to float tolerance.
    assert variants["pool_window"]["config_overrides"] == ["model.pool_impl=reduce_window"]
    assert variants["pool_window"]["max_difference_vs_project"] < 1e-5
    assert "| xla_default |" in completed.stdout


@pytest.mark.parametrize("text", ["no_equals", "name=[1]", "name={bad json", "={}"])
def test_a_malformed_option_is_named_in_one_line(text):
    with pytest.raises(SystemExit, match="--option"):
        compiler_options_ab.parse_option(text)


@pytest.mark.parametrize("text", ["name", "name=", "=model.remat=True", "name=model.remat"])
def test_a_malformed_model_option_is_named_in_one_line(text):
    with pytest.raises(SystemExit, match="--model_option"):
        compiler_options_ab.parse_model_option(text)
