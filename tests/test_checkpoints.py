"""Orbax round trips of the whole train state."""

import asyncio
import binascii
import errno
import json
import os
import re
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_same_training_state, make_tiny_config

from rdunet_jax import checkpoints, devices, models, steps
from rdunet_jax.errors import UserError


def test_save_then_restore_gives_identical_state(tmp_path, tiny_state):
    config = make_tiny_config()
    batch = {
        "image": np.random.default_rng(0).random((4, 32, 32, 1), np.float32),
        "mask": (np.random.default_rng(1).random((4, 32, 32, 1)) > 0.7).astype(np.float32),
    }
    state, _ = steps.train_step(tiny_state, batch)  # non-trivial optimizer state and batch stats
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "iterator": {"next_index": 3}, "best_val_loss": 0.5, "best_epoch": 1}
    run_checkpoints.save("latest", int(state.step), state, meta)
    run_checkpoints.wait()

    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    restored_state, restored_meta = run_checkpoints.restore("latest", target)
    run_checkpoints.close()
    assert restored_meta == {**meta, "checksums": restored_meta["checksums"]}
    assert sorted(restored_meta["checksums"]) == ["batch_stats", "dropout_key", "opt_state", "params", "step"]
    assert int(restored_state.step) == 1
    for name in ("params", "batch_stats", "opt_state", "dropout_key"):
        original = jax.tree_util.tree_leaves(getattr(state, name))
        restored = jax.tree_util.tree_leaves(getattr(restored_state, name))
        assert len(original) == len(restored) > 0
        for a, b in zip(original, restored, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_without_checkpoint_returns_none(tmp_path, tiny_state):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "empty")
    assert run_checkpoints.restore("latest", tiny_state) is None
    run_checkpoints.close()


def test_without_create_nothing_is_made(tmp_path):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "absent", create=False)
    assert run_checkpoints.all_steps("best") == run_checkpoints.all_steps("latest") == []
    run_checkpoints.close()
    assert not (tmp_path / "absent").exists()


@pytest.fixture
def slow_json_writes(monkeypatch):
    """Every checkpoint's JSON item written half a second late, in Orbax's background thread."""
    original_write = ocp.handlers.JsonCheckpointHandler._save_fn

    async def slow_write(self, item, directory):
        await asyncio.sleep(0.5)
        await original_write(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", slow_write)


def test_meta_is_saved_as_it_was_when_save_was_called(tmp_path, tiny_state, slow_json_writes):
    """The train loop changes its meta dict right after saving; a slow background write must not see that."""
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 2, "iterator": {"next_index": 5}, "epoch_steps": 1}
    run_checkpoints.save("latest", 5, tiny_state, meta)
    meta.update(epoch=3, iterator=None, epoch_steps=0)
    run_checkpoints.wait()
    _, restored_meta = run_checkpoints.restore("latest", tiny_state)
    run_checkpoints.close()
    del restored_meta["checksums"]
    assert restored_meta == {"epoch": 2, "iterator": {"next_index": 5}, "epoch_steps": 1}


def _array_data_files(step_folder):
    return [path for path in step_folder.rglob("*") if path.is_file() and path.parent.name == "d"]


# A damaged read stops orbax's other shard reads mid-flight; their abandoned coroutines are collected later
# and reported as unraisable (dozens a run, more under load): noise in the output, not a failure here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flipped_bit_in_a_stored_array_is_damage_never_other_weights(tmp_path):
    """Orbax and tensorstore keep no checksum of array data: without the meta's, most of these flips read back
    as other numbers without an error. Where a flip lands depends on tensorstore's file layout, so each of
    12 places across the largest data file is tried; every one must be refused or read back unchanged."""
    config = make_tiny_config()
    state = _with_moved_weights(config)
    _save_latest(tmp_path, state, config)
    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    largest = max(
        _array_data_files(tmp_path / "checkpoints" / "latest" / "1"), key=lambda p: p.stat().st_size
    )
    intact = largest.read_bytes()
    outcomes = []
    for place in np.linspace(0, len(intact) - 1, 12).astype(int):
        flipped = bytearray(intact)
        flipped[place] ^= 0x10
        largest.write_bytes(bytes(flipped))
        run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints", create=False)
        try:
            restored, _ = run_checkpoints.restore("latest", target, 1)
        except checkpoints.ChecksumMismatchError as error:
            assert re.fullmatch(
                r"(params|opt_state|batch_stats|step|dropout_key)(, \w+)* in \S+latest/1 read back other "
                r"than saved \(CRC-32 [0-9a-f]{8} saved, [0-9a-f]{8} read(, [0-9a-f]{8} saved, [0-9a-f]{8} "
                r"read)*\)",
                str(error),
            )
            outcomes.append("checksum")
        except Exception as error:  # noqa: BLE001 - tensorstore's own refusal of a damaged index
            outcomes.append(type(error).__name__)
        else:
            for leaf, saved in zip(
                jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state), strict=True
            ):
                np.testing.assert_array_equal(np.asarray(leaf), np.asarray(saved))
            outcomes.append("unchanged")
        finally:
            run_checkpoints.close()
    assert outcomes.count("checksum") >= 4, outcomes


def test_the_recorded_checksum_is_the_crc32_of_each_parts_names_dtypes_shapes_and_bytes_in_name_order():
    """The format checkpoints on disk were recorded in: any change to it would call every one damaged."""
    kernel, bias = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1.0, 2.0], np.float32)
    state = {"step": 7, "params": {"conv": {"kernel": jax.numpy.asarray(kernel), "bias": bias}}}
    params = (
        b"params/conv/bias:<f4:(3,)" + bias.tobytes() + b"params/conv/kernel:<f4:(2, 3)" + kernel.tobytes()
    )
    assert checkpoints.state_checksums(state) == {
        "params": f"{binascii.crc32(params):08x}",
        # A Python number is stored, and read back, as JAX's int32.
        "step": f"{binascii.crc32(b'step:<i4:()' + np.int32(7).tobytes()):08x}",
    }


def test_a_checkpoint_saved_before_checksums_is_trusted_and_model_init_checks_only_what_it_reads(tmp_path):
    config = make_tiny_config()
    state = _with_moved_weights(config)
    _save_latest(tmp_path, state, config)
    meta_file = tmp_path / "checkpoints" / "latest" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    saved = dict(meta["checksums"])
    # Another optimizer state than saved: model_init reads only the parameters and statistics.
    meta["checksums"]["opt_state"] = "00000000"
    meta_file.write_text(json.dumps(meta))
    assert checkpoints.restore_weights(tmp_path, config.model, config.data)[2] == 1
    meta["checksums"]["params"] = "00000000"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"^model_init: checkpoint step 1 in .* is damaged \(ChecksumMismatchError\)$"
    ):
        checkpoints.restore_weights(tmp_path, config.model, config.data)
    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints", create=False)
    with pytest.raises(checkpoints.ChecksumMismatchError) as mismatch:
        run_checkpoints.restore("latest", target, 1)
    assert str(mismatch.value) == (
        f"params, opt_state in {tmp_path / 'checkpoints' / 'latest' / '1'} read back other than saved "
        f"(CRC-32 00000000 saved, {saved['params']} read, 00000000 saved, {saved['opt_state']} read)"
    )
    del meta["checksums"]
    meta_file.write_text(json.dumps(meta))
    restored, restored_meta = run_checkpoints.restore("latest", target, 1)
    run_checkpoints.close()
    assert "checksums" not in restored_meta
    assert_same_training_state(restored, state)


def test_a_latest_saved_at_the_best_step_is_written_only_once_that_best_is_on_disk(
    tmp_path, tiny_state, monkeypatch, slow_json_writes
):
    # An epoch end saves best, then latest, both in the background. Killed after latest/S but before
    # best/S landed, the resumed run read "best: epoch S" from latest's meta while best/ held an older step,
    # and scored those weights.
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    latest = run_checkpoints._managers["latest"]
    best_on_disk_when_latest_started = []

    def save_latest(step, *args, **kwargs):
        best_on_disk_when_latest_started.append((tmp_path / "checkpoints" / "best" / str(step)).is_dir())
        return type(latest).save(latest, step, *args, **kwargs)

    monkeypatch.setattr(latest, "save", save_latest)
    meta = {"epoch": 1, "best_epoch": 1}
    run_checkpoints.save("best", 2, tiny_state, meta)
    run_checkpoints.save("latest", 2, tiny_state, meta)
    run_checkpoints.wait()
    run_checkpoints.close()
    assert best_on_disk_when_latest_started == [True]


def _save_latest(workdir, state, config):
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(config.model, config.data)}
    if state.consistency:
        meta[checkpoints.MEAN_TEACHER] = True
    run_checkpoints.save("latest", int(state.step), state, meta)
    run_checkpoints.wait()
    run_checkpoints.close()


def _with_moved_weights(config):
    """The tiny model's state from `config`'s seed with every weight and statistic moved: values no fresh
    state holds (moved by hand, not by a train step: compiling one costs seconds and proves nothing here)."""
    state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    moved = jax.tree_util.tree_map(lambda leaf: leaf + 0.25, (state.params, state.batch_stats))
    return state.replace(step=state.step + 1, params=moved[0], batch_stats=moved[1])


@pytest.mark.parametrize("mean_teacher", [False, True], ids=["adam", "mean_teacher"])
def test_restore_weights_reads_params_and_batch_stats_whatever_the_optimizer(tmp_path, mean_teacher):
    config = make_tiny_config()
    if mean_teacher:  # Adam chained with the parameters' moving average: another optimizer state
        config.loss, config.data.unlabelled_fraction = "dice_weighted", 0.5
        config.consistency.weight = 1.0
    state = _with_moved_weights(config)
    _save_latest(tmp_path, state, config)
    params, batch_stats, step = checkpoints.restore_weights(tmp_path, config.model, config.data)
    assert step == 1
    for name, restored in (("params", params), ("batch_stats", batch_stats)):
        expected = jax.tree_util.tree_leaves_with_path(getattr(state, name))
        got = dict(jax.tree_util.tree_leaves_with_path(restored))
        assert len(got) == len(expected) > 0
        for path, leaf in expected:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf))


def test_restore_weights_refuses_another_model_and_a_folder_without_checkpoints_in_one_line(tmp_path):
    config = make_tiny_config()
    _save_latest(tmp_path / "run", _with_moved_weights(config), config)
    wider = make_tiny_config()
    wider.model.features = 8
    with pytest.raises(
        UserError,
        match=r"^model_init: checkpoint in .* another model: model\.features=4 in "
        r"the checkpoint, 8 in the config$",
    ):
        checkpoints.restore_weights(tmp_path / "run", wider.model, wider.data)
    # Training settings are not the architecture: a frozen BatchNorm fine-tunes (or resumes) the same model.
    frozen = make_tiny_config()
    frozen.model.batch_norm_frozen = True
    assert checkpoints.restore_weights(tmp_path / "run", frozen.model, frozen.data)[2] == 1
    with pytest.raises(UserError, match=r"^model_init: no checkpoint in .*empty.checkpoints.latest \("):
        checkpoints.restore_weights(tmp_path / "empty", config.model, config.data)


def test_restore_weights_calls_a_checkpoint_with_cut_files_damaged_in_one_line(tmp_path):
    config = make_tiny_config()
    _save_latest(tmp_path, _with_moved_weights(config), config)
    for path in (tmp_path / "checkpoints" / "latest" / "1" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    # The reason is the error's type, as orbax or tensorstore raised it.
    with pytest.raises(
        UserError, match=r"^model_init: checkpoint step 1 in .*latest is damaged \((?!NoneType)\w+\)$"
    ):
        checkpoints.restore_weights(tmp_path, config.model, config.data)


def test_restore_weights_refuses_a_checkpoint_of_other_classes_with_the_same_head(tmp_path):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = "exclusive", ("ggo", "consolidation"), "dice_ce"
    _save_latest(tmp_path, _with_moved_weights(config), config)
    lungs = config.copy_and_resolve_references()
    lungs.data.classes = ("lungs", "infection")  # the same channels, other meanings
    with pytest.raises(
        checkpoints.ModelMismatchError,
        match=r"data\.classes=\['ggo', 'consolidation'\] in the checkpoint, \['lungs', 'infection'\] in the "
        r"config$",
    ):
        checkpoints.restore_weights(tmp_path, lungs.model, lungs.data)


def test_a_damaged_step_is_moved_aside_once_by_the_first_host_and_then_gone_for_every_host(
    tmp_path, tiny_state, monkeypatch
):
    # Two hosts of one run on shared storage, as threads: each its own managers, its own process index,
    # the coordination service's barrier a threading.Barrier.
    directory = tmp_path / "checkpoints"
    writer = checkpoints.RunCheckpoints(directory)
    for step in (1, 2):
        writer.save("latest", step, tiny_state, {"epoch": step})
    writer.close()
    files = sorted(path.name for path in (directory / "latest" / "2").iterdir())
    hosts = [checkpoints.RunCheckpoints(directory, create=False) for _ in range(2)]
    barrier, barrier_names, host = threading.Barrier(2, timeout=60), [], threading.local()
    monkeypatch.setattr(jax, "process_index", lambda: getattr(host, "index", 0))
    monkeypatch.setattr(
        devices, "wait_for_every_host", lambda name: (barrier_names.append(name), barrier.wait())
    )
    moved_to, errors = [None, None], []

    def quarantine(index):
        host.index = index
        try:
            moved_to[index] = hosts[index].quarantine("latest", 2)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=quarantine, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    (moved,) = (directory / "damaged").iterdir()
    assert moved.name.startswith("latest-2-")
    assert moved_to == [moved, moved]  # both hosts report the same folder
    assert sorted(path.name for path in moved.iterdir()) == files
    assert all(run_checkpoints.all_steps("latest") == [1] for run_checkpoints in hosts)
    # Two barriers (named, then moved), each passed by both hosts, named after the step they are for.
    assert len(barrier_names) == 4 and len(set(barrier_names)) == 2
    assert all(isinstance(name, str) and name.endswith("_latest_2") for name in barrier_names)
    for run_checkpoints in hosts:
        run_checkpoints.close()


def test_a_damaged_step_is_named_after_its_folders_time_and_a_second_one_of_that_name_gets_a_number(
    tmp_path, tiny_state
):
    directory = tmp_path / "checkpoints"
    run_checkpoints = checkpoints.RunCheckpoints(directory)
    written = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))  # local time, as the name is
    moved = []
    for _ in range(3):  # the same step saved again and damaged again, within the same second
        run_checkpoints.save("latest", 2, tiny_state, {"epoch": 1})
        run_checkpoints.wait()
        os.utime(directory / "latest" / "2", (written, written))
        moved.append(run_checkpoints.quarantine("latest", 2).name)
    run_checkpoints.save("latest", 3, tiny_state, {"epoch": 1})
    run_checkpoints.wait()
    moved.append(run_checkpoints.quarantine("latest", 3).name)  # into the existing damaged/
    run_checkpoints.close()
    assert moved == [
        "latest-2-20260102-030405",
        "latest-2-20260102-030405-1",
        "latest-2-20260102-030405-2",
        moved[3],
    ]
    assert moved[3].startswith("latest-3-")
    assert sorted(path.name for path in (directory / "damaged").iterdir()) == sorted(moved)
    assert run_checkpoints.all_steps("latest") == []


@pytest.mark.parametrize("scored_with, expected_step", [("best", 1), ("last", 3), (None, 3)])
def test_model_init_takes_the_checkpoint_the_run_is_scored_with(tmp_path, scored_with, expected_step):
    # A self-training student started from its teacher starts from the weights that made its pseudo-labels.
    config = make_tiny_config()
    state = _with_moved_weights(config)
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(config.model, config.data)}
    run_checkpoints.save("best", 1, state.replace(step=1), meta)
    moved_again = state.replace(step=3, params=jax.tree_util.tree_map(lambda leaf: leaf + 1.0, state.params))
    run_checkpoints.save("latest", 3, moved_again, meta)
    run_checkpoints.wait()
    run_checkpoints.close()
    if scored_with is not None:
        config.eval.checkpoint = scored_with
        (tmp_path / "config.json").write_text(config.to_json())
    params, _, step = checkpoints.restore_weights(tmp_path, config.model, config.data)
    assert step == expected_step
    expected = state.params if expected_step == 1 else moved_again.params
    for got, leaf in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError("out of memory"),
        OSError(24, "Too many open files"),
        RuntimeError("RESOURCE_EXHAUSTED: 2GB"),
    ],
    ids=["memory", "file handles", "device memory"],
)
def test_a_checkpoint_unread_for_want_of_memory_or_files_is_not_moved_aside_as_damaged(
    tmp_path, tiny_state, failure, monkeypatch
):
    # The intact newest step went to damaged/ and the run trained its steps again.
    directory = tmp_path / "checkpoints"
    writer = checkpoints.RunCheckpoints(directory)
    for step in (1, 2):
        writer.save("latest", step, tiny_state, {"epoch": step})
    writer.close()
    run_checkpoints = checkpoints.RunCheckpoints(directory, create=False)

    def failing_restore(kind, target, step, **kwargs):
        raise failures[0]

    failures = [failure]
    monkeypatch.setattr(run_checkpoints, "restore", failing_restore)
    with pytest.raises(UserError) as raised:
        checkpoints.restore_latest(run_checkpoints, tiny_state, make_tiny_config())
    assert str(raised.value) == (
        f"cannot read checkpoint step 2 in {directory / 'latest'} ({type(failure).__name__}: {failure}); out "
        "of memory or file handles, nothing was moved: free them and run again"
    )
    assert run_checkpoints.all_steps("latest") == [1, 2] and not (directory / "damaged").exists()
    failures[0] = ValueError("cut file")  # a damaged checkpoint: every step tried, as before
    with pytest.raises(UserError, match=r"^every checkpoint in .* is damaged \(steps \[2, 1\]\)"):
        checkpoints.restore_latest(run_checkpoints, tiny_state, make_tiny_config())
    run_checkpoints.close()


def test_model_init_checks_the_batchnorm_statistics_checksum_alone_too(tmp_path):
    config = make_tiny_config()
    _save_latest(tmp_path, _with_moved_weights(config), config)
    meta_file = tmp_path / "checkpoints" / "latest" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["batch_stats"] = "00000000"  # the running statistics read back other than saved
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"^model_init: checkpoint step 1 in .* is damaged \(ChecksumMismatchError\)$"
    ):
        checkpoints.restore_weights(tmp_path, config.model, config.data)


def test_a_model_config_without_a_head_is_binary_and_every_differing_setting_is_named(tmp_path):
    config = make_tiny_config()
    del config.model["head"]  # a run from before the heads existed
    assert checkpoints.architecture(config.model)["head"] == "binary"
    saved = checkpoints.architecture(make_tiny_config().model)
    checkpoints.check_architecture(saved, config.model, tmp_path)  # the same model
    wider = make_tiny_config()
    wider.model.features, wider.model.use_se = 8, False
    with pytest.raises(checkpoints.ModelMismatchError) as raised:
        checkpoints.check_architecture(saved, wider.model, tmp_path)
    assert str(raised.value) == (
        f"checkpoint in {tmp_path} was made by another model: model.features=4 in the checkpoint, 8 in the "
        "config; model.use_se=True in the checkpoint, False in the config"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MemoryError(), True),
        (OSError(errno.ENOMEM, "x"), True),  # the errno alone, whatever the words
        (OSError(errno.ENFILE, "x"), True),
        (OSError(errno.EMFILE, "x"), True),
        (RuntimeError("RESOURCE_EXHAUSTED: 2GB"), True),
        (ValueError("Too many open files"), True),  # tensorstore's words, not an OSError
        (ValueError("Cannot allocate memory"), True),
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (ValueError("cut file"), False),
    ],
)
def test_not_damage_is_want_of_memory_or_file_handles_by_type_errno_or_words(error, expected):
    assert checkpoints.not_damage(error) is expected
