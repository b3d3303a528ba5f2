"""experiments.mutation: the staged copy mutmut mutates (decorators undone, config, what is left out)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import mutation
from rdunet_jax import devices, steps


def test_undecorate_applies_each_decorator_by_assignment_innermost_first():
    source = (
        "import functools\n"
        "\n"
        "@outer\n"
        "@functools.partial(inner, 2)\n"
        "def f(x):\n"
        "    return x\n"
        "\n"
        "class A:\n"
        "    @staticmethod\n"
        "    def g():\n"
        "        pass\n"
        "\n"
        "    @nn.compact\n"
        "    def __call__(self, x):\n"
        "        return x\n"
    )
    expected = (
        "import functools\n"
        "\n"
        "def f(x):\n"
        "    return x\n"
        "f = outer(functools.partial(inner, 2)(f))\n"
        "\n"
        "class A:\n"
        "    @staticmethod\n"
        "    def g():\n"
        "        pass\n"
        "\n"
        "    def __call__(self, x):\n"
        "        return x\n"
        "    __call__ = nn.compact(__call__)\n"
    )
    assert mutation.undecorate(source) == expected


def test_the_staged_config_mutates_one_module_under_its_tests():
    staged = mutation.staged_config('[tool.mutmut]\nsource_paths = ["rdunet_jax/"]\n', "selftrain")
    assert staged == (
        "[tool.mutmut]\n"
        'only_mutate = ["rdunet_jax/selftrain.py"]\n'
        'pytest_add_cli_args_test_selection = ["tests/test_selftrain.py"]\n'
        'source_paths = ["rdunet_jax/"]\n'
    )
    with pytest.raises(SystemExit, match="no \\[tool.mutmut\\] section"):
        mutation.staged_config("[tool.ruff]\n", "losses")


def test_a_subpackage_module_is_named_with_dots_and_staged_by_its_path():
    assert mutation.module_path("datasets.labels") == "rdunet_jax/datasets/labels.py"
    staged = mutation.staged_config("[tool.mutmut]\n", "datasets.labels")
    assert 'only_mutate = ["rdunet_jax/datasets/labels.py"]' in staged


def test_every_module_and_its_tests_exist():
    for module, selections in mutation.TESTS.items():
        assert (mutation.REPO_ROOT / mutation.module_path(module)).is_file(), module
        for selection in selections:  # a file, or one test of it by pytest node id (file::test)
            test_file, _, test_name = selection.partition("::")
            assert (mutation.REPO_ROOT / test_file).is_file(), selection
            if test_name:
                assert re.search(
                    rf"^def {test_name}\(", (mutation.REPO_ROOT / test_file).read_text(), re.M
                ), selection


def test_prepare_stages_the_code_the_tests_need_without_results_or_caches(tmp_path, monkeypatch):
    # The checkout's compilation cache (tens of MB, written by tests running beside this one) stays out.
    monkeypatch.setattr(mutation, "TEST_CACHE", tmp_path / "no-cache")
    mutation.prepare(tmp_path, "mean_teacher")
    assert (tmp_path / "experiments" / "pool_intensity.py").is_file()  # test_selftrain runs it
    assert (tmp_path / "tests" / "test_mean_teacher.py").is_file()
    assert not (tmp_path / "experiments" / "results").exists()
    assert not list(tmp_path.rglob("__pycache__"))
    assert 'only_mutate = ["rdunet_jax/mean_teacher.py"]' in (tmp_path / "pyproject.toml").read_text()


def test_the_staged_train_step_is_always_jits_whose_cache_keys_each_mutants_program(
    tmp_path, monkeypatch, tiny_state, tiny_config
):
    # Every mutant of a module runs the same staged file: a loop test loaded the step the clean run stored.
    monkeypatch.setattr(mutation, "TEST_CACHE", tmp_path / "no-cache")
    monkeypatch.setattr(mutation, "STAGED_PATHS", ("rdunet_jax",))
    mutation.prepare(tmp_path, "steps")
    spec = importlib.util.spec_from_file_location(
        "staged_cache", tmp_path / "rdunet_jax" / "compile_cache.py"
    )
    staged = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(staged)
    batch = {"image": np.zeros((2, 32, 32, 1), np.float32), "mask": np.zeros((2, 32, 32, 1), np.float32)}
    assert tiny_config.compilation_cache_dir  # the checkout's loads stored steps for this config
    step = staged.cached_train_step(tiny_config, tiny_state, batch, 2, devices.data_parallel_mesh())
    assert step is steps.train_step
    with pytest.raises(SystemExit, match="compile_cache.py's cache check changed"):
        mutation.without_stored_steps("if config.compilation_cache_dir:\n")


def test_every_staged_test_traces_the_jitted_functions_it_calls(tmp_path, monkeypatch):
    # mutmut runs a mutant only against the tests seen calling its function; jit's cache hid every test but
    # the first one that traced it (a train-step mutant skipped the test that kills it).
    monkeypatch.setattr(mutation, "TEST_CACHE", tmp_path / "no-cache")
    monkeypatch.setattr(mutation, "STAGED_PATHS", ("tests/conftest.py", "tests/helpers.py"))
    mutation.prepare(tmp_path, "steps")
    (tmp_path / "tests" / "test_traced.py").write_text(
        "import jax\n\nTRACES = []\n\n\n@jax.jit\ndef double(x):\n"
        "    TRACES.append(1)\n    return 2 * x\n\n\n"
        "def test_first():\n    double(1.0)\n    assert len(TRACES) == 1\n\n\n"
        "def test_second():\n    double(1.0)\n    assert len(TRACES) == 2\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "--numprocesses=0",
            "tests/test_traced.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]


def test_prepare_leaves_out_study_workdirs_which_runs_write_while_it_copies(tmp_path, monkeypatch):
    # experiments/runs/ (gitignored checkpoints of a study running beside it) was copied: a checkpoint file
    # gone between listing and copying failed the staging.
    checkout = tmp_path / "checkout"
    (checkout / "experiments" / "runs" / "0123" / "checkpoints").mkdir(parents=True)
    (checkout / "experiments" / "runs" / "0123" / "checkpoints" / "state.bin").write_bytes(b"weights")
    (checkout / "experiments" / "pool_intensity.py").write_text("print('staged')\n")
    monkeypatch.setattr(mutation, "REPO_ROOT", checkout)
    monkeypatch.setattr(mutation, "STAGED_PATHS", ("experiments",))
    monkeypatch.setattr(mutation, "TEST_CACHE", tmp_path / "no-cache")
    mutation.prepare(tmp_path / "work", "losses")
    assert (tmp_path / "work" / "experiments" / "pool_intensity.py").is_file()
    assert not (tmp_path / "work" / "experiments" / "runs").exists()


def test_the_shell_runner_knows_the_same_modules_and_names_them_when_it_refuses_one():
    runner = mutation.REPO_ROOT / "experiments" / "mutation.sh"
    environment = {**os.environ, "PYTHON": sys.executable}
    refused = subprocess.run(["bash", runner, "train"], capture_output=True, text=True, env=environment)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"experiments/mutation.sh: 'train' is neither a module ({', '.join(mutation.TESTS)}), "
        "report nor a mutant glob"
    )


def test_the_report_reads_a_subpackage_modules_verdicts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mutation, "EQUIVALENT_LIST", tmp_path / "equivalent.txt")
    meta = tmp_path / "datasets.labels" / "mutants" / "rdunet_jax" / "datasets" / "labels.py.meta"
    meta.parent.mkdir(parents=True)
    name = "rdunet_jax.datasets.labels.x_label_map__mutmut_"
    meta.write_text(json.dumps({"exit_code_by_key": {f"{name}1": 1, f"{name}2": 0, f"{name}3": None}}))
    mutation.report(tmp_path, "mutmut", show_diffs=False)
    printed = capsys.readouterr().out.splitlines()
    assert "| datasets.labels | 3 | 2 | 1 | 0 | 0 | 1 | 50.0% |" in printed
    assert f"- {name}2 (survived)" in printed


def test_a_listed_equivalent_counts_only_while_it_survives_and_a_detected_one_is_named(
    tmp_path, capsys, monkeypatch
):
    # mutmut renumbers a changed function's mutants: a listed name can come to mean one the tests kill.
    name = "rdunet_jax.losses.x_dice__mutmut_"
    unstaged = "rdunet_jax.metrics.x_dice__mutmut_1 a module not staged here: not known to be gone"
    (tmp_path / "equivalent.txt").write_text(
        f"{name}1 kept\n{name}2 renumbered since\n{name}9 gone\n{unstaged}\n"
    )
    monkeypatch.setattr(mutation, "EQUIVALENT_LIST", tmp_path / "equivalent.txt")
    meta = tmp_path / "losses" / "mutants" / "rdunet_jax" / "losses.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {f"{name}1": 0, f"{name}2": 1, f"{name}3": 0}}))
    mutation.report(tmp_path, "mutmut", show_diffs=False)
    out, err = capsys.readouterr()
    # 3 tested: 1 equivalent (survives, listed), 1 killed (listed, but detected), 1 survivor.
    assert "| losses | 3 | 3 | 1 | 0 | 1 | 1 | 50.0% |" in out.splitlines()
    assert err.splitlines() == [
        f"warning: equivalent.txt names {name}9, which is no longer a mutant",
        f"warning: equivalent.txt names {name}2, which the tests detect: renumbered, or not equivalent; "
        "check it with mutmut show",
    ]


def test_the_shell_runner_resolves_executables_given_as_paths_relative_to_where_it_is_called(tmp_path):
    # The runner moves to the checkout (and mutmut to each staged folder): './python' must still be found.
    (tmp_path / "python").symlink_to(sys.executable)
    runner = mutation.REPO_ROOT / "experiments" / "mutation.sh"
    environment = {**os.environ, "PYTHON": "./python", "MUTMUT": "./mutmut"}
    refused = subprocess.run(
        ["bash", runner, "train"], capture_output=True, text=True, env=environment, cwd=tmp_path
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("experiments/mutation.sh: 'train' is neither a module (losses, ")
