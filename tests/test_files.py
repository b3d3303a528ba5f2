"""The run folder's lock (rdunet_jax/files.py): one run per folder, never blocked by a dead one."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from rdunet_jax import files
from rdunet_jax.errors import UserError


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


def test_a_disabled_lock_holds_and_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir, enabled=False):
        assert not workdir.exists()
        with files.exclusive_workdir(workdir):
            pass
