"""A seconds-long run of experiments.onnx_int8 on the tiny model: it quantises, scores and times."""

import json

import pytest
from helpers import REPO_ROOT, TEST_CACHE, TEST_DATA_DIR, make_tiny_config

from rdunet_jax import checkpoints


def test_int8_and_float32_are_scored_and_timed_on_the_split(tiny_state, tmp_path):
    from experiments import onnx_int8

    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "run" / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    run_checkpoints.save("best", 1, tiny_state, meta)
    run_checkpoints.close()
    output = tmp_path / "int8.json"
    argv = ["--config", str(REPO_ROOT / "configs" / "demo.py") + ":tiny", "--workdir", str(tmp_path / "run")]
    argv += ["--set", f"data.data_dir={TEST_DATA_DIR}", "--set", f"compilation_cache_dir={TEST_CACHE}"]
    argv += ["--calibration_slices", "4", "--repeats", "2", "--json", str(output)]
    report = onnx_int8.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert report["split"] == "validation" and report["num_slices"] == 4
    assert report["checkpoint_step"] == int(tiny_state.step)
    for name in ("float32", "int8"):
        assert report[name]["ms_per_slice"] > 0
        assert 0.0 <= report[name]["dice"] <= 1.0
    assert report["int8_time_ratio"] > 0
    assert 0.0 <= report["mask_pixels_changed"] <= 1.0
    # int8 rounding moves probabilities, but not far: the model is the same.
    assert 0.0 < report["max_probability_difference"] < 0.2


def test_a_multi_class_model_is_refused_in_one_line_not_scored_on_its_first_channel(tmp_path):
    from experiments import onnx_int8

    argv = ["--config", str(REPO_ROOT / "configs" / "demo.py") + ":tiny", "--workdir", str(tmp_path)]
    argv += ["--set", "model.head=exclusive", "--set", 'data.classes=["ggo", "consolidation"]']
    with pytest.raises(SystemExit) as refused:
        onnx_int8.main(argv)
    assert str(refused.value) == (
        "--config: model.head='exclusive'; this experiment scores a binary model's lesion mask"
    )
