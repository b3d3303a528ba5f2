"""Devices and hosts: the sharded train step against one device, multi-host start-up, and handing freed
heap back to the system."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, refusal

from rdunet_jax import devices

SHARDED_STEP_SCRIPT = """
import sys
import jax, numpy as np
sys.path.insert(0, "tests")
from helpers import REPO_ROOT, make_tiny_config
from rdunet_jax import datasets, devices, input_pipeline, models, steps
from rdunet_jax.errors import UserError

assert jax.device_count() == 4, jax.devices()
config = make_tiny_config()
state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
source = datasets.load_source(config.data, "train")
batch = input_pipeline.train_dataset(source, config.data, config.batch_size, config.seed, epoch=0)[0]

single_state, single_metrics = steps.train_step(jax.device_put(state, jax.devices()[0]), batch)
mesh = devices.data_parallel_mesh()
sharded_batch = devices.shard_batch(batch, mesh)
assert len(sharded_batch["image"].sharding.device_set) == 4
sharded_state, sharded_metrics = steps.train_step(devices.replicate(state, mesh), sharded_batch)
difference = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree_util.tree_leaves(single_state), jax.tree_util.tree_leaves(sharded_state))
)
print("LOSS", float(single_metrics["loss"]), float(sharded_metrics["loss"]))
print("MAX_ABS_DIFFERENCE", difference)
try:
    devices.check_batch_divides(6, mesh)
except UserError as error:
    print("ERROR", error)
"""


@pytest.mark.slow  # a fresh process on 4 virtual devices: 35 s on 2 cores
def test_sharded_train_step_equals_single_device_step():
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_STEP_SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    single_loss, sharded_loss = map(float, lines["LOSS"].split())
    assert sharded_loss == pytest.approx(single_loss, rel=1e-5)
    # Reductions run in another order over 4 devices; Adam's first step (learning rate 1e-2) moves a
    # parameter by up to 1e-2, so differences of a few 1e-5 are float noise, not a different step.
    assert float(lines["MAX_ABS_DIFFERENCE"]) < 1e-4
    assert lines["ERROR"] == "batch_size: 6 does not divide over the 4 devices of this run"


def test_distributed_initialisation_only_when_a_coordinator_is_set(monkeypatch):
    calls = []
    monkeypatch.setattr(devices.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(devices, "_distributed_initialized", False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    devices.initialize_distributed()
    assert calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12355")
    # JAX reads only the address from the environment: the count and index are passed on.
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    devices.initialize_distributed()
    devices.initialize_distributed()
    assert calls == [{"num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize(
    ("num_processes", "process_id", "passed", "message"),
    [
        ("1", "0", (1, 0), None),  # the lowest of each
        ("3", "2", (3, 2), None),  # the highest index
        (
            "0",
            "0",
            None,
            "JAX_NUM_PROCESSES: '0' is not a whole number >= 1 (JAX_COORDINATOR_ADDRESS is set)",
        ),
        ("", "0", None, "JAX_NUM_PROCESSES: '' is not a whole number >= 1 (JAX_COORDINATOR_ADDRESS is set)"),
        (
            "3",
            "3",
            None,
            "JAX_PROCESS_ID: '3' is not a whole number from 0 to 2 (JAX_COORDINATOR_ADDRESS is set)",
        ),
        (
            "3",
            "x",
            None,
            "JAX_PROCESS_ID: 'x' is not a whole number from 0 to 2 (JAX_COORDINATOR_ADDRESS is set)",
        ),
    ],
)
def test_the_process_count_and_index_are_checked_at_their_bounds(
    monkeypatch, num_processes, process_id, passed, message
):
    calls = []
    monkeypatch.setattr(devices.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(devices, "_distributed_initialized", False)
    monkeypatch.setattr(devices, "_cluster_scheduler_detected", lambda: False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12355")
    monkeypatch.setenv("JAX_NUM_PROCESSES", num_processes)
    monkeypatch.setenv("JAX_PROCESS_ID", process_id)
    if message is None:
        devices.initialize_distributed()
        assert calls == [{"num_processes": passed[0], "process_id": passed[1]}]
    else:
        assert refusal(devices.initialize_distributed) == message and calls == []


def test_under_a_cluster_scheduler_unset_counts_are_left_to_jax_and_set_ones_still_checked(monkeypatch):
    calls = []
    monkeypatch.setattr(devices.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(devices, "_distributed_initialized", False)
    monkeypatch.setattr(devices, "_cluster_scheduler_detected", lambda: True)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12355")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    devices.initialize_distributed()
    assert calls == [{"num_processes": None, "process_id": None}]
    monkeypatch.setattr(devices, "_distributed_initialized", False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    assert refusal(devices.initialize_distributed).startswith(
        "JAX_PROCESS_ID: '5' is not a whole number from 0 to 1"
    )


def _resident_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _has_glibc_malloc_trim() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _has_glibc_malloc_trim(), reason="needs glibc's malloc_trim and Linux's /proc")
def test_release_freed_memory_returns_free_heap_pages_to_the_system():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 128 MB in 64 KB blocks (below the mmap threshold, so on the heap), touched, then all freed but the
    # highest: pages freed below a block still in use stay mapped in glibc, as the compiler's do.
    blocks = [libc.malloc(64 * 1024) for _ in range(2049)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    fence = max(blocks)
    for block in blocks:
        if block != fence:
            libc.free(block)
    held = _resident_mb()
    devices.release_freed_memory()
    released = held - _resident_mb()
    libc.free(fence)
    assert released > 100, f"only {released:.0f} MB of 128 MB freed came back"


def test_one_process_data_mesh_sharded_batch_replicas_and_the_batch_check():
    import types

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = devices.data_parallel_mesh()
    assert mesh.axis_names == ("data",) and list(mesh.devices.flat) == jax.devices()
    batch = {"image": np.arange(8, dtype=np.float32).reshape(4, 2), "mask": np.eye(4, 2, dtype=np.uint8)}
    sharded = devices.shard_batch(batch, mesh)
    assert sorted(sharded) == ["image", "mask"]
    for key, array in sharded.items():
        assert array.sharding == NamedSharding(mesh, PartitionSpec("data")), key
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    replicated = devices.replicate({"weights": np.full(3, 0.5, np.float32)}, mesh)
    assert replicated["weights"].sharding == NamedSharding(mesh, PartitionSpec())
    np.testing.assert_array_equal(np.asarray(replicated["weights"]), [0.5, 0.5, 0.5])
    devices.check_batch_divides(4, mesh)
    devices.check_batch_divides(8, types.SimpleNamespace(size=4))  # only the mesh's size is read
    assert refusal(devices.check_batch_divides, 6, types.SimpleNamespace(size=4)) == (
        "batch_size: 6 does not divide over the 4 devices of this run"
    )


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_wait_for_every_host_is_an_hour_long_barrier_of_every_process_and_nothing_alone(
    monkeypatch, num_processes
):
    calls = []
    monkeypatch.setattr(devices.jax, "process_count", lambda: num_processes)
    monkeypatch.setattr(
        devices.ocp.multihost, "sync_global_processes", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    devices.wait_for_every_host("rdunet_step")
    # The coordination service's barrier, not a device collective (XLA:CPU's Gloo gives up after 30 s),
    # over every process, waiting out a compile of minutes (orbax's default is 300 s).
    expected = [(("rdunet_step",), {"timeout": 3600, "processes": set(range(num_processes))})]
    assert calls == (expected if num_processes > 1 else [])


def test_the_compilation_cache_makes_its_folder_and_caches_every_compiled_program(tmp_path):
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(devices.jax.config, name) for name in names}
    try:
        devices.enable_compilation_cache("")  # off: nothing changes
        assert {name: getattr(devices.jax.config, name) for name in names} == saved
        folder = tmp_path / "cache" / "nested"
        devices.enable_compilation_cache(str(folder))
        # Every program, however fast it compiles: the tests' small steps compile in under a second.
        assert folder.is_dir()
        assert [getattr(devices.jax.config, name) for name in names] == [str(folder), 0.0, 0]
        (tmp_path / "file").write_text("")
        assert refusal(devices.enable_compilation_cache, str(tmp_path / "file" / "cache")) == (
            f"compilation_cache_dir: cannot use {tmp_path / 'file' / 'cache'} as a folder (Not a directory)"
        )
    finally:
        for name, value in saved.items():
            devices.jax.config.update(name, value)


def test_a_scheduler_is_detected_only_where_jax_reads_it_without_being_asked(monkeypatch):
    from jax._src import clusters

    def environment(opt_in: bool, present: bool):
        return type("Environment", (), {"opt_in_only_method": opt_in, "is_env_present": lambda: present})

    for types, detected in [
        ([environment(False, False), environment(True, True)], False),  # MPI4Py-like: only when asked
        ([environment(True, True), environment(False, True)], True),  # Slurm-like, its variables set
        ([], False),
    ]:
        monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", types)
        assert devices._cluster_scheduler_detected() is detected
    monkeypatch.delattr(clusters.ClusterEnv, "_cluster_types")  # a JAX that moved it: not detected
    assert devices._cluster_scheduler_detected() is False
