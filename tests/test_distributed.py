"""Several hosts: each host's data shard, and a real two-process run against the one-process run."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import REPO_ROOT, TEST_CACHE, TEST_DATA_DIR, make_tiny_config

from rdunet_jax import checkpoints, datasets, devices, input_pipeline, train
from rdunet_jax.errors import UserError

HOST_BATCH_SIZE = 2


@pytest.fixture(scope="module")
def source_config():
    """The tiny config on 16 phantom slices: whole global batches of 4 and 6 slices for 2 and 3 hosts."""
    return make_tiny_config(num_train=16)


@pytest.fixture(scope="module")
def source(source_config):
    return datasets.load_source(source_config.data, "train")


def batches_of_every_host(monkeypatch, source, config, num_hosts: int, epoch: int) -> list[list[dict]]:
    """`devices.host_batches` as each of `num_hosts` processes sees it (process index and count patched)."""
    hosts = []
    for host in range(num_hosts):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        monkeypatch.setattr(jax, "process_count", lambda: num_hosts)
        hosts.append(list(devices.host_batches(source, config, epoch)))
    monkeypatch.undo()
    return hosts


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_the_hosts_parts_in_host_order_are_the_one_host_global_batches(
    monkeypatch, source, source_config, num_hosts
):
    config = source_config.copy_and_resolve_references()
    config.batch_size = num_hosts * HOST_BATCH_SIZE
    one_host = list(devices.host_batches(source, config, epoch=1))
    hosts = batches_of_every_host(monkeypatch, source, config, num_hosts, epoch=1)
    assert len(one_host) == len(source) // config.batch_size >= 2
    for host_batches in hosts:
        assert len(host_batches) == len(one_host)
    # `shard_batch` places host i's part in rows [i * b, (i + 1) * b) of the global batch: the same
    # augmented slices in the same rows, step by step, as one host reading the whole batch.
    for step, global_batch in enumerate(one_host):
        for key in ("image", "mask"):
            assert all(host[step][key].shape[0] == HOST_BATCH_SIZE for host in hosts)
            joined = np.concatenate([host[step][key] for host in hosts])
            np.testing.assert_array_equal(joined, global_batch[key], err_msg=f"step {step} {key}")


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_the_hosts_read_disjoint_slices_of_the_epoch(monkeypatch, source, source_config, num_hosts):
    config = source_config.copy_and_resolve_references()
    config.batch_size = num_hosts * HOST_BATCH_SIZE
    config.data.flip, config.data.zoom_range = False, 0.0  # slices as prepared: each names its record
    fingerprints = {
        input_pipeline.preprocess(source[index], config.data.image_size)["image"].tobytes(): index
        for index in range(len(source))
    }
    assert len(fingerprints) == len(source)  # every phantom slice differs
    hosts = batches_of_every_host(monkeypatch, source, config, num_hosts, epoch=0)
    read = [
        [fingerprints[image.tobytes()] for batch in host_batches for image in batch["image"]]
        for host_batches in hosts
    ]
    # No record twice, on one host or across hosts, and a whole number of global batches read.
    every_record = [index for host_records in read for index in host_records]
    whole_batches = len(source) // config.batch_size
    assert len(every_record) == len(set(every_record)) == whole_batches * config.batch_size
    assert all(len(host_records) == len(read[0]) for host_records in read)


@pytest.mark.parametrize(
    ("num_processes", "process_id", "named"),
    [
        (None, "0", "JAX_NUM_PROCESSES"),
        ("two", "0", "JAX_NUM_PROCESSES"),
        ("2", None, "JAX_PROCESS_ID"),
        ("2", "2", "JAX_PROCESS_ID"),
        ("2", "-1", "JAX_PROCESS_ID"),
    ],
)
def test_a_coordinator_without_a_valid_process_count_and_index_is_a_user_error(
    monkeypatch, num_processes, process_id, named
):
    # JAX reads JAX_COORDINATOR_ADDRESS itself but not the other two variables the README names.
    monkeypatch.setattr(devices, "_distributed_initialized", False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for name, value in (("JAX_NUM_PROCESSES", num_processes), ("JAX_PROCESS_ID", process_id)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"^{named}: "):
        devices.initialize_distributed()


JOIN_AND_REPORT = (
    "from rdunet_jax import devices; devices.initialize_distributed(); import jax; "
    "print('JOINED', jax.process_index(), jax.process_count(), flush=True); jax.distributed.shutdown()"
)


def run_two_processes(code: str, shared: dict, per_process) -> list[tuple[int, str]]:
    """(exit status, output) of `code` run as 2 Python processes on a loopback coordinator, with the
    `shared` environment variables and `per_process(index)`'s; kills any still running after 120 s."""
    address = f"127.0.0.1:{free_loopback_port()}"
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_", "SLURM_"))}
    environment.update(
        JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address, JAX_PLATFORMS="cpu", **shared
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env={**environment, **per_process(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(process.returncode, output) for process, output in zip(processes, outputs, strict=True)]


def test_a_coordinator_under_a_scheduler_takes_the_process_count_and_index_jax_detects(tmp_path):
    # Under Slurm (Open MPI, Kubernetes...) JAX reads the count and index from the scheduler's variables:
    # a coordinator address alone must not be refused there.
    results = run_two_processes(
        JOIN_AND_REPORT,
        {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2"},
        lambda index: {"SLURM_PROCID": str(index), "SLURM_LOCALID": str(index)},
    )
    for index, (returncode, output) in enumerate(results):
        assert returncode == 0 and f"JOINED {index} 2" in output, output[-2000:]


BARRIER_TWICE = (
    "from rdunet_jax import devices; devices.initialize_distributed(); import jax, time\n"
    "for _ in range(2):\n"
    "    if jax.process_index() == 1: time.sleep(2)\n"
    "    started = time.monotonic(); devices.wait_for_every_host('rdunet_train_step_compiled')\n"
    "    print('WAITED', round(time.monotonic() - started, 1), flush=True)\n"
    "jax.distributed.shutdown()"
)


def test_a_barrier_name_met_again_still_waits_for_every_host():
    """Self-training runs the training loop once per stage in one process, and each run meets the same
    compile barrier: the second meeting must wait for the late host as the first did, not pass at once."""
    results = run_two_processes(
        BARRIER_TWICE, {"JAX_NUM_PROCESSES": "2"}, lambda index: {"JAX_PROCESS_ID": str(index)}
    )
    assert all(returncode == 0 for returncode, _ in results), results
    waits = [float(line.split()[1]) for line in results[0][1].splitlines() if line.startswith("WAITED")]
    assert len(waits) == 2 and min(waits) >= 1.5, results[0][1]  # host 0 waited out host 1's 2 s both times


# --- a real two-process run ---------------------------------------------------------------------------

TINY_COMMAND = [
    sys.executable,
    "-m",
    "rdunet_jax.main",
    "--config",
    "configs/demo.py:tiny",
    f"--config.compilation_cache_dir={TEST_CACHE}",
    f"--config.data.data_dir={TEST_DATA_DIR}",
    "--config.num_epochs=2",  # as make_tiny_config: 2 epochs of 2 steps of 4 slices
]
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
RUN_SECONDS = 480


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(workdir, log_folder) -> list[str]:
    """Starts the tiny training command as NUM_PROCESSES processes of one JAX run (a coordinator on
    127.0.0.1, Gloo collectives) and returns each one's output; kills any still running at the limit."""
    address = f"127.0.0.1:{free_loopback_port()}"
    environment = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    environment.update(
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{environment.get('PATH', '')}",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_COORDINATOR_ADDRESS=address,
        JAX_COORDINATOR_BIND_ADDRESS=address,  # loopback only, not every interface
        JAX_NUM_PROCESSES=str(NUM_PROCESSES),
    )
    logs = [log_folder / f"process_{index}.log" for index in range(NUM_PROCESSES)]
    processes = []
    try:
        for index, log in enumerate(logs):
            with log.open("w") as output:
                processes.append(
                    subprocess.Popen(
                        [*TINY_COMMAND, f"--workdir={workdir}"],
                        cwd=REPO_ROOT,
                        env={**environment, "JAX_PROCESS_ID": str(index)},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + RUN_SECONDS
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        outputs = "\n".join(log.read_text() for log in logs)
        pytest.fail(f"the processes ran past {RUN_SECONDS} s:\n{outputs}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log.read_text()
    return [log.read_text() for log in logs]


def restore_latest(workdir, target_state):
    return checkpoints.RunCheckpoints(workdir / "checkpoints", create=False).restore("latest", target_state)


@pytest.mark.slow
def test_two_processes_end_with_the_parameters_of_one_process_and_resume_past_a_damaged_checkpoint(
    tmp_path, tiny_config, tiny_state
):
    one_process, two_processes = tmp_path / "one_process", tmp_path / "two_processes"
    train.train_and_evaluate(tiny_config, one_process)
    outputs = run_processes(two_processes, tmp_path)
    # Each process saw the other's devices: one run, not two runs side by side on the same batches.
    for output in outputs:
        assert f"{NUM_PROCESSES * DEVICES_PER_PROCESS} cpu device(s)" in output, output
    reference, reference_meta = restore_latest(one_process, tiny_state)
    restored, meta = restore_latest(two_processes, tiny_state)
    assert int(restored.step) == int(reference.step) == 4
    assert meta["epoch"] == reference_meta["epoch"] == 2
    # Float tolerance: the global batch's sums run in another order over 4 devices than on 1 (measured up
    # to 6e-5). One Adam step moves a parameter by up to the learning rate, 1e-2, and a host feeding the
    # wrong slices moved some by 3e-3 and more.
    for part in ("params", "batch_stats"):
        expected_leaves = jax.tree_util.tree_leaves_with_path(getattr(reference, part))
        actual_leaves = jax.tree_util.tree_leaves(getattr(restored, part))
        differences = {
            jax.tree_util.keystr(path): float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
            for (path, expected), actual in zip(expected_leaves, actual_leaves, strict=True)
        }
        worst = max(differences, key=differences.get)
        assert differences[worst] < 5e-4, f"{part}{worst} differs by {differences[worst]:.2e}"

    # Both processes find the last checkpoint damaged: the first moves it aside once, both resume from the
    # one before, and the run ends where it ended.
    for path in (two_processes / "checkpoints" / "latest" / "4").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the arrays' data, not the metadata
            path.unlink()
    outputs = run_processes(two_processes, tmp_path)
    (moved,) = (two_processes / "checkpoints" / "damaged").iterdir()
    for output in outputs:
        assert f"moved it to {moved} and resumed from step 2" in output, output
    resumed, _ = restore_latest(two_processes, tiny_state)
    assert int(resumed.step) == 4
    for expected, actual in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(resumed), strict=True
    ):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=5e-4)
