"""rdunet_jax/files.py: atomic writes (a file is absent, old or whole) and the run folder's lock (one run per
folder, never blocked by a dead one)."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest
from helpers import make_tiny_config, refusal

from rdunet_jax import files
from rdunet_jax.errors import UserError


def test_an_atomic_write_creates_the_folders_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "summary.json"
    files.write_json_atomic(path, {"b": 1, "a": [0.5]})
    assert path.read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}\n'  # sorted keys, indented
    files.write_text_atomic(path, "é\n")
    assert path.read_bytes() == b"\xc3\xa9\n"  # UTF-8 whatever the locale
    assert [entry.name for entry in path.parent.iterdir()] == ["summary.json"]


def test_an_atomic_write_gets_the_mode_a_plainly_written_file_gets(tmp_path):
    # Not mkstemp's private 0600: metrics, masks and models are read by other users of a shared server.
    (tmp_path / "plain.json").write_text("{}")
    files.write_json_atomic(tmp_path / "atomic.json", {})
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("plain.json", "atomic.json")}
    assert modes["atomic.json"] == modes["plain.json"] != 0o600


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(TypeError), files.atomic_path(path) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".metrics.json.")
        assert temporary.suffix == ".tmp" and temporary.read_bytes() == b""
        temporary.write_text("half")
        json.dumps(object())  # a value that cannot be written, midway
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(KeyboardInterrupt), files.atomic_path(path) as temporary:  # Ctrl-C too
        raise KeyboardInterrupt
    assert not temporary.exists() and path.read_text() == "old"
    with pytest.raises(ValueError), files.atomic_path(path) as temporary:  # a writer that cleaned up itself
        temporary.unlink()
        raise ValueError("the writer's own error, not the clean-up's")
    assert path.read_text() == "old"


def test_the_longest_name_an_atomic_write_takes_and_one_byte_more_named_as_asked(tmp_path):
    longest = tmp_path / ("n" * files.MAX_NAME_BYTES)
    with files.atomic_path(longest) as temporary:
        temporary.write_text("x")
    assert longest.read_text() == "x"
    too_long = tmp_path / ("n" * (files.MAX_NAME_BYTES + 1))
    with pytest.raises(OSError) as refused, files.atomic_path(too_long):
        pass
    # The file asked for, not the temporary name (15 bytes longer) that the file system refused.
    assert (refused.value.errno, refused.value.filename) == (errno.ENAMETOOLONG, str(too_long))
    assert [entry.name for entry in tmp_path.iterdir()] == [longest.name]


def _refusal(workdir, holder: str) -> str:
    return (
        f"--workdir: {workdir} is in use by another run ({holder}); wait for it to end, stop it, or "
        "choose another --workdir"
    )


def _this_process() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


def test_a_second_run_of_a_held_folder_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir):
        assert (workdir / ".lock").read_text() == _this_process() + "\n"
        (workdir / "log").write_text("kept")
        with pytest.raises(UserError) as refused, files.exclusive_workdir(workdir):
            pytest.fail("entered a held folder")
        assert str(refused.value) == _refusal(workdir, _this_process())
        assert (workdir / ".lock").exists()  # the refused run leaves the holder's lock alone
    assert sorted(path.name for path in workdir.iterdir()) == ["log"]  # the lock goes with its run
    with files.exclusive_workdir(workdir):  # and the next run gets it
        pass


HOLD = """
import sys, time
from rdunet_jax import files
with files.exclusive_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_workdir_that_cannot_be_created_is_refused_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    workdir = tmp_path / "a_file" / "run"
    with pytest.raises(UserError, match=f"^--workdir: cannot create {workdir} \\(Not a directory\\)$"):
        with files.exclusive_workdir(workdir):
            pass


def test_a_run_killed_with_minus_9_does_not_block_the_next(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as refused, files.exclusive_workdir(workdir):
            pass
        assert str(refused.value) == _refusal(workdir, f"process {holder.pid} on {socket.gethostname()}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (workdir / ".lock").exists()  # nothing ran its clean-up
    with files.exclusive_workdir(workdir):
        assert (workdir / ".lock").read_text() == _this_process() + "\n"  # the dead run's line replaced


def test_a_folder_the_lock_created_goes_when_the_run_leaves_it_empty(tmp_path):
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(UserError), files.exclusive_workdir(fresh):
        raise UserError("a bad model_init")
    assert not fresh.exists() and (tmp_path / "fresh").exists()  # only the folder it made
    existing = tmp_path / "existing"
    existing.mkdir()
    with files.exclusive_workdir(existing):
        pass
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_lock_file_removed_between_open_and_lock_is_not_held(tmp_path, monkeypatch):
    # The last holder removing its file as we open it: the lock must be on the file at the path, or a
    # third run would lock that one too.
    workdir = tmp_path / "run"
    flock = files.fcntl.flock
    calls = []

    def removed_first(handle, operation):
        calls.append(operation)
        if len(calls) == 1:
            os.unlink(workdir / ".lock")
        return flock(handle, operation)

    monkeypatch.setattr(files.fcntl, "flock", removed_first)
    with files.exclusive_workdir(workdir):
        assert len(calls) == 2
        assert (workdir / ".lock").read_text() == _this_process() + "\n"
        monkeypatch.setattr(files.fcntl, "flock", flock)
        with pytest.raises(UserError), files.exclusive_workdir(workdir):
            pass


def test_a_holder_not_yet_named_or_just_gone_is_refused_as_starting(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "a+") as other:  # a run that has locked but not written its line yet
        files.fcntl.flock(other, files.fcntl.LOCK_EX | files.fcntl.LOCK_NB)
        with pytest.raises(UserError) as refused, files.exclusive_workdir(workdir):
            pass
    assert str(refused.value) == _refusal(workdir, "starting")
    (workdir / ".lock").unlink()
    monkeypatch.setattr(files, "_locked", lambda path: None)  # held, then gone before its line is read
    with pytest.raises(UserError) as refused, files.exclusive_workdir(workdir):
        pass
    assert str(refused.value) == _refusal(workdir, "starting")


def test_a_lock_file_deleted_during_the_run_is_no_error_at_its_end(tmp_path):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir):
        (workdir / ".lock").unlink()  # a user clearing the folder by hand
        (workdir / "log").write_text("kept")
    assert [path.name for path in workdir.iterdir()] == ["log"]


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    calls = []

    def unsupported(handle, operation):
        calls.append(operation)
        if len(calls) == 2:  # the second run's file removed by the first run on the same mount meanwhile
            os.unlink(handle.name)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files.fcntl, "flock", unsupported)
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir):
        assert [path.name for path in workdir.iterdir()] == []  # no lock file left to mislead
        with files.exclusive_workdir(workdir):  # nothing refuses the second run
            pass
    message = f"warning: cannot lock {workdir / '.lock'} ({os.strerror(errno.ENOLCK)}); a second run of this "
    assert capsys.readouterr().err == 2 * (message + "folder will not be refused\n")


def test_a_disabled_lock_holds_and_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir, enabled=False):
        assert not workdir.exists()
        with files.exclusive_workdir(workdir):
            pass


def test_a_folder_that_cannot_be_written_is_refused_before_evaluation_or_export_does_any_work(
    tmp_path, monkeypatch
):
    from rdunet_jax import evaluate, onnx_export, steps

    (tmp_path / "afile").write_text("x")
    assert refusal(files.check_writable, tmp_path / "afile" / "below", "--output") == (
        f"--output: {tmp_path / 'afile'} is a file, not a folder"
    )
    assert refusal(
        onnx_export.export_workdir, make_tiny_config(), tmp_path, tmp_path / "afile" / "m.onnx"
    ) == (f"--output: {tmp_path / 'afile'} is a file, not a folder")
    files.check_writable(tmp_path / "not" / "yet", "--output")  # made later, below a writable folder
    assert not (tmp_path / "not").exists() and sorted(path.name for path in tmp_path.iterdir()) == ["afile"]

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    def no_restore(*args, **kwargs):
        raise AssertionError("the checkpoint was restored before the folder was checked")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(steps, "restore_state", no_restore)
    assert refusal(evaluate.evaluate_workdir, make_tiny_config(), tmp_path / "run") == (
        f"--workdir: cannot write in {tmp_path} (Read-only file system)"
    )
    assert refusal(onnx_export.export_workdir, make_tiny_config(), tmp_path / "run", tmp_path / "m.onnx") == (
        f"--output: cannot write in {tmp_path} (Read-only file system)"
    )
