"""The train step's executables stored in the compilation cache folder: the first step of a second run of
a config loads its compiled train step instead of tracing and compiling it.

Kept beside, not instead of, JAX's persistent compilation cache (`devices.enable_compilation_cache`), which
still has to trace the step to find its entry.
"""

import enum
import hashlib
import importlib.metadata
import json
import os
import pathlib

import jax
import numpy as np
from jax._src import config as jax_config
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as persistent_cache
from jax.sharding import Mesh

from rdunet_jax.devices import release_freed_memory
from rdunet_jax.files import write_bytes_atomic, write_text_atomic
from rdunet_jax.steps import SCHEDULE_KEYS, TrainState, train_step

# Python sources whose code is traced into the train step (a change to any of them is a new program);
# one that does not exist in this version of the package is skipped.
_TRAIN_STEP_SOURCES = (
    "models.py",
    "layers.py",
    "losses.py",
    "steps.py",
    "heads.py",
    "mean_teacher.py",
    "fixmatch.py",
)
_TRAIN_STEP_PACKAGES = ("jax", "jaxlib", "flax", "optax")


def _sources_digest() -> str:
    """The digest of `_TRAIN_STEP_SOURCES` as this process imported them."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent
    for name in _TRAIN_STEP_SOURCES:
        if (package / name).exists():
            digest.update((package / name).read_bytes())
    return digest.hexdigest()


# Read once, at import: the sources edited on disk while a run goes on are not the program it traces, and
# would file its executable under the new code's key.
_SOURCES_DIGEST = _sources_digest()


def _trace_settings() -> list[str]:
    """JAX's settings that change a traced program (its PRNG's form, matmul precision, x64, ...).

    The stored step is loaded without tracing, so these must be in its key; JAX's own cache hashes the
    traced program instead. `trace_context` is JAX's private list of them; its plain values are kept (the
    axis environment is an object whose repr names an address, and is empty outside a transformation).
    """
    plain = (bool, int, float, str, type(None), tuple, enum.Enum)
    trace_context = getattr(jax_config, "trace_context", None)
    if trace_context is None:  # a JAX without it: the public settings known to change the program
        names = ("jax_threefry_partitionable", "jax_default_prng_impl", "jax_enable_x64")
        return [repr(getattr(jax.config, name, None)) for name in names] + [
            repr(jax.config.jax_default_matmul_precision)
        ]
    return [repr(value) for value in trace_context() if isinstance(value, plain)]


def train_step_key(config, state: TrainState, batch: dict, steps_per_epoch: int) -> str:
    """A digest of everything the compiled train step depends on: the package sources it traces, the
    library versions, the device (and its runtime's version), XLA_FLAGS, JAX's tracing settings, the model
    and optimizer keys, the state's loss, and every input's path, shape and dtype."""
    digest = hashlib.sha256(_SOURCES_DIGEST.encode())
    device = jax.devices()[0]
    inputs = jax.tree_util.tree_flatten_with_path((state, batch))[0]
    described = {
        "versions": [importlib.metadata.version(name) for name in _TRAIN_STEP_PACKAGES],
        # The runtime's version (CUDA and cuDNN on a GPU) picks the kernels, as in JAX's cache key.
        "device": [
            device.platform,
            device.device_kind,
            jax.device_count(),
            getattr(device.client, "platform_version", ""),
        ],
        # XLA's own flags change the program it compiles (its kernels, its schedule), as in JAX's cache key.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_settings": _trace_settings(),
        "model": json.loads(config.model.to_json_best_effort(sort_keys=True)),
        "loss": state.loss,
        # Set from the data source, not the model config: a batch split otherwise is another program.
        **({"labelled_rows": state.labelled_rows} if state.labelled_rows else {}),
        # The moving average's decay is traced into the step too (the optimizer's, not the state's, setting).
        **({"consistency": [*state.consistency, config.consistency.ema_decay]} if state.consistency else {}),
        "optimizer": [*(config[key] for key in SCHEDULE_KEYS), steps_per_epoch],
        # A Python scalar (the step of a fresh state) is weakly typed: another program than an int32 array.
        "inputs": [
            [
                jax.tree_util.keystr(path),
                list(np.shape(leaf)),
                str(getattr(leaf, "dtype", type(leaf).__name__)),
            ]
            for path, leaf in inputs
        ],
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def cached_train_step(config, state: TrainState, batch: dict, steps_per_epoch: int, mesh: Mesh):
    """The train step compiled for these inputs, loaded from `compilation_cache_dir` when this exact
    program was stored before: no tracing, the start-up of a second run of a config.

    Used on one device only; elsewhere, and with the cache off, it is `train_step` (jit). XLA:CPU does not
    serialise every executable faithfully (a reloaded one can miss a kernel: "Function ... not found"; an
    executable that came from the persistent cache always does), so a program to store is compiled with
    that cache bypassed, stored only after its serialised form has loaded and run one step (the run's
    first step, whose result is handed out), and marked and left to jit and the persistent cache from
    then on when that fails. A stored executable that fails to load or to run is replaced by jit.
    """
    if not config.compilation_cache_dir or mesh.size > 1 or jax.process_count() > 1:
        return train_step
    folder = pathlib.Path(config.compilation_cache_dir).expanduser() / "train_step"
    path = folder / f"{train_step_key(config, state, batch, steps_per_epoch)}.bin"
    refused = path.with_suffix(".unserialisable")
    in_tree = jax.tree_util.tree_structure(((state, batch), {}))
    out_tree = jax.tree_util.tree_structure((state, {"loss": 0.0, "gradient_norm": 0.0}))
    if path.exists():
        try:
            loaded = serialize_executable.deserialize_and_load(path.read_bytes(), in_tree, out_tree)
            return _CachedStep(loaded, batch, stored_at=path)
        except Exception:  # noqa: BLE001 - written by another jaxlib build, or damaged: compile again
            pass
    if refused.exists():
        return train_step
    # Executables loaded from the persistent cache never reload faithfully: compile this one afresh. JAX
    # decides once per process whether the cache is used, hence the resets around the switch.
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    persistent_cache.reset_cache()
    try:
        compiled = train_step.lower(state, batch).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
        persistent_cache.reset_cache()
    try:
        serialized = serialize_executable.serialize(compiled)[0]
        loaded = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
        release_freed_memory()
        first_result = jax.block_until_ready(loaded(state, batch))
    except Exception as error:  # noqa: BLE001 - XLA could not round-trip this program
        if _out_of_memory(error):
            raise
        _write_marker(refused)
        return _CachedStep(compiled, batch)
    try:
        write_bytes_atomic(path, serialized)
    except OSError:  # a read-only or full cache folder only costs start-up time
        pass
    return _CachedStep(loaded, batch, first=(state, batch, first_result))


def compiled_train_step(config, state: TrainState, batch: dict, steps_per_epoch: int, mesh: Mesh):
    """The train step for batches shaped like `batch`, compiled or loaded before its first run, with the
    memory that compiling used and freed handed back to the system (`release_freed_memory`)."""
    step = cached_train_step(config, state, batch, steps_per_epoch, mesh)
    if step is train_step:  # jit would compile inside the first call, on top of the compiler's leftovers
        step = _CachedStep(train_step.lower(state, batch).compile(), batch)
    release_freed_memory()
    return step


def _out_of_memory(error: Exception) -> bool:
    """Whether `error` is the device running out of memory: a passing state of this process, not a sign
    that the program cannot be stored (a marker would keep it from the cache for good)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def _write_marker(path: pathlib.Path) -> None:
    try:
        write_text_atomic(path, "XLA could not serialise this train step; jit compiles it instead\n")
    except OSError:
        pass


def _shapes(batch: dict) -> dict:
    """Each input's shape and dtype: what a compiled executable is fixed to."""
    return {key: (value.shape, value.dtype) for key, value in batch.items()}


class _CachedStep:
    """A compiled train step for batches of one shape and dtype (others go to the jitted `train_step`).

    `first` (state, batch, result) answers one call on exactly those objects with a result already
    computed. An executable loaded from `stored_at` is checked on its first call: if it fails, the file
    is replaced by a marker and the jitted step takes over.
    """

    def __init__(self, compiled, batch: dict, first=None, stored_at: pathlib.Path | None = None):
        self.compiled, self.first, self.stored_at = compiled, first, stored_at
        self.shapes = _shapes(batch)

    def __call__(self, state, batch):
        if self.first is not None:
            first_state, first_batch, result = self.first
            self.first = None
            if state is first_state and batch is first_batch:
                return result
        if _shapes(batch) != self.shapes:
            return train_step(state, batch)
        if self.stored_at is None:
            return self.compiled(state, batch)
        stored_at, self.stored_at = self.stored_at, None
        # A kernel missing from the stored bytes (JaxRuntimeError), or another program's outputs (ValueError):
        # either way not this step.
        try:
            return jax.block_until_ready(self.compiled(state, batch))
        except Exception as error:  # noqa: BLE001
            if _out_of_memory(error):
                raise
            stored_at.unlink(missing_ok=True)
            _write_marker(stored_at.with_suffix(".unserialisable"))
            self.compiled = train_step
            return train_step(state, batch)
