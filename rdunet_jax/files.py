"""Atomic file writes (a reader, or an interrupted run, never sees a half-written file) and the run
folder's lock (two runs never write one folder at once)."""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import threading

from rdunet_jax.errors import UserError

LOCK_NAME = ".lock"
NO_LOCKS = object()
# Read once, at import, before any thread: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` (an empty file, created with its parent folders) to write
    to; it is renamed over `path` when the block completes and removed when it raises, so `path` is
    either absent, the old file or complete."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # named after the file asked for, not a temporary name nobody gave
        raise OSError(error.errno, error.strerror, str(path)) from None
    # mkstemp makes the file private (0600); the result gets the mode a plain open() would give it.
    os.fchmod(handle, 0o666 & ~_UMASK)
    os.close(handle)
    temporary = pathlib.Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# The longest file name `atomic_path` can write: its temporary name adds "." + "." + 8 letters + ".tmp" to
# the 255 bytes Linux and macOS file systems allow.
MAX_NAME_BYTES = 255 - 14


def existing_folder(folder, flag: str) -> pathlib.Path:
    """`folder`, or its nearest ancestor that exists (where it would be made); UserError naming `flag` when
    that is a file."""
    folder = pathlib.Path(folder)
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{flag}: {existing} is a file, not a folder")
    return existing


def check_writable(folder, flag: str) -> None:
    """UserError naming `flag` when no file can be made in `folder` (its nearest existing ancestor when it
    does not exist yet): a read-only mount fails here, before the work, not when its results are written.
    A test file, not os.access, which passes on some mounts that refuse writes."""
    existing = existing_folder(folder, flag)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{flag}: cannot write in {existing} ({error.strerror})") from None


def write_bytes_atomic(path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it over `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(value) -> str:
    """How records are written: indented, keys sorted, a final newline."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path, value) -> None:
    write_text_atomic(path, json_text(value))


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block ends, then act as they would have (in the main thread; a
    no-op elsewhere): for a few renames that must all happen or none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received, previous = [], {}

    def record(signal_number, frame):
        received.append(signal_number)

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        previous[signal_number] = signal.signal(signal_number, record)
    try:
        yield
    finally:
        for signal_number, handler in previous.items():
            signal.signal(signal_number, handler)
        if received:
            signal.raise_signal(received[0])


def write_files_together(texts: dict, folders: dict) -> None:
    """Writes {path: text} and moves {staged folder: destination} (replacing what is there) as one step:
    every file is ready before the first is replaced, and a stop signal waits until the last is."""
    with signals_deferred():
        for path, text in texts.items():
            write_text_atomic(path, text)
        for staged, destination in folders.items():
            destination = pathlib.Path(destination)
            destination.parent.mkdir(parents=True, exist_ok=True)
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            if destination.exists():
                os.replace(destination, old)
            os.replace(staged, destination)
            shutil.rmtree(old, ignore_errors=True)


def _locked(path: pathlib.Path):
    """`path` opened and flock-ed (created with its folder if missing); None when another run holds it;
    NO_LOCKS where the file system has no locks."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file on the way, a read-only parent: the user's --workdir
            raise UserError(f"--workdir: cannot create {path.parent} ({error.strerror})") from None
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError as error:  # some network and FUSE mounts: run as before the lock existed
            handle.close()
            path.unlink(missing_ok=True)
            print(
                f"warning: cannot lock {path} ({error.strerror}); a second run of this folder will not be "
                "refused",
                file=sys.stderr,
            )
            return NO_LOCKS
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                return handle
        # The last holder removed the file between our open and our lock: lock the file now at `path`.
        handle.close()


@contextlib.contextmanager
def exclusive_workdir(workdir, enabled: bool = True):
    """Holds the lock of the run folder `workdir` (created if missing) while the block runs.

    A second run of the same folder (another terminal, a job resubmitted while the first still runs) is
    refused with a UserError naming the holder, rather than interleaving its checkpoints and logs with
    the first's. The kernel drops the lock when its process ends however it ends (kill -9 included), so
    a crashed run never blocks the next one. A folder this call created and the block left empty is
    removed. `enabled=False` (the hosts after the first of a multi-host run) holds nothing.
    """
    if not enabled:
        yield
        return
    workdir = pathlib.Path(workdir)
    created = not workdir.exists()
    path = workdir / LOCK_NAME
    handle = _locked(path)
    if handle is NO_LOCKS:
        yield
        return
    if handle is None:
        holder = ""
        with contextlib.suppress(OSError):
            holder = path.read_text().strip()
        raise UserError(
            f"--workdir: {workdir} is in use by another run ({holder or 'starting'}); wait for it to end, "
            "stop it, or choose another --workdir"
        )
    handle.truncate(0)  # a run killed with -9 left its line
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
        yield
    finally:
        # Removed while still locked, so a run that opened the file meanwhile retries on the path.
        path.unlink(missing_ok=True)
        handle.close()
        if created:
            with contextlib.suppress(OSError):  # only an empty folder goes
                workdir.rmdir()
