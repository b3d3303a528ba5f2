"""A seconds-long smoke run of experiments.benchmark at a tiny size: it runs and its JSON has every key."""

import json
import subprocess
import sys

import pytest
from helpers import TINY_MODEL_FLAGS, checkout_environment, run_tiny_experiment

from experiments import benchmark, common, fair_benchmark


@pytest.mark.slow
def test_benchmark_smoke_run_writes_every_key(tmp_path):
    output = tmp_path / "bench.json"
    arguments = ["--image_size", "16", "--batch_size", "2", "--steps", "2", "--infer_steps", "2"]
    arguments += ["--infer_batch_size", "2", "--pipeline_batches", "2", "--skip_startup"]
    arguments += ["--json", str(output), "--markdown", str(tmp_path / "bench.md")]
    # A separate process: the benchmark turns the compilation cache off and on for its own timing.
    completed = run_tiny_experiment("benchmark", arguments, tmp_path)
    report = json.loads(output.read_text())
    assert set(benchmark.REQUIRED_KEYS) <= set(report)
    for key in ("train_step_s", "train_images_per_s", "infer_ms_per_slice", "compile_s", "gflops_per_s"):
        assert report[key] > 0, key
    assert report["pipeline_images_per_s"] > 0
    assert report["image_size"] == 16 and report["model"]["depth"] == 1
    assert report["model"]["batch_norm_impl"] == "closed_form" and report["mode"] == "float32"
    assert report["train_images_per_s"] == report["batch_size"] / report["train_step_s"]
    assert report["infer_ms_per_slice_onnxruntime"] > 0
    assert report["infer_onnxruntime_max_probability_difference"] < 1e-5
    assert "| 16 | 2 | float32 |" in (tmp_path / "bench.md").read_text()
    assert "| 16 |" in completed.stdout


@pytest.mark.slow
def test_child_startup_report_measures_first_step_begin(tmp_path):
    """The cold/warm start-up child runs the real path and reports when the first step began."""
    args = benchmark.parse_args(
        ["--image_size", "16", "--batch_size", "2", "--startup_steps", "1", "--pipeline_batches", "2"]
        + TINY_MODEL_FLAGS
    )
    report = benchmark.run_child(args, 16, str(tmp_path / "cache"))
    phases = report["phases_s"]
    assert 0 < phases["imports"] <= phases["data"] <= phases["model"] <= phases["compile"]
    assert phases["compile"] <= phases["first_step_done"]
    assert report["first_step_s"] == phases["compile"]
    assert report["peak_rss_mb"] > 50
    assert any((tmp_path / "cache").iterdir())  # the child filled the persistent cache


def test_mode_name_lists_the_speed_options_away_from_the_defaults():
    from rdunet_jax import config_lib

    model_config = config_lib.base_config().model
    assert common.mode_name(model_config) == "float32"
    model_config.update(dtype="bfloat16", dropout_impl="flax", pool_impl="reduce_window", remat=True)
    assert common.mode_name(model_config) == "bfloat16+dropout_impl=flax+pool_impl=reduce_window+remat"
    model_config.update(batch_norm_impl="flax", dropout_impl="bits")
    assert common.mode_name(model_config) == "bfloat16+pool_impl=reduce_window+batch_norm_impl=flax+remat"


# --- experiments.fair_benchmark: each framework alone in a fresh process, alternating ------------

# Stands in for ../shared/peers/torch_rdunet.py: hand-chosen step seconds by call, its command line, and
# whether the process that started it has jaxlib loaded (read from the parent's memory map).
FAKE_TORCH_SCRIPT = """
import json, os, pathlib, sys
log = pathlib.Path(__file__).with_suffix(".log")
calls = log.read_text().count("\\n") if log.exists() else 0
maps = pathlib.Path(f"/proc/{os.getppid()}/maps").read_text()
with log.open("a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\\n")
seconds = [0.5, 0.25, 0.125, 2.0][calls % 4]
key = "batch_median_s" if sys.argv[1] == "infer" else "step_median_s"  # as the real script names them
result = {key: seconds, "torch": "fake", "threads": 2, "parent_has_jaxlib": "jaxlib" in maps}
print("RESULT " + json.dumps(result))
"""
FRAMEWORK_MODULES = ("jax", "jaxlib", "flax", "torch", "onnxruntime")


def _fair_command_line(tmp_path, *extra):
    script = tmp_path / "fake_torch.py"
    script.write_text(FAKE_TORCH_SCRIPT)
    argv = ["--torch_python", sys.executable, "--torch_script", str(script), "--image_size", "16"]
    argv += ["--batch_size", "2", "--steps", "1", *extra]
    return argv + TINY_MODEL_FLAGS


def _run_orchestrator(tmp_path, argv):
    """fair_benchmark.main(argv) in a fresh interpreter; the framework modules it had loaded at the end."""
    code = (
        "import json, sys; from experiments import fair_benchmark; "
        "fair_benchmark.main(sys.argv[1:]); "
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {FRAMEWORK_MODULES}]; "
        "print('LOADED', json.dumps(sorted(loaded)))"
    )
    command = [sys.executable, "-c", code, *argv]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=checkout_environment()
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.split("LOADED ")[-1])


@pytest.mark.slow
def test_fair_benchmark_parent_loads_no_framework_and_reports_paired_ratios(tmp_path):
    """Two real rounds (a tiny JAX child, a stand-in PyTorch script): the orchestrator never imports
    jax or torch, no PyTorch child has a jaxlib-loaded parent, and the JSON holds hand-checkable ratios."""
    output = tmp_path / "fair.json"
    argv = _fair_command_line(tmp_path, "--rounds", "2", "--torch_variants", "cl,clbf16")
    argv += ["--json", str(output), "--markdown", str(tmp_path / "fair.md")]
    assert _run_orchestrator(tmp_path, argv) == []
    report = json.loads(output.read_text())
    calls = [json.loads(line) for line in (tmp_path / "fake_torch.log").read_text().splitlines()]
    assert calls == [["train", "16", "2", variant, "1"] for variant in ("cl", "clbf16", "cl", "clbf16")]
    torch_runs = report["children"]["torch_cl"] + report["children"]["torch_clbf16"]
    assert len(torch_runs) == 4 and not any(run["parent_has_jaxlib"] for run in torch_runs)
    # The stand-in's seconds by call: cl 0.5 then 0.125, clbf16 0.25 then 2.0.
    assert report["torch_cl_step_s_by_round"] == [0.5, 0.125]
    assert report["torch_clbf16_step_s_by_round"] == [0.25, 2.0]
    jax_by_round = report["jax_step_s_by_round"]
    assert len(jax_by_round) == 2 and all(seconds > 0 for seconds in jax_by_round)
    assert report["jax_step_s"] == (jax_by_round[0] + jax_by_round[1]) / 2
    assert report["ratio_vs_torch_cl_by_round"] == [jax_by_round[0] / 0.5, jax_by_round[1] / 0.125]
    assert report["ratio_vs_torch_cl"] == (jax_by_round[0] / 0.5 + jax_by_round[1] / 0.125) / 2
    assert report["ratio_of_medians_vs_torch_clbf16"] == report["jax_step_s"] / 1.125
    assert report["mode"] == "float32" and report["rounds"] == 2 and report["image_size"] == 16
    assert report["environment"]["jax"] and report["environment"]["torch"] == "fake"
    assert len(report["load_before_by_round"]) == 2
    table = (tmp_path / "fair.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table and f"**{report['ratio_vs_torch_cl']:.3f}**" in table


def test_fair_benchmark_infer_times_the_configured_runtime_against_torch_inference(tmp_path):
    output = tmp_path / "fair.json"
    argv = _fair_command_line(tmp_path, "--what", "infer", "--set", "eval.runtime=onnxruntime")
    assert _run_orchestrator(tmp_path, argv + ["--rounds", "1", "--json", str(output)]) == []
    report = json.loads(output.read_text())
    assert (tmp_path / "fake_torch.log").read_text().splitlines() == ['["infer", "16", "2", "cl", "1"]']
    assert report["what"] == "infer" and report["mode"] == "float32+onnxruntime"  # what was timed
    assert report["torch_cl_step_s"] == 0.5 and report["jax_step_s"] > 0
    assert report["ratio_vs_torch_cl"] == report["jax_step_s"] / 0.5


def test_fair_benchmark_rounds_alternate_jax_and_each_torch_variant(tmp_path):
    args = fair_benchmark.parse_args(_fair_command_line(tmp_path, "--torch_variants", "cl,clbf16"))
    started = []

    def run(command):
        started.append(command)
        return {"step_median_s": 1.0}

    named = fair_benchmark.contenders(args)
    results = fair_benchmark.run_rounds(named, rounds=3, run=run)
    jax_command, cl_command, bf16_command = (command for _, command in named)
    assert started == [jax_command, cl_command, bf16_command] * 3
    assert jax_command[:5] == [sys.executable, "-m", "experiments.fair_benchmark", "--_child", "jax"]
    assert "model.features=2" in jax_command
    assert cl_command == [sys.executable, str(tmp_path / "fake_torch.py"), "train", "16", "2", "cl", "1"]
    assert bf16_command[-2:] == ["clbf16", "1"]
    assert {name: len(runs) for name, runs in results.items()} == {"jax": 3, "torch_cl": 3, "torch_clbf16": 3}


def test_fair_benchmark_summary_against_hand_values():
    odd = fair_benchmark.summarize({"jax": [4.0, 6.0, 5.0], "torch_cl": [2.0, 4.0, 5.0]})
    assert odd["jax_step_s"] == 5.0 and odd["torch_cl_step_s"] == 4.0
    assert odd["ratio_vs_torch_cl_by_round"] == [2.0, 1.5, 1.0]
    assert odd["ratio_vs_torch_cl"] == 1.5  # the paired median, not 5.0 / 4.0
    assert odd["ratio_of_medians_vs_torch_cl"] == 1.25
    even = fair_benchmark.summarize({"jax": [3.0, 5.0], "torch_cl": [2.0, 2.5], "torch_bf16": [1.0, 4.0]})
    assert even["ratio_vs_torch_cl"] == 1.75 and even["ratio_vs_torch_bf16"] == 2.125
    assert even["torch_bf16_step_s"] == 2.5 and even["ratio_of_medians_vs_torch_bf16"] == 4.0 / 2.5


def test_fair_benchmark_probe_summary_against_hand_values():

    def runs(seconds, cpu=(0.0, 0.0, 0.0)):
        return [
            {
                "step_median_s": s,
                "load_before": 0.5,
                "parent_cpu_s_during_child": c,
                "parent_rss_mb": 100.0 * i,
            }
            for i, (s, c) in enumerate(zip(seconds, cpu, strict=True), start=1)
        ]

    summary = fair_benchmark.summarize_probe(
        {"fresh": runs([3.0, 4.0, 3.5]), "child_of_living_jax": runs([3.3, 4.4, 4.9], cpu=[0.1, 0.0, 0.2])}
    )
    assert summary["fresh"]["ratio_vs_fresh"] == 1.0 and summary["fresh"]["torch_step_s"] == 3.5
    living = summary["child_of_living_jax"]
    assert abs(living["ratio_vs_fresh"] - 1.1) < 1e-12  # rounds 1.1, 1.1, 1.4; not 4.4 / 3.5
    assert living["torch_step_s"] == 4.4 and living["parent_rss_mb"] == 300.0
    assert living["parent_cpu_s_during_child_by_round"] == [0.1, 0.0, 0.2]


@pytest.mark.slow
def test_fair_benchmark_probe_starts_torch_from_a_living_jax_process(tmp_path):
    """--probe_living_parent: the fresh child's parent has no jaxlib, the probe's children's parent has."""
    output = tmp_path / "probe.json"
    argv = _fair_command_line(tmp_path, "--rounds", "1", "--probe_living_parent", "--json", str(output))
    assert _run_orchestrator(tmp_path, argv) == []
    report = json.loads(output.read_text())
    children = report["children"]
    assert list(children) == list(fair_benchmark.PROBE_CONDITIONS)
    parent_has_jaxlib = [run["parent_has_jaxlib"] for name in children for run in children[name]]
    assert parent_has_jaxlib == [False, True, True, True]
    assert [report["conditions"][name]["torch_step_s"] for name in children] == [0.5, 0.25, 0.125, 2.0]
    assert report["conditions"]["child_of_living_jax"]["parent_rss_mb"] > 50
    assert report["environment"]["jax"] and report["environment"]["torch"] == "fake"


def test_fair_benchmark_user_errors_exit_2_naming_the_option(tmp_path, capsys):
    for extra, message in (
        (["--torch_variants", "cl,fp16"], "--torch_variants: unknown variant 'fp16'"),
        (["--json", str(tmp_path / "missing" / "out.json")], "--json: no folder"),
        (["--rounds", "0"], "--rounds and --steps must be at least 1"),
        (["--torch_python", str(tmp_path / "no_python")], "--torch_python: no interpreter"),
    ):
        try:
            fair_benchmark.parse_args(_fair_command_line(tmp_path, *extra))
        except SystemExit as exit:
            assert exit.code == 2
        else:
            raise AssertionError(f"{extra} accepted")
        assert message in capsys.readouterr().err
