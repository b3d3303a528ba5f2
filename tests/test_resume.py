"""Surviving interruptions: exact resume after SIGKILL, SIGTERM checkpoints, damaged checkpoints,
non-finite losses and checkpoints of another model."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, TEST_CACHE, TEST_DATA_DIR, make_tiny_config

from rdunet_jax import checkpoints, train

NUM_EPOCHS = 3  # 8 slices, batch 4: 2 steps an epoch, 6 in all
TINY = [
    "--config",
    "configs/demo.py:tiny",
    f"--config.compilation_cache_dir={TEST_CACHE}",
    f"--config.data.data_dir={TEST_DATA_DIR}",
    f"--config.num_epochs={NUM_EPOCHS}",
]


def _run(workdir, *args, kill_at_step=None, timeout=240):
    environment = dict(os.environ)
    environment.pop("RDUNET_TEST_KILL_AT_STEP", None)
    if kill_at_step is not None:
        environment["RDUNET_TEST_KILL_AT_STEP"] = str(kill_at_step)
    return subprocess.run(
        [sys.executable, "-m", "rdunet_jax.main", *TINY, f"--workdir={workdir}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def _final_state(workdir):
    config = make_tiny_config()
    target = train.abstract_train_state(config, train.setup_run(config), steps_per_epoch=2)
    run_checkpoints = checkpoints.RunCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        return run_checkpoints.restore("latest", target)
    finally:
        run_checkpoints.close()


def _assert_identical(state_a, state_b):
    for name in ("params", "batch_stats", "opt_state"):
        leaves_a = jax.tree_util.tree_leaves(getattr(state_a, name))
        leaves_b = jax.tree_util.tree_leaves(getattr(state_b, name))
        for a, b in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run: the reference every resumed run must equal bit for bit."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = _run(workdir)
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.mark.parametrize(
    "kill_at_step, checkpoint_every_steps",
    # Before any checkpoint; mid-epoch, resuming from an epoch end; mid-epoch, resuming mid-epoch. A
    # checkpoint is written asynchronously, so the one just begun may be lost: the kill comes late
    # enough that an earlier one is complete (each save first waits for the previous one).
    [(1, 0), (5, 0), (4, 1)],
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, finished_run, kill_at_step, checkpoint_every_steps):
    option = f"--config.checkpoint_every_steps={checkpoint_every_steps}"
    killed = _run(tmp_path, option, kill_at_step=kill_at_step)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(tmp_path, option)
    assert resumed.returncode == 0, resumed.stderr
    if kill_at_step > 1:
        assert "resumed at epoch" in resumed.stdout
    state, meta = _final_state(tmp_path)
    reference_state, reference_meta = _final_state(finished_run)
    assert int(state.step) == int(reference_state.step) == 2 * NUM_EPOCHS
    _assert_identical(state, reference_state)
    assert meta["best_epoch"] == reference_meta["best_epoch"]
    epochs = [line.split(",")[0] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(epochs) == NUM_EPOCHS


def test_sigterm_saves_a_checkpoint_and_exits_within_seconds(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "rdunet_jax.main", *TINY, f"--workdir={tmp_path}", "--config.num_epochs=500"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("epoch 2:"):
            break
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.perf_counter() - signalled < 10
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    stopped_step = int(stderr.split("at step ")[1].split(";")[0])
    state, meta = _final_state(tmp_path)
    assert int(state.step) == stopped_step >= 4
    assert meta["epoch"] < 500


def _damage(step_folder: pathlib.Path) -> None:
    for path in step_folder.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_latest_falls_back_to_the_previous_checkpoint(tmp_path, finished_run):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    latest = workdir / "checkpoints" / "latest"
    steps = sorted(int(path.name) for path in latest.iterdir() if path.name.isdigit())
    assert steps == [4, 6]
    _damage(latest / "6")
    with (workdir / "train_log.jsonl").open("a") as log:
        log.write('{"epoch": 4, "lo')  # a line cut short by a kill
    resumed = _run(workdir, f"--config.num_epochs={NUM_EPOCHS + 1}")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint step 6" in resumed.stdout and "damaged" in resumed.stdout
    assert "resumed at epoch 3 (step 4)" in resumed.stdout

    for step in sorted(int(path.name) for path in latest.iterdir() if path.name.isdigit()):
        _damage(latest / str(step))
    broken = _run(workdir, f"--config.num_epochs={NUM_EPOCHS + 2}")
    assert broken.returncode == 2
    assert broken.stderr.startswith("error: every checkpoint in") and "Traceback" not in broken.stderr


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path, finished_run):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    result = _run(workdir, "--config.model.features=8", f"--config.num_epochs={NUM_EPOCHS + 1}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "model.features=4 in the checkpoint, 8 in the config" in lines[0]
    assert (workdir / "config.json").read_text() == (finished_run / "config.json").read_text()
    evaluated = _run(workdir, "--mode=evaluate", "--config.model.skip_dilation_rates=((1,2),(1,2))")
    assert evaluated.returncode == 2
    assert "model.skip_dilation_rates=[[1, 2, 1], [1, 2, 1]] in the checkpoint" in evaluated.stderr
    assert len(evaluated.stderr.strip().splitlines()) == 1


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_bad(tmp_path):
    result = _run(tmp_path, "--config.learning_rate=1e30")
    assert result.returncode == 2
    assert "loss is nan at step" in result.stderr and "Traceback" not in result.stderr
    latest = tmp_path / "checkpoints" / "latest"
    assert not any(path.name.isdigit() for path in latest.iterdir())
