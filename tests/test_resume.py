"""The training loop end to end: the best checkpoint, exact resume after SIGKILL, SIGTERM and SIGINT,
damaged checkpoints, non-finite losses, a finished run started again, and checkpoints of another model.

The command-line tests run `rdunet_jax.main` in a child process; the loop's own tests run
`train.train_and_evaluate` in this one, with the validation loss and the faults (a signal, a NaN) injected
around the real loop, and compare every run with one uninterrupted run of the same config.
"""

import contextlib
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    ONE_LEVEL,
    REPO_ROOT,
    TEST_CACHE,
    TEST_DATA_DIR,
    make_consistency_config,
    make_tiny_config,
    tensorboard_scalars,
)

from rdunet_jax import checkpoints, config_lib, datasets, evaluate, models, steps, train, visualize
from rdunet_jax.errors import UserError

NUM_EPOCHS = 3  # 8 slices, batch 4: 2 steps an epoch, 6 in all
TINY = [
    "--config",
    "configs/demo.py:tiny",
    f"--config.compilation_cache_dir={TEST_CACHE}",
    f"--config.data.data_dir={TEST_DATA_DIR}",
    f"--config.num_epochs={NUM_EPOCHS}",
]


def _run(workdir, *args, kill_at_step=None, timeout=240):
    """The command line in a child process; SIGKILLed right after step `kill_at_step` when given."""
    launcher = ["rdunet_jax.main"]
    if kill_at_step is not None:
        launcher = ["tests.kill_at_step", str(kill_at_step), "--"]
    return subprocess.run(
        [sys.executable, "-m", *launcher, *TINY, f"--workdir={workdir}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _final_state(workdir):
    config = make_tiny_config()
    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
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


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run: the reference every resumed run must equal bit for bit."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = _run(workdir)
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.mark.slow
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
    # Every epoch logged once, with the uninterrupted run's losses to the digit.
    assert _log_records(tmp_path) == _log_records(finished_run)
    assert [record["epoch"] for record in _log_records(tmp_path)] == list(range(1, NUM_EPOCHS + 1))


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


# --- the loop in this process ---------------------------------------------------------------------------

# Validation loss by the step each epoch ends at: it falls, rises, then falls again but not to its
# minimum, so the best epoch (2) is neither the first, the last, nor the last one to improve on its
# predecessor.
INJECTED_VALIDATION_LOSS = {2: 0.5, 4: 0.3, 6: 0.4, 8: 0.35}
BEST_STEP, LAST_STEP = 4, 8


def _loop_config():
    """The tiny config at one level for 4 epochs of 2 steps, saving `latest` every step, the learning rate
    halved every 2 epochs (so resumes cross a drop)."""
    config = make_tiny_config()
    config.model.update(ONE_LEVEL)
    config.num_epochs = 4
    config.checkpoint_every_steps = 1
    config.lr_decay_epochs, config.lr_decay_factor = 2, 0.5
    return config


def _train(workdir, after_step=None, **changes):
    """`train.train_and_evaluate` with the validation loss of INJECTED_VALIDATION_LOSS, and
    `after_step(step, state, metrics) -> (state, metrics)` called on every train step's result;
    `changes` set top-level keys of `_loop_config()`."""
    real_validation, real_compile = evaluate.evaluate_source, train.compiled_train_step

    def validation(state, source, config, *args, **kwargs):
        step = int(state.step)
        assert step in INJECTED_VALIDATION_LOSS, f"validation after step {step}, not at an epoch's end"
        summary = real_validation(state, source, config, *args, **kwargs)
        return {**summary, "loss": INJECTED_VALIDATION_LOSS[step]}

    def compiled_with_hook(*args):
        step_function = real_compile(*args)

        def step(state, batch):
            state, metrics = step_function(state, batch)
            return after_step(int(state.step), state, metrics)

        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "evaluate_source", validation)
        if after_step is not None:
            patch.setattr(train, "compiled_train_step", compiled_with_hook)
        config = _loop_config()
        config.update(changes)
        return train.train_and_evaluate(config, workdir)


def _steps(workdir, kind: str) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints" / kind
    return sorted(int(path.name) for path in folder.iterdir() if path.name.isdigit())


@functools.cache
def _restore_target():
    config = _loop_config()
    return steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)


def _restore(workdir, kind: str, step=None):
    target = _restore_target()
    run_checkpoints = checkpoints.RunCheckpoints(pathlib.Path(workdir) / "checkpoints", create=False)
    try:
        return run_checkpoints.restore(kind, target, step)
    finally:
        run_checkpoints.close()


def _assert_same_state(state_a, state_b):
    """Every leaf (step, parameters, batch statistics, optimizer state, dropout key) equal, bit for bit."""
    leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
    leaves_b = jax.tree_util.tree_leaves(state_b)
    assert len(leaves_a) == len(leaves_b) > 0
    for (path, a), b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _log_records(workdir) -> list[dict]:
    records = [
        json.loads(line) for line in (pathlib.Path(workdir) / "train_log.jsonl").read_text().splitlines()
    ]
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def _test_metrics(workdir) -> dict:
    return json.loads((pathlib.Path(workdir) / "metrics" / "test.json").read_text())


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def reference(tmp_path_factory):
    """One uninterrupted in-process run of `_loop_config()`, with its final and best checkpoints."""
    workdir = tmp_path_factory.mktemp("loop") / "uninterrupted"
    _train(workdir)
    return types.SimpleNamespace(
        workdir=workdir, latest=_restore(workdir, "latest"), best=_restore(workdir, "best")
    )


def _assert_ends_as_the_reference(workdir, reference):
    """The run in `workdir` ended as the uninterrupted one: checkpoints, their meta, log and metrics."""
    state, meta = _restore(workdir, "latest")
    assert int(state.step) == LAST_STEP
    _assert_same_state(state, reference.latest[0])
    assert meta == reference.latest[1]
    assert _steps(workdir, "best") == [BEST_STEP]
    best_state, best_meta = _restore(workdir, "best")
    _assert_same_state(best_state, reference.best[0])
    assert best_meta == reference.best[1]
    assert _log_records(workdir) == _log_records(reference.workdir)
    assert _test_metrics(workdir) == _test_metrics(reference.workdir)
    # TensorBoard shows each epoch once (an epoch trained again replaces its first points), as the log has it.
    scalars = tensorboard_scalars(pathlib.Path(workdir) / "tensorboard")
    for key in ("loss", "val_loss", "learning_rate"):
        logged = [(record["epoch"], record[key]) for record in _log_records(workdir) if key in record]
        assert [step for step, _ in scalars[key]] == [epoch for epoch, _ in logged], key
        np.testing.assert_allclose(
            [value for _, value in scalars[key]], [value for _, value in logged], rtol=1e-6
        )


def test_the_best_checkpoint_has_the_lowest_validation_loss_and_eval_checkpoint_picks_best_or_last(
    reference,
):
    assert [record["val_loss"] for record in _log_records(reference.workdir)] == [0.5, 0.3, 0.4, 0.35]
    assert _steps(reference.workdir, "best") == [BEST_STEP]
    best_state, best_meta = reference.best
    assert int(best_state.step) == BEST_STEP
    assert (best_meta["best_epoch"], best_meta["best_val_loss"]) == (2, 0.3)
    # `latest` carries the best so far, which a resumed run compares its epochs against.
    assert (reference.latest[1]["best_epoch"], reference.latest[1]["best_val_loss"]) == (2, 0.3)
    assert _test_metrics(reference.workdir)["step"] == BEST_STEP  # training ended by scoring the best
    for which, step, expected in [
        ("best", BEST_STEP, reference.best[0]),
        ("last", LAST_STEP, reference.latest[0]),
    ]:
        config = _loop_config()
        config.eval.checkpoint = which
        restored = steps.restore_state(config, reference.workdir)
        assert int(restored.step) == step, which
        _assert_same_state(restored, expected)


def test_the_loop_steps_adam_with_the_learning_rate_of_the_staircase(reference):
    """The last update, read from the checkpoints of steps 7 and 8, is Adam's at half the learning rate
    (epochs 3-4); the log records the rate of each epoch's last step."""
    assert [record["learning_rate"] for record in _log_records(reference.workdir)] == pytest.approx(
        [1e-2, 1e-2, 5e-3, 5e-3], rel=1e-6
    )
    assert _steps(reference.workdir, "latest") == [7, 8]
    before, _ = _restore(reference.workdir, "latest", 7)
    after = reference.latest[0]
    count = 8  # Adam's bias correction after the 8th update
    mu, nu = (
        optax.tree_utils.tree_get(after.opt_state, "mu"),
        optax.tree_utils.tree_get(after.opt_state, "nu"),
    )
    for moved, old, m, v in zip(
        *(jax.tree_util.tree_leaves(tree) for tree in (after.params, before.params, mu, nu)), strict=True
    ):
        m_hat = np.asarray(m, np.float64) / (1 - 0.9**count)
        v_hat = np.asarray(v, np.float64) / (1 - 0.999**count)
        expected = -5e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(
            np.asarray(moved, np.float64) - np.asarray(old), expected, rtol=2e-3, atol=1e-7
        )


class _UnhandledSignal(Exception):
    pass


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM and SIGINT raise here rather than end pytest, should the loop leave them unhandled."""

    def handler(signal_number, frame):
        raise _UnhandledSignal(signal.Signals(signal_number).name)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, old_handler in previous.items():
            signal.signal(number, old_handler)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_gets_the_handler_from_before(signal_number):
    with _signals_raise():
        with pytest.raises(_UnhandledSignal, match=signal.Signals(signal_number).name):
            with train._StopOnSignal() as stop:
                os.kill(os.getpid(), signal_number)
                time.sleep(0.01)  # delivered at the next bytecode
                assert stop.signal_number == signal_number  # the first: recorded, the loop goes on
                os.kill(os.getpid(), signal_number)
                time.sleep(0.01)
                pytest.fail("the second signal was swallowed")


def _stop_by_signal(workdir, signal_number: int, at_step: int, **changes) -> None:
    """Runs `_train` (with `changes`) and sends this process `signal_number` right after train step
    `at_step`."""

    def send_signal(step, state, metrics):
        if step == at_step:
            os.kill(os.getpid(), signal_number)
        return state, metrics

    with _signals_raise(), pytest.raises(train.TrainingStopped) as stopped:
        _train(workdir, after_step=send_signal, **changes)
    assert stopped.value.signal_number == signal_number
    assert str(stopped.value).startswith(
        f"stopped by {signal.Signals(signal_number).name} at step {at_step};"
    )


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def stopped_at_an_epoch_end(tmp_path_factory):
    """A run stopped by SIGINT at step 6, the end of epoch 3: `latest` holds steps 5 and 6."""
    workdir = tmp_path_factory.mktemp("loop") / "sigint"
    _stop_by_signal(workdir, signal.SIGINT, 6)
    assert _steps(workdir, "latest") == [5, 6]
    return workdir


def _copy(workdir, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(workdir, tmp_path / "run"))


def test_sigterm_mid_epoch_then_the_same_command_ends_bit_identical(tmp_path, reference, capsys):
    _stop_by_signal(tmp_path, signal.SIGTERM, 3)
    assert _steps(tmp_path, "latest") == [2, 3]
    _train(tmp_path)
    assert "resumed at epoch 2, 1 steps into it (step 3)" in capsys.readouterr().out
    _assert_ends_as_the_reference(tmp_path, reference)


def test_a_signal_while_an_epochs_overlays_are_drawn_saves_that_epochs_end(tmp_path, reference):
    # The save was decided before the log and the overlays were written: a SIGTERM during them said
    # "checkpoint saved" with epoch 1 unsaved (checkpoint_every_epochs=4), and the rerun began at step 0.
    real_overlays = evaluate.validation_overlays

    def overlays_then_signal(*args, **kwargs):
        drawn = real_overlays(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return drawn

    changes = {"checkpoint_every_steps": 0, "checkpoint_every_epochs": 4}
    with (
        pytest.MonkeyPatch.context() as patch,
        _signals_raise(),
        pytest.raises(train.TrainingStopped) as stop,
    ):
        patch.setattr(evaluate, "validation_overlays", overlays_then_signal)
        _train(tmp_path, eval={"overlay_every_epochs": 1}, **changes)
    assert str(stop.value).startswith("stopped by SIGTERM at step 2;")
    assert _steps(tmp_path, "latest") == [2]
    _train(tmp_path, eval={"overlay_every_epochs": 1}, **changes)
    _assert_ends_as_the_reference(tmp_path, reference)


@pytest.mark.parametrize("stopped_at_step", [None, 5])
def test_a_data_position_saved_mid_epoch_starts_only_that_epoch(tmp_path, reference, stopped_at_step):
    # Epoch 3 is neither the best (0.4) nor, at checkpoint_every_epochs=4, saved at its end: the position
    # saved inside it (by each step's save, or by a SIGTERM's) must not start epoch 4 too, skipping batches.
    if stopped_at_step is None:
        _train(tmp_path, checkpoint_every_epochs=4)
    else:
        _stop_by_signal(
            tmp_path, signal.SIGTERM, stopped_at_step, checkpoint_every_steps=0, checkpoint_every_epochs=4
        )
        _train(tmp_path, checkpoint_every_steps=0, checkpoint_every_epochs=4)
    _assert_ends_as_the_reference(tmp_path, reference)


def test_a_resume_with_another_training_setting_is_refused_and_changes_nothing(
    tmp_path, stopped_at_an_epoch_end
):
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    recorded, steps_before = (workdir / "config.json").read_bytes(), _steps(workdir, "latest")
    with pytest.raises(UserError) as refused:
        _train(workdir, learning_rate=0.5)
    assert str(refused.value) == (
        f"learning_rate: {_loop_config().learning_rate!r} in {workdir / 'config.json'}, 0.5 now; resuming "
        "would continue that run with another setting: run it unchanged (only num_epochs, eval.* and where "
        "the data are may change), or use another --workdir"
    )
    assert (workdir / "config.json").read_bytes() == recorded and _steps(workdir, "latest") == steps_before
    # Longer training, another evaluation, the data moved: the same run.
    config = _loop_config()
    config.num_epochs, config.eval.threshold, config.data.data_dir = 9, 0.3, str(tmp_path / "moved")
    train.check_resumable(config, workdir)
    config.seed += 1
    with pytest.raises(UserError, match="^seed: "):
        train.check_resumable(config, workdir)


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["epoch end", "mid-epoch"])
def test_fewer_epochs_than_the_run_trained_is_refused_and_changes_nothing(
    tmp_path, stopped_at_an_epoch_end, mid_epoch
):
    # It evaluated, and rewrote config.json as, a run of 2 epochs that had trained 3 (or 2 and a step of
    # the third, printing "resumed at epoch 3").
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    if mid_epoch:
        shutil.rmtree(workdir / "checkpoints" / "latest" / "6")  # latest: step 5, one step into epoch 3
    recorded = (workdir / "config.json").read_bytes()
    with pytest.raises(UserError) as refused:
        _train(workdir, num_epochs=2)
    trained = "2 epochs and 1 steps (step 5)" if mid_epoch else "3 epochs (step 6)"
    assert str(refused.value) == (
        f"num_epochs: 2, but the run in {workdir} trained {trained}; set it to at least 3, or use another "
        "--workdir"
    )
    assert (workdir / "config.json").read_bytes() == recorded and not (workdir / "metrics").exists()
    _train(workdir, num_epochs=3)  # at least the epochs begun: it goes on


def test_a_finished_run_recorded_before_the_speed_options_is_evaluated_but_not_resumed_in_todays_forms(
    tmp_path,
):
    config = _loop_config()
    record = json.loads(config.to_json_best_effort())
    for key in config_lib.SPEED_OPTIONS:
        del record["model"][key]
    (tmp_path / "config.json").write_text(json.dumps(record))
    train.check_resumable(config, tmp_path, finished=True)  # only evaluated: the forms give the same model
    with pytest.raises(
        UserError, match=r"^model.batch_norm_impl: 'flax' in \S+, 'closed_form' now; resuming"
    ):
        train.check_resumable(config, tmp_path)


@pytest.mark.parametrize("key", ["data.pseudo_label_dir", "data.extra_labelled_dir"])
def test_turning_a_data_source_on_at_a_resume_is_a_changed_setting_not_moved_data(tmp_path, key):
    # With the same steps an epoch, a resume that mixed pseudo-labels into every later batch was accepted.
    config = _loop_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    section, name = key.split(".")
    config[section][name] = str(tmp_path / "source")
    with pytest.raises(UserError) as refused:
        train.check_resumable(config, tmp_path)
    assert str(refused.value).startswith(
        f"{key}: '' in {tmp_path / 'config.json'}, '{tmp_path / 'source'}' now"
    )
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    config[section][name] = str(tmp_path / "moved")  # the source moved: the same run
    train.check_resumable(config, tmp_path)


@pytest.mark.parametrize("method, refused", [("fixmatch", True), ("mean_teacher", False)])
def test_eval_threshold_is_a_training_setting_of_fixmatch_only(tmp_path, method, refused):
    # FixMatch's pseudo-labels are its probabilities thresholded at eval.threshold: changing it on resume
    # trained the rest of the run at another threshold and rewrote config.json as if all of it had.
    config = make_consistency_config()
    config.consistency.method = method
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    config.eval.threshold = 0.9
    if refused:
        with pytest.raises(UserError, match=r"^eval.threshold: 0.5 in \S+config.json, 0.9 now; resuming"):
            train.check_resumable(config, tmp_path)
    else:
        train.check_resumable(config, tmp_path)
    train.check_resumable(config, tmp_path, finished=True)  # nothing left to train: only evaluated again
    config.consistency.weight = 0.0  # no consistency loss: the threshold trains nothing
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    config.eval.threshold = 0.3
    train.check_resumable(config, tmp_path)


def test_sigint_at_an_epoch_end_then_the_same_command_ends_bit_identical(
    tmp_path, stopped_at_an_epoch_end, reference, capsys
):
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    _train(workdir)
    assert "resumed at epoch 4 (step 6)" in capsys.readouterr().out
    _assert_ends_as_the_reference(workdir, reference)


def _delete_array_data(step_folder: pathlib.Path) -> None:
    """Deletes the arrays' data files, leaving the metadata that makes the folder a checkpoint step."""
    for path in step_folder.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.unlink()


def _truncate_every_file(step_folder: pathlib.Path) -> None:
    for path in step_folder.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _arrays_of_another_step(step_folder: pathlib.Path) -> None:
    """Puts another saved step's arrays under this step's meta: they read back other than saved, without an
    error from Orbax or tensorstore, as most flipped bits in them do (tests/test_checkpoints.py)."""
    other = next(
        folder for folder in (step_folder.parent.parent / "latest").iterdir() if folder != step_folder
    )
    shutil.rmtree(step_folder / "state")
    shutil.copytree(other / "state", step_folder / "state")


DAMAGES = pytest.mark.parametrize(
    "damage",
    [_delete_array_data, _truncate_every_file, _arrays_of_another_step],
    ids=["deleted", "truncated", "another step's arrays"],
)


def _file_sizes(folder: pathlib.Path) -> dict:
    return {
        str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*") if path.is_file()
    }


@DAMAGES
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_ends_as_if_never_damaged(
    tmp_path, stopped_at_an_epoch_end, reference, capsys, damage
):
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    damaged = workdir / "checkpoints" / "latest" / "6"
    damage(damaged)
    left = _file_sizes(damaged)
    with (workdir / "train_log.jsonl").open("a") as log:
        log.write('{"epoch": 4, "lo')  # a line cut short by a kill
    _train(workdir)
    out = capsys.readouterr().out
    reason = r"ChecksumMismatchError: \w+" if damage is _arrays_of_another_step else r"\w+: "
    assert re.search(
        rf"checkpoint step 6 in \S+ is damaged \({reason}.+\); moved it to \S+ and resumed from step 5", out
    )
    assert "resumed at epoch 3, 1 steps into it (step 5)" in out
    (moved,) = (workdir / "checkpoints" / "damaged").iterdir()
    assert moved.name.startswith("latest-6-")
    assert _file_sizes(moved) == left  # the damaged files themselves, kept for inspection
    assert _steps(workdir, "latest") == [7, 8]
    _assert_ends_as_the_reference(workdir, reference)


class _Crash(Exception):
    pass


def test_checkpoint_every_epochs_saves_every_nth_epoch_end_and_a_crash_resumes_from_the_last_one(
    tmp_path, reference, capsys
):
    def crash_at_step_8(step, state, metrics):
        if step == 8:  # epoch 4's last step, before its (the run's last) save
            raise _Crash
        return state, metrics

    with pytest.raises(_Crash):
        _train(tmp_path, after_step=crash_at_step_8, checkpoint_every_steps=0, checkpoint_every_epochs=3)
    assert _steps(tmp_path, "latest") == [6]  # epoch 3's end; epochs 1, 2 unsaved
    _train(tmp_path, checkpoint_every_steps=0, checkpoint_every_epochs=3)
    assert "resumed at epoch 4 (step 6)" in capsys.readouterr().out
    assert _steps(tmp_path, "latest") == [6, 8]  # the last epoch is always saved
    _assert_ends_as_the_reference(tmp_path, reference)


def test_a_signal_or_a_due_save_between_log_steps_is_saved_at_its_step(tmp_path):
    # Logged every 4th step: steps 1 and 3 are not log steps, yet their saves must not wait for one.
    _stop_by_signal(tmp_path / "signal", signal.SIGTERM, 3, log_every_steps=4, checkpoint_every_steps=0)
    assert _steps(tmp_path / "signal", "latest") == [2, 3]

    def crash_at_step_2(step, state, metrics):
        if step == 2:
            raise _Crash
        return state, metrics

    with pytest.raises(_Crash):
        _train(tmp_path / "due", after_step=crash_at_step_2, log_every_steps=4)
    assert _steps(tmp_path / "due", "latest") == [1]


def test_validation_dice_is_logged_as_the_evaluation_gave_it(tmp_path):
    real_validation, dice = evaluate.evaluate_source, []

    def recording(*args, **kwargs):
        summary = real_validation(*args, **kwargs)
        dice.append(summary["dice"])
        return summary

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "evaluate_source", recording)
        _train(tmp_path, checkpoint_every_steps=0)
    assert len(dice) == 4 and [record["val_dice"] for record in _log_records(tmp_path)] == dice


def test_checkpoint_every_steps_saves_an_epochs_last_step_when_the_epoch_end_is_not_due(
    tmp_path, reference, capsys
):
    # Every 2nd step is every epoch's end here (2 steps an epoch), none of them due by epochs (every 4th):
    # steps 2, 4 and 6 are due by steps. They were left unsaved, for the epoch end to save.
    def crash_at_step_7(step, state, metrics):
        if step == 7:
            raise _Crash
        return state, metrics

    every_2_steps = {"checkpoint_every_steps": 2, "checkpoint_every_epochs": 4}
    with pytest.raises(_Crash):
        _train(tmp_path, after_step=crash_at_step_7, **every_2_steps)
    assert _steps(tmp_path, "latest") == [4, 6]  # the two newest kept
    _train(tmp_path, **every_2_steps)
    assert "resumed at epoch 4 (step 6)" in capsys.readouterr().out
    _assert_ends_as_the_reference(tmp_path, reference)


def test_the_epoch_loss_is_the_mean_of_its_steps_losses_whatever_the_logging_cadence(tmp_path):
    losses = {}

    def record(step, state, metrics):
        losses[step] = float(metrics["loss"])
        return state, metrics

    # Logged every 3rd step of 2-step epochs: epochs' losses are flushed across log steps and epoch ends.
    _train(tmp_path, after_step=record, log_every_steps=3, checkpoint_every_steps=0)
    records = _log_records(tmp_path)
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    for record in records:
        first = 2 * record["epoch"] - 1
        np.testing.assert_allclose(record["loss"], (losses[first] + losses[first + 1]) / 2, rtol=1e-6)


def test_a_validation_loss_equal_to_the_best_does_not_replace_it(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(INJECTED_VALIDATION_LOSS, 6, 0.3)  # ties epoch 2's best
        _train(tmp_path, checkpoint_every_steps=0)
    assert _steps(tmp_path, "best") == [BEST_STEP]
    state, meta = _restore(tmp_path, "best")
    assert (meta["best_epoch"], meta["best_val_loss"]) == (2, 0.3)


def test_remaining_time_is_printed_in_hours_minutes_and_seconds():
    assert [train._format_seconds(seconds) for seconds in (5, 68.4, 3725, 0)] == [
        "0m05s",
        "1m08s",
        "1h02m05s",
        "0m00s",
    ]


def test_validation_and_overlays_every_nth_epoch_keep_the_weights_and_pick_the_best_among_those_epochs(
    tmp_path, reference, monkeypatch
):
    drawn = []
    monkeypatch.setattr(
        visualize, "add_overlays_to_tensorboard", lambda writer, overlays, step: drawn.append(step)
    )
    # Validated at epochs 3 and 4 (the last): losses 0.4 and 0.35.
    _train(tmp_path, checkpoint_every_steps=0, eval={"validate_every_epochs": 3, "overlay_every_epochs": 3})
    assert drawn == [3, 4]  # epoch 3, then the run's last
    state, meta = _restore(tmp_path, "latest")
    _assert_same_state(state, reference.latest[0])
    assert (meta["best_epoch"], meta["best_val_loss"]) == (4, 0.35)
    assert _steps(tmp_path, "best") == [LAST_STEP]
    records, reference_records = _log_records(tmp_path), _log_records(reference.workdir)
    assert [sorted(record) for record in records[:2]] == [["epoch", "learning_rate", "loss", "step"]] * 2
    assert [record.get("val_loss") for record in records] == [None, None, 0.4, 0.35]
    assert [record["loss"] for record in records] == [record["loss"] for record in reference_records]
    assert _test_metrics(tmp_path)["step"] == LAST_STEP
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_stopped_before_its_first_validation_has_no_best_yet_and_says_how_to_use_the_latest(tmp_path):
    def crash_at_step_2(step, state, metrics):
        if step == 2:
            raise _Crash
        return state, metrics

    with pytest.raises(_Crash):
        _train(tmp_path, after_step=crash_at_step_2, eval={"validate_every_epochs": 3})
    config = _loop_config()
    with pytest.raises(
        UserError,
        match=r"no best checkpoint yet .*\(no epoch validated, or every validation loss NaN or infinite: see "
        r"train_log.jsonl\).*eval.checkpoint=last",
    ):
        steps.restore_state(config, tmp_path)
    config.eval.checkpoint = "last"
    assert int(steps.restore_state(config, tmp_path).step) == 1


def test_a_run_whose_every_validation_loss_is_nan_says_so_rather_than_that_none_ran(tmp_path, monkeypatch):
    for step in INJECTED_VALIDATION_LOSS:
        monkeypatch.setitem(INJECTED_VALIDATION_LOSS, step, float("nan"))
    with pytest.raises(UserError, match=r"every validation loss NaN or infinite: see train_log.jsonl"):
        _train(tmp_path)
    assert _steps(tmp_path, "best") == [] and _steps(tmp_path, "latest")[-1] == LAST_STEP


def test_when_every_checkpoint_is_damaged_the_run_stops_in_one_line_and_moves_nothing(
    tmp_path, stopped_at_an_epoch_end
):
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    for step in (5, 6):
        _truncate_every_file(workdir / "checkpoints" / "latest" / str(step))
    with pytest.raises(UserError) as raised:
        _train(workdir)
    assert re.fullmatch(
        r"every checkpoint in \S+ is damaged \(steps \[6, 5\]\); move the folder away to train from scratch",
        str(raised.value),
    )
    assert not (workdir / "checkpoints" / "damaged").exists()
    assert _steps(workdir, "latest") == [5, 6]


EVERY_EPOCH = {"checkpoint_every_steps": 0, "checkpoint_every_epochs": 1}


def _killed_between_epoch_2s_two_saves(workdir):
    """A run saving at each epoch's end, left as if killed after epoch 2's best save and before its latest
    one: latest [2], best [4] (validation loss 0.3)."""

    def crash_at_step_5(step, state, metrics):
        if step == 5:
            raise _Crash
        return state, metrics

    with pytest.raises(_Crash):
        _train(workdir, after_step=crash_at_step_5, **EVERY_EPOCH)
    shutil.rmtree(workdir / "checkpoints" / "latest" / "4")


def test_a_best_saved_after_the_resumed_step_stays_the_best_to_beat(tmp_path, monkeypatch):
    # The replay of epoch 2 validates worse (as on a GPU, where replays are not exact): best/ keeps step 4,
    # and the meta must name it, not epoch 1 (0.5) whose weights best/ no longer holds.
    _killed_between_epoch_2s_two_saves(tmp_path)
    for step, loss in ((4, 0.6), (6, 0.7), (8, 0.8)):
        monkeypatch.setitem(INJECTED_VALIDATION_LOSS, step, loss)
    _train(tmp_path, **EVERY_EPOCH)
    assert _steps(tmp_path, "best") == [4]
    _, best_meta = _restore(tmp_path, "best")
    _, last_meta = _restore(tmp_path, "latest")
    assert (best_meta["best_epoch"], best_meta["best_val_loss"]) == (2, 0.3)
    assert (last_meta["best_epoch"], last_meta["best_val_loss"]) == (2, 0.3)  # it was (1, 0.5)


def test_a_damaged_best_saved_after_the_resumed_step_is_warned_not_a_traceback(tmp_path, capsys):
    _killed_between_epoch_2s_two_saves(tmp_path)
    _truncate_every_file(tmp_path / "checkpoints" / "best" / "4")
    _train(tmp_path, **EVERY_EPOCH)
    assert re.search(r"warning: best checkpoint step 4 in \S+ is unreadable \(\w+\)", capsys.readouterr().out)
    # The replay's epoch 2 (0.3, the best again) replaced it.
    _, best_meta = _restore(tmp_path, "best")
    assert _steps(tmp_path, "best") == [4] and best_meta["best_val_loss"] == 0.3


def test_checkpoints_from_before_steps_per_epoch_tell_it_by_their_step():
    # By hand: 3 finished epochs in 6 steps are 2 a step; 2 epochs and 1 step into the third at step 5, too.
    # A meta older still has no epoch_steps: it was saved at an epoch's end.
    for meta, step in (
        ({"epoch": 3, "epoch_steps": 0}, 6),
        ({"epoch": 2, "epoch_steps": 1}, 5),
        ({"epoch": 3}, 6),
    ):
        checkpoints.check_steps_per_epoch(meta, step, 2, 8)
        with pytest.raises(
            UserError, match=r"^data: the run trained 2 steps an epoch, its training split now "
        ):
            checkpoints.check_steps_per_epoch(meta, step, 1, 4)
    checkpoints.check_steps_per_epoch({"epoch": 0, "epoch_steps": 1}, 1, 5, 20)  # no epoch finished: unknown
    with pytest.raises(UserError, match=r"trained 3 steps an epoch"):  # the key, where the meta has it
        checkpoints.check_steps_per_epoch({"steps_per_epoch": 3, "epoch": 0}, 1, 2, 8)


def test_a_refused_resume_moves_no_damaged_checkpoint_aside(tmp_path, stopped_at_an_epoch_end):
    # The config was compared after restoring, which had already moved the damaged step 6 to damaged/.
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    _truncate_every_file(workdir / "checkpoints" / "latest" / "6")
    with pytest.raises(UserError, match="^learning_rate: "):
        _train(workdir, learning_rate=0.5)
    assert not (workdir / "checkpoints" / "damaged").exists()
    assert _steps(workdir, "latest") == [5, 6]


def test_a_resume_whose_training_split_changed_size_is_refused(
    tmp_path, stopped_at_an_epoch_end, monkeypatch
):
    # Data paths may change on resume, and an edited data folder is prepared anew: with 4 of the 8 training
    # slices an epoch is 1 step, and step 6 would fall at another epoch and learning rate.
    workdir = _copy(stopped_at_an_epoch_end, tmp_path)
    recorded = (workdir / "config.json").read_bytes()
    load_source = datasets.load_source

    def fewer_training_slices(data, split):
        source = load_source(data, split)
        return [source[index] for index in range(4)] if split == data.train_split else source

    monkeypatch.setattr(datasets, "load_source", fewer_training_slices)
    with pytest.raises(UserError) as refused:
        _train(workdir)
    assert str(refused.value) == (
        "data: the run trained 2 steps an epoch, its training split now gives 1 (4 slices); resuming would "
        "move its learning-rate schedule and epochs: point the data paths at the run's data, or use another "
        "--workdir"
    )
    assert (workdir / "config.json").read_bytes() == recorded and _steps(workdir, "latest") == [5, 6]


def test_a_non_finite_validation_loss_is_never_the_best(tmp_path, monkeypatch):
    monkeypatch.setitem(INJECTED_VALIDATION_LOSS, 2, float("nan"))  # epoch 1's; epoch 2's 0.3 is the lowest
    _train(tmp_path)
    assert _steps(tmp_path, "best") == [BEST_STEP]
    _, meta = _restore(tmp_path, "best")
    assert (meta["best_val_loss"], meta["best_epoch"]) == (0.3, 2)


def test_a_non_finite_loss_after_a_good_checkpoint_leaves_it_intact_and_restorable(tmp_path, reference):
    def diverge_at_step_5(step, state, metrics):
        if step != 5:
            return state, metrics
        nan = jnp.float32(jnp.nan)
        diverged = state.replace(params=jax.tree_util.tree_map(lambda p: p * nan, state.params))
        return diverged, {**metrics, "loss": nan}

    with pytest.raises(train.NonFiniteLossError, match=r"^loss is nan at step 5; training stopped"):
        _train(tmp_path, after_step=diverge_at_step_5)
    assert _steps(tmp_path, "latest") == [3, 4]  # step 5 was due to be saved (checkpoint_every_steps=1)
    assert _steps(tmp_path, "best") == [4]
    config = _loop_config()
    config.eval.checkpoint = "last"
    restored = steps.restore_state(config, tmp_path)
    assert int(restored.step) == 4
    _assert_same_state(restored, reference.best[0])  # the uninterrupted run's state at step 4


def test_an_infinite_gradient_of_a_finite_loss_stops_before_its_update_is_saved(tmp_path, reference):
    # Step 5's loss was finite, its gradient not: the parameters it left are NaN, and must not be kept.
    def overflow_at_step_5(step, state, metrics):
        if step != 5:
            return state, metrics
        diverged = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
        return diverged, {**metrics, "gradient_norm": jnp.float32(jnp.inf)}

    with pytest.raises(train.NonFiniteLossError) as stopped:
        _train(tmp_path, after_step=overflow_at_step_5)
    assert re.fullmatch(
        r"the gradient norm is inf \(loss \d\.\d{4}\) at step 5; training stopped, the last good checkpoint "
        r"is kept \(lower learning_rate or check the data\)",
        str(stopped.value),
    )
    assert _steps(tmp_path, "latest") == [3, 4]
    _assert_same_state(_restore(tmp_path, "latest")[0], reference.best[0])  # the state at step 4


def test_a_loss_that_diverges_at_once_stops_naming_the_step_and_saves_nothing(tmp_path):
    config = make_tiny_config()  # saves at epoch ends only
    config.learning_rate = 1e30
    with pytest.raises(train.NonFiniteLossError, match=r"^loss is nan at step \d; training stopped"):
        train.train_and_evaluate(config, tmp_path)
    assert _steps(tmp_path, "latest") == _steps(tmp_path, "best") == []


def test_a_finished_run_given_the_same_command_only_evaluates_again(tmp_path, reference, capsys):
    workdir = _copy(reference.workdir, tmp_path)
    checkpoint_files = {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for path in (workdir / "checkpoints").rglob("*")
        if path.is_file()
    }
    log = (workdir / "train_log.jsonl").read_text()
    (workdir / "metrics" / "test.json").unlink()  # rewritten by the evaluation
    trained = []

    def count_steps(step, state, metrics):
        trained.append(step)
        return state, metrics

    _train(workdir, after_step=count_steps)
    out = capsys.readouterr().out
    assert trained == []
    assert not re.search(r"^epoch \d", out, re.MULTILINE)  # no training and no validation epoch
    # It said "resumed at epoch 5" of a 4-epoch run.
    assert "all 4 epochs trained: evaluating only (step 8)" in out and re.search(r"^test: dice \d", out, re.M)
    assert {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for path in (workdir / "checkpoints").rglob("*")
        if path.is_file()
    } == checkpoint_files
    assert (workdir / "train_log.jsonl").read_text() == log
    assert _test_metrics(workdir) == _test_metrics(reference.workdir)


def test_model_init_starts_from_that_runs_weights_with_a_fresh_optimizer_and_a_resume_keeps_its_own(
    tmp_path, reference, monkeypatch, capsys
):
    starts = []  # the state each command's first train step starts from
    real_compile = train.compiled_train_step

    def recording(config, state, *args):
        starts.append(jax.device_get(state))
        return real_compile(config, state, *args)

    monkeypatch.setattr(train, "compiled_train_step", recording)
    _train(tmp_path, model_init=str(reference.workdir), num_epochs=1)
    # The reference is scored with its best checkpoint (eval.checkpoint='best'): its weights are the start.
    assert f"model_init: parameters and BatchNorm statistics of {reference.workdir} (step {BEST_STEP})" in (
        capsys.readouterr().out
    )
    config = _loop_config()
    fresh = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    pretrained = reference.best[0]
    assert int(starts[0].step) == 0
    with pytest.raises(AssertionError):  # the reference's weights are not a fresh draw: the check can fail
        _assert_same_state(fresh.params, pretrained.params)
    _assert_same_state(starts[0].params, pretrained.params)
    _assert_same_state(starts[0].batch_stats, pretrained.batch_stats)
    _assert_same_state((starts[0].opt_state, starts[0].dropout_key), (fresh.opt_state, fresh.dropout_key))

    after_first_command, _ = _restore(tmp_path, "latest")
    _train(tmp_path, model_init=str(reference.workdir), num_epochs=2)
    assert int(starts[1].step) == 2
    _assert_same_state(starts[1], after_first_command)
    assert "model_init:" not in capsys.readouterr().out


@DAMAGES
def test_a_damaged_model_init_checkpoint_stops_in_one_line_naming_it(tmp_path, reference, damage):
    pretrained = _copy(reference.workdir, tmp_path)
    damage(pretrained / "checkpoints" / "best" / str(BEST_STEP))  # the checkpoint the run is scored with
    with pytest.raises(UserError) as refused:
        _train(tmp_path / "fine_tuned", model_init=str(pretrained))
    assert re.fullmatch(
        f"model_init: checkpoint step {BEST_STEP} in "
        f"{re.escape(str(pretrained / 'checkpoints' / 'best'))} is damaged "
        + (r"\(ChecksumMismatchError\)" if damage is _arrays_of_another_step else r"\(\w+\)"),
        str(refused.value),
    )
    assert not (tmp_path / "fine_tuned").exists()


def test_a_bad_model_init_stops_in_one_line_and_writes_nothing(tmp_path, reference):
    """(The command line prints a UserError as one line and exits 2: tests/test_main.py.)"""
    workdir = tmp_path / "fine_tuned"
    with pytest.raises(
        UserError, match=r"^model_init: no checkpoint in .*never_trained.checkpoints.latest \("
    ):
        _train(workdir, model_init=str(tmp_path / "never_trained"))
    config = _loop_config()
    config.update(model_init=str(reference.workdir))
    config.model.features = 8
    with pytest.raises(UserError) as refused:
        train.train_and_evaluate(config, workdir)
    assert str(refused.value) == (
        f"model_init: checkpoint in {reference.workdir / 'checkpoints' / 'best' / str(BEST_STEP)} was made "
        "by another model: model.features=4 in the checkpoint, 8 in the config"
    )
    assert not workdir.exists()


class _ComputedWhenRead:
    """A step's loss whose second of compute is charged when the host reads it, as JAX's asynchronous
    dispatch does: the step is still running until then."""

    def __init__(self, value, clock):
        self.value, self.clock, self.running = value, clock, True

    def __float__(self):
        self.clock[0] += 1.0 if self.running else 0.0
        self.running = False
        return float(self.value)


def test_images_per_second_time_the_train_steps_and_the_time_left_counts_the_epoch_ends_too(
    tmp_path, monkeypatch, capsys
):
    # A clock seen only by the loop: each train step takes 1 s (charged when its loss is read), each
    # validation 100 s. The printed rate once took in every validation (161.8 img/s, then 3.8 after the
    # first epoch's end, on the tiny run), then the steps still running at an epoch's end.
    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_validation = evaluate.evaluate_source

    def slow_validation(*args, **kwargs):
        clock[0] += 100.0
        return real_validation(*args, **kwargs)

    def one_second_steps(step, state, metrics):
        return state, {**metrics, "loss": _ComputedWhenRead(metrics["loss"], clock)}

    monkeypatch.setattr(evaluate, "evaluate_source", slow_validation)
    # Logged every 3rd step, 2 steps an epoch: step 4 is still pending when epoch 2 ends.
    _train(tmp_path, after_step=one_second_steps, log_every_steps=3, checkpoint_every_steps=0)
    config = _loop_config()
    printed = re.findall(r"step (\d+)/8 ([\d.]+) img/s loss \S+ left (\S+)", capsys.readouterr().out)
    # Step 3 starts the clock; steps 4 to 6 take 3 s and epoch 2's validation 100 s.
    assert printed == [("6", f"{config.batch_size:.1f}", train._format_seconds(2 * 103 / 3))]
    # Each epoch's logged time: its two steps and its validation.
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [record["seconds"] for record in logged] == [102.0] * 4
