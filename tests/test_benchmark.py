"""A seconds-long smoke run of experiments/benchmark.py at a tiny size: it runs and its JSON has every key."""

import json
import pathlib
import subprocess
import sys

from conftest import TEST_DATA_DIR

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "model.features=2",
    "model.depth=1",
    "model.skip_dilation_rates=[[1]]",
    "data.num_train=8",
    f"data.data_dir={TEST_DATA_DIR}",
]


def test_benchmark_smoke_run_writes_every_key(tmp_path):
    output = tmp_path / "bench.json"
    command = [sys.executable, str(REPO_ROOT / "experiments" / "benchmark.py"), "--image_size", "16"]
    command += ["--batch_size", "2", "--steps", "2", "--infer_steps", "2", "--infer_batch_size", "2"]
    command += ["--pipeline_batches", "2", "--skip_startup", "--json", str(output)]
    command += ["--markdown", str(tmp_path / "bench.md")]
    for item in TINY_MODEL:
        command += ["--set", item]
    # A separate process: the benchmark turns the compilation cache off and on for its own timing.
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    import benchmark

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


def test_child_startup_report_measures_first_step_begin(tmp_path):
    """The cold/warm start-up child runs the real path and reports when the first step began."""
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    import benchmark

    args = benchmark.parse_args(
        ["--image_size", "16", "--batch_size", "2", "--startup_steps", "1", "--pipeline_batches", "2"]
        + [part for item in TINY_MODEL for part in ("--set", item)]
    )
    report = benchmark.run_child(args, 16, str(tmp_path / "cache"))
    phases = report["phases_s"]
    assert 0 < phases["imports"] <= phases["data"] <= phases["model"] <= phases["compile"]
    assert phases["compile"] <= phases["first_step_done"]
    assert report["first_step_s"] == phases["compile"]
    assert report["peak_rss_mb"] > 50
    assert any((tmp_path / "cache").iterdir())  # the child filled the persistent cache


def test_mode_name_lists_the_speed_options_away_from_the_defaults():
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    import benchmark

    from rdunet_jax import config_lib

    model_config = config_lib.base_config().model
    assert benchmark.mode_name(model_config) == "float32"
    model_config.update(dtype="bfloat16", dropout_impl="flax", pool_impl="reduce_window", remat=True)
    assert benchmark.mode_name(model_config) == "bfloat16+dropout_impl=flax+pool_impl=reduce_window+remat"
    model_config.update(batch_norm_impl="flax", dropout_impl="bits")
    assert benchmark.mode_name(model_config) == "bfloat16+pool_impl=reduce_window+batch_norm_impl=flax+remat"
