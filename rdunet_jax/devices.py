"""Devices and hosts: multi-host start-up, the data-parallel mesh, placing batches and state on it, and the
process-wide settings of a run (the persistent compilation cache, handing freed heap back).

The batch is sharded over every local device (and host) along a `data` mesh axis; parameters and optimizer
state are replicated.
"""

import ctypes
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdunet_jax import input_pipeline
from rdunet_jax.errors import UserError


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache ('' leaves it off)."""
    if not directory:
        return
    path = pathlib.Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"compilation_cache_dir: cannot use {path} as a folder ({error.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def release_freed_memory() -> None:
    """Returns the C heap's free pages to the system (glibc only; elsewhere nothing happens).

    XLA's compiler frees about 400 MB at 256 px that glibc keeps mapped, so without this a training
    process holds it through every step on top of the step's own buffers (peak RSS 2,750 MiB against 2,332).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: macOS's and musl's allocators have no malloc_trim
        pass


# --- multi-host start-up -----------------------------------------------------------------------------

_distributed_initialized = False


def _cluster_scheduler_detected() -> bool:
    """Whether JAX would read the process count and index from a cluster scheduler it detects (Slurm,
    Open MPI, Kubernetes...); False where JAX's detection cannot be asked (a private module)."""
    try:
        from jax._src import clusters

        return any(
            not environment.opt_in_only_method and environment.is_env_present()
            for environment in clusters.ClusterEnv._cluster_types
        )
    except (ImportError, AttributeError):
        return False


def _process_variable(name: str, low: int, high: int | None, required: bool) -> int | None:
    """A process count or index from the environment, checked (JAX itself reads only the address); None
    when unset and not `required` (JAX then reads it from the cluster scheduler)."""
    text = os.environ.get(name, "")
    if not text and not required:
        return None
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        expected = f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"
        raise UserError(f"{name}: {text!r} is not {expected} (JAX_COORDINATOR_ADDRESS is set)")
    return value


def initialize_distributed() -> None:
    """Joins a multi-host run when JAX_COORDINATOR_ADDRESS is set, with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, or under a cluster scheduler the count and index JAX reads from it (once per process,
    and before anything starts a JAX backend, which `jax.distributed.initialize` requires)."""
    global _distributed_initialized
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not _distributed_initialized:
        required = not _cluster_scheduler_detected()
        num_processes = _process_variable("JAX_NUM_PROCESSES", 1, None, required)
        highest_id = None if num_processes is None else num_processes - 1
        process_id = _process_variable("JAX_PROCESS_ID", 0, highest_id, required)
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
        _distributed_initialized = True


# How long the hosts wait for each other's compiler before the first step (a 256 px train step compiles
# for minutes on a small CPU).
_COMPILE_BARRIER_SECONDS = 3600


def wait_for_every_host(name: str) -> None:
    """A barrier of the coordination service across every process (nothing with one process).

    XLA:CPU's Gloo collectives give up after 30 s when one process reaches the first collective and the
    others have not ("Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out"),
    which is what happens when one host loads the train step from its compilation cache while another
    compiles it; the coordination service waits as long as it is told.
    """
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(
            name, timeout=_COMPILE_BARRIER_SECONDS, processes=set(range(jax.process_count()))
        )


# --- data parallelism -------------------------------------------------------------------------------


def data_parallel_mesh() -> Mesh:
    """A one-axis mesh ('data') over every device of every host."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and hosts (checked before compiling)."""
    if batch_size % mesh.size:
        raise UserError(f"batch_size: {batch_size} does not divide over the {mesh.size} devices of this run")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This host's part of the global batch (image, mask and any class labels), placed as arrays sharded
    along the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {key: jax.make_array_from_process_local_data(sharding, batch[key]) for key in batch}


def host_batches(source, config, epoch: int):
    """This host's part of every global batch of an epoch (`input_pipeline.train_dataset`'s shard)."""
    return input_pipeline.train_dataset(
        source,
        config.data,
        config.batch_size // jax.process_count(),
        config.seed,
        epoch,
        jax.process_index(),
        jax.process_count(),
    )


def replicate(tree, mesh: Mesh):
    """Copies every leaf to every device of the mesh (parameters, optimizer state)."""
    # Through host memory: a leaf restored from a checkpoint is committed to this host's device, and
    # putting it on the other hosts' devices too is a cross-host transfer the CPU backend refuses; from
    # host values each host fills its own devices (every host holds the same values).
    return jax.device_put(jax.device_get(tree), NamedSharding(mesh, PartitionSpec()))
