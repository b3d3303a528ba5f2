"""experiments/config_variants_ab.py: variant parsing, the child's command line, reading a child's logs, and
the medians, per-round ratios and same-result check, against hand-computed values."""

import json
import pathlib
import sys
import textwrap

import pytest

from experiments import config_variants_ab as ab


def test_a_variant_is_a_name_and_its_overrides():
    assert ab.parse_variant("v10=eval.validate_every_epochs=10,seed=1") == (
        "v10",
        ["eval.validate_every_epochs=10", "seed=1"],
    )
    for bad in ("v10", "=seed=1", "v10=", "v10=seed"):
        with pytest.raises(SystemExit, match="--variant .*expected NAME=KEY=VALUE"):
            ab.parse_variant(bad)


def test_two_differently_named_variants_are_required():
    with pytest.raises(SystemExit, match="at least two, with different names"):
        ab.parse_args(["--config", "c.py", "--variant", "a=seed=1", "--variant", "a=seed=2"])
    with pytest.raises(SystemExit, match="at least two"):
        ab.parse_args(["--config", "c.py", "--variant", "a=seed=1"])


def test_the_child_runs_main_with_the_shared_settings_then_the_variants_then_epochs_and_data():
    args = ab.parse_args(
        [
            "--config",
            "configs/semiseg.py",
            "--set",
            "seed=3",
            "--variant",
            "a=seed=1",
            "--variant",
            "b=seed=2",
        ]
    )
    command = ab.child_command(args, ["seed=2"], pathlib.Path("/w"), pathlib.Path("/d"), 7)
    assert command[1:] == [
        "-m",
        "rdunet_jax.main",
        "--config=configs/semiseg.py",
        "--workdir=/w",
        "--config.seed=3",
        "--config.seed=2",  # the variant's, after the shared one: it wins
        "--config.num_epochs=7",
        "--config.data.data_dir=/d",
    ]


def test_a_child_is_read_from_its_train_log_and_its_final_metrics(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, pathlib
        workdir = pathlib.Path({str(tmp_path)!r})
        (workdir / "metrics").mkdir()
        lines = [{{"epoch": 1, "seconds": 1.25}}, {{"epoch": 2, "seconds": 2.5}}]
        (workdir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\\n" for line in lines))
        metrics = {{"dice": 0.7, "step": 4, "hd95": 3}}
        (workdir / "metrics" / "validation.json").write_text(json.dumps(metrics))
        """
    )
    child = ab.run_child([sys.executable, "-c", script], tmp_path)
    assert child["epochs_s"] == 3.75
    assert child["result"] == {"dice": 0.7, "loss": None, "precision": None, "recall": None, "step": 4}
    assert child["wall_s"] > 0
    with pytest.raises(SystemExit, match="failed \\(3\\)"):
        ab.run_child([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path)


def test_env_items_set_the_childs_environment_not_its_config(tmp_path):
    overrides = ["env.XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=", "seed=2"]
    variants = ["--variant", "a=seed=1", "--variant", "b=" + ",".join(overrides)]
    args = ab.parse_args(["--config", "c.py", "--set", "env.SHARED=1", *variants])
    assert ab.environment_overrides(args, overrides) == {
        "SHARED": "1",  # the shared settings' env items reach every variant's children
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
    }
    assert ab.environment_overrides(args, ["seed=1"]) == {"SHARED": "1"}
    command = ab.child_command(args, args.variants[1][1], pathlib.Path("/w"), pathlib.Path("/d"), 1)
    assert [item for item in command if item.startswith("--config.")] == [
        "--config.seed=2",
        "--config.num_epochs=1",
        "--config.data.data_dir=/d",
    ]
    script = textwrap.dedent(
        f"""
        import json, os, pathlib, sys
        if os.environ.get("AB_FLAG") != "x=1":
            sys.exit(3)
        workdir = pathlib.Path({str(tmp_path)!r})
        (workdir / "metrics").mkdir()
        (workdir / "train_log.jsonl").write_text(json.dumps({{"seconds": 1.0}}) + "\\n")
        (workdir / "metrics" / "validation.json").write_text("{{}}")
        """
    )
    with pytest.raises(SystemExit, match="failed \\(3\\)"):
        ab.run_child([sys.executable, "-c", script], tmp_path)
    assert ab.run_child([sys.executable, "-c", script], tmp_path, {"AB_FLAG": "x=1"})["epochs_s"] == 1.0


def _child(wall, epochs, dice=0.7):
    return {"wall_s": wall, "epochs_s": epochs, "result": {"dice": dice}}


def test_medians_and_per_round_ratios_against_the_first_variant():
    rounds = [
        {"a": _child(100, 90), "b": _child(80, 72)},  # ratios 0.8, 0.8
        {"a": _child(120, 100), "b": _child(90, 70)},  # 0.75, 0.7
        {"a": _child(110, 95), "b": _child(99, 76, dice=0.71)},  # 0.9, 0.8
    ]
    summary = ab.summarize(rounds, ["a", "b"])
    assert summary["a"] == {
        "wall_s": 110,
        "epochs_s": 95,
        "ratio_wall": 1.0,
        "ratio_epochs": 1.0,
        "same_result": True,
    }
    assert summary["b"]["wall_s"] == 90 and summary["b"]["epochs_s"] == 72
    assert summary["b"]["ratio_wall"] == pytest.approx(0.8)  # median of 0.8, 0.75, 0.9
    assert summary["b"]["ratio_epochs"] == pytest.approx(0.8)  # median of 0.8, 0.7, 0.8
    assert summary["b"]["same_result"] is False  # round 3 ended on another Dice
    report = {
        "config": "c.py",
        "epochs": 5,
        "rounds": 3,
        "variants": [{"name": "a", "overrides": ["seed=1"]}, {"name": "b", "overrides": ["seed=2"]}],
        "summary": summary,
    }
    table = ab.markdown_table(report)
    assert "| b | `seed=2` | 90.0 | 72.0 | 0.800 | 0.800 | NO |" in table
    assert json.loads(json.dumps(report)) == report
