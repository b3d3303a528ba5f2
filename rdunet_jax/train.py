"""Training: the train state, the jit-compiled train and eval steps, and the epoch loop.

`train_and_evaluate(config, workdir)` trains with Dice loss (or `config.loss`) and Adam on a staircase
schedule, validates every epoch, keeps the latest checkpoint (resume) and the best by validation loss,
and at the end restores `eval.checkpoint` (the best, or the last) and evaluates it on the test split
(validation where no test split exists). The first step of a second run of a config loads its compiled
train step from the cache folder (`cached_train_step`).

Running the same command again resumes from the latest checkpoint, exactly: batches are a pure function
of (seed, epoch, position), dropout of (seed, step), and the checkpoint holds the data position, so a
run stopped at any step and resumed ends bit-identical to one that never stopped. SIGTERM or SIGINT
saves a checkpoint at the current step and exits. The batch is sharded over every local device (and
host) along a `data` mesh axis; parameters and optimizer state are replicated.
"""

import ctypes
import hashlib
import importlib.metadata
import json
import os
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as persistent_cache
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdunet_jax import (
    checkpoints,
    config_lib,
    datasets,
    evaluate,
    inference,
    input_pipeline,
    models,
    visualize,
)
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from rdunet_jax.orientation import model_orientation
from rdunet_jax.steps import (
    TrainState,
    create_train_state,
    learning_rate_schedule,
    train_step,
)

# Fault injection for the resume tests: SIGKILL this process right after the given step.
_KILL_AT_STEP_VARIABLE = "RDUNET_TEST_KILL_AT_STEP"


class TrainingStopped(Exception):
    """Training was stopped by a signal after saving a checkpoint; the same command resumes."""

    def __init__(self, signal_number: int, step: int, directory):
        self.signal_number = signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} at step {step}; checkpoint saved in "
            f"{directory}; run the same command to resume"
        )


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; nothing from that step on was saved."""


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


# Python sources whose code is traced into the train step (a change to any of them is a new program).
_TRAIN_STEP_SOURCES = ("models.py", "layers.py", "losses.py", "steps.py", "train.py")
_TRAIN_STEP_PACKAGES = ("jax", "jaxlib", "flax", "optax")


def train_step_key(config, state: TrainState, batch: dict, steps_per_epoch: int) -> str:
    """A digest of everything the compiled train step depends on: the package sources it traces, the
    library versions, the device, the model and optimizer keys, the state's loss, and every input's path,
    shape and dtype."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent
    for name in _TRAIN_STEP_SOURCES:
        digest.update((package / name).read_bytes())
    device = jax.devices()[0]
    inputs = jax.tree_util.tree_flatten_with_path((state, batch))[0]
    described = {
        "versions": [importlib.metadata.version(name) for name in _TRAIN_STEP_PACKAGES],
        "device": [device.platform, device.device_kind, jax.device_count()],
        "model": json.loads(config.model.to_json_best_effort(sort_keys=True)),
        "loss": state.loss,
        "optimizer": [config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor, steps_per_epoch],
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
    out_tree = jax.tree_util.tree_structure((state, {"loss": 0.0}))
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
    except Exception:  # noqa: BLE001 - XLA could not round-trip this program
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


def release_freed_memory() -> None:
    """Returns the C heap's free pages to the system (glibc only; elsewhere nothing happens).

    XLA's compiler frees about 400 MB at 256 px that glibc keeps mapped, so without this a training
    process holds it through every step on top of the step's own buffers (peak RSS 2,750 MiB against 2,332).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: macOS's and musl's allocators have no malloc_trim
        pass


def _write_marker(path: pathlib.Path) -> None:
    try:
        write_text_atomic(path, "XLA could not serialise this train step; jit compiles it instead\n")
    except OSError:
        pass


class _CachedStep:
    """A compiled train step for batches of one shape (others go to the jitted `train_step`).

    `first` (state, batch, result) answers one call on exactly those objects with a result already
    computed. An executable loaded from `stored_at` is checked on its first call: if it fails, the file
    is replaced by a marker and the jitted step takes over.
    """

    def __init__(self, compiled, batch: dict, first=None, stored_at: pathlib.Path | None = None):
        self.compiled, self.first, self.stored_at = compiled, first, stored_at
        self.shapes = {key: value.shape for key, value in batch.items()}

    def __call__(self, state, batch):
        if self.first is not None:
            first_state, first_batch, result = self.first
            self.first = None
            if state is first_state and batch is first_batch:
                return result
        if {key: value.shape for key, value in batch.items()} != self.shapes:
            return train_step(state, batch)
        if self.stored_at is None:
            return self.compiled(state, batch)
        stored_at, self.stored_at = self.stored_at, None
        try:
            return jax.block_until_ready(self.compiled(state, batch))
        except jax.errors.JaxRuntimeError:
            stored_at.unlink(missing_ok=True)
            _write_marker(stored_at.with_suffix(".unserialisable"))
            self.compiled = train_step
            return train_step(state, batch)


# --- data parallelism -------------------------------------------------------------------------------


def data_parallel_mesh() -> Mesh:
    """A one-axis mesh ('data') over every device of every host."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and hosts (checked before compiling)."""
    if batch_size % mesh.size:
        raise UserError(f"batch_size: {batch_size} does not divide over the {mesh.size} devices of this run")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This host's part of the global batch, placed as one array sharded along the batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {key: jax.make_array_from_process_local_data(sharding, batch[key]) for key in ("image", "mask")}


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
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# --- the loop ---------------------------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class _Log:
    """train_log.jsonl and TensorBoard, written once per epoch by the first host."""

    def __init__(self, workdir: pathlib.Path, start_epoch: int):
        self.path = workdir / "train_log.jsonl"
        kept = []
        if self.path.exists():
            # Epochs past the restored checkpoint are trained again: drop their lines (and a line cut
            # short by a kill).
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] <= start_epoch:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key in ("loss", "val_loss", "val_dice", "learning_rate"):
            self.writer.add_scalar(key, record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _StopOnSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def _handle(self, signal_number, frame):
        self.signal_number = signal_number

    def __enter__(self):
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)


class _LossCheck:
    """Collects step losses on device and checks them in batches (one host sync per log interval)."""

    def __init__(self):
        self.pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, loss) -> None:
        self.pending.append((step, loss))

    def flush(self) -> list[float]:
        """The pending losses as floats; raises NonFiniteLossError naming the first bad step."""
        values = [float(value) for value in jax.device_get([loss for _, loss in self.pending])]
        for (step, _), value in zip(self.pending, values, strict=True):
            if not np.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at step {step}; training stopped, the last good checkpoint is kept "
                    f"(lower learning_rate or check the data)"
                )
        self.pending = []
        return values


def setup_run(config: ml_collections.ConfigDict):
    """Validates the config, turns on the compilation cache and builds the model."""
    config_lib.validate(config)
    enable_compilation_cache(config.compilation_cache_dir)
    return models.build_model(config.model)


def new_meta(config) -> dict:
    """The JSON part of a checkpoint at the start of training."""
    return {
        "epoch": 0,
        "iterator": None,
        "epoch_loss_sum": 0.0,
        "epoch_steps": 0,
        "best_val_loss": None,
        "best_epoch": None,
        "model": checkpoints.architecture(config.model),
        "orientation": model_orientation(config.data),
    }


def restore_latest(run_checkpoints, state, config):
    """The newest readable `latest` checkpoint as (state, meta), falling back past damaged ones.

    Returns None when there is no checkpoint; raises UserError when the checkpoints were made by another
    model, or when every one is damaged (rather than silently training from scratch). Damaged steps
    newer than the one restored are moved to `checkpoints/damaged/`, out of the way of new saves.
    """
    steps = sorted(run_checkpoints.all_steps("latest"), reverse=True)
    damaged = []
    for step in steps:
        try:
            restored = run_checkpoints.restore(
                "latest", state, step, model_config=config.model, data_config=config.data
            )
        except checkpoints.ModelMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - any read failure means a damaged checkpoint
            damaged.append((step, type(error).__name__))
            continue
        for damaged_step, reason in damaged:
            moved_to = run_checkpoints.quarantine("latest", damaged_step)
            print(
                f"warning: checkpoint step {damaged_step} in {run_checkpoints.directory / 'latest'} is "
                f"damaged ({reason}); moved it to {moved_to} and resumed from step {step}",
                flush=True,
            )
        return restored
    if steps:
        raise UserError(
            f"every checkpoint in {run_checkpoints.directory / 'latest'} is damaged "
            f"(steps {steps}); move the folder away to train from scratch"
        )
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains (resuming if `workdir` has a checkpoint), then evaluates the best checkpoint."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir: {workdir} exists and is not a folder")
    initialize_distributed()
    model = setup_run(config)
    mesh = data_parallel_mesh()
    check_batch_divides(config.batch_size, mesh)
    train_source = datasets.load_source(config.data, config.data.train_split)
    validation_source = datasets.load_source(config.data, "validation")
    steps_per_epoch = len(host_batches(train_source, config, 0))
    is_first_host = jax.process_index() == 0

    started = time.perf_counter()
    state = create_train_state(config, model, steps_per_epoch)
    print(
        f"model {config.model.variant}: {models.count_parameters(state.params):,} parameters "
        f"(built in {time.perf_counter() - started:.1f}s); "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s)",
        flush=True,
    )
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = new_meta(config)
    restored = restore_latest(run_checkpoints, state, config)
    if restored is not None:
        state, meta = restored
        position = f", {meta['epoch_steps']} steps into it" if meta["iterator"] else ""
        print(f"resumed at epoch {meta['epoch'] + 1}{position} (step {int(state.step)})", flush=True)
    if is_first_host:
        # Written only once the checkpoints (if any) were found to fit this config.
        write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
    state = replicate(state, mesh)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    log = _Log(workdir, meta["epoch"]) if is_first_host else None
    total_steps = config.num_epochs * steps_per_epoch
    kill_at_step = int(os.environ.get(_KILL_AT_STEP_VARIABLE, "0"))
    loss_check = _LossCheck()
    timer_start, timed_from = None, 0
    # The step is counted on the host: reading state.step would wait for each step to finish and stall
    # the dispatch of the next.
    step = int(state.step)
    step_function = None

    def save_latest(epoch, iterator_state):
        meta.update(epoch=epoch, iterator=iterator_state)
        run_checkpoints.save("latest", step, state, meta)

    try:
        with _StopOnSignal() as stop:
            for epoch in range(meta["epoch"], config.num_epochs):
                epoch_start = time.perf_counter()
                iterator = input_pipeline.to_iterator(
                    host_batches(train_source, config, epoch), meta["iterator"]
                )
                for batch in iterator:
                    batch = shard_batch(batch, mesh)
                    if step_function is None:
                        step_function = compiled_train_step(config, state, batch, steps_per_epoch, mesh)
                        wait_for_every_host("rdunet_train_step_compiled")
                    state, step_metrics = step_function(state, batch)
                    step += 1
                    loss_check.add(step, step_metrics["loss"])
                    if step == kill_at_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    # The last step of an epoch is saved after validation, with the epoch's record.
                    save_now = step % steps_per_epoch != 0 and (
                        stop.signal_number is not None
                        or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
                    )
                    if step % config.log_every_steps and not save_now:
                        continue
                    values = loss_check.flush()
                    meta["epoch_loss_sum"] += sum(values)
                    meta["epoch_steps"] += len(values)
                    if timer_start is None:
                        # Time from the first logged step, so compilation does not skew images/s.
                        timer_start, timed_from = time.perf_counter(), step
                    else:
                        rate = (step - timed_from) / max(time.perf_counter() - timer_start, 1e-9)
                        print(
                            f"epoch {epoch + 1}/{config.num_epochs} step {step}/{total_steps} "
                            f"{rate * config.batch_size:.1f} img/s loss {values[-1]:.4f} "
                            f"left {_format_seconds((total_steps - step) / max(rate, 1e-9))}",
                            flush=True,
                        )
                    if save_now:
                        save_latest(epoch, iterator.get_state())
                        if stop.signal_number is not None:
                            run_checkpoints.wait()
                            raise TrainingStopped(
                                stop.signal_number, step, run_checkpoints.directory / "latest"
                            )
                values = loss_check.flush()
                epoch_loss = (meta["epoch_loss_sum"] + sum(values)) / max(
                    meta["epoch_steps"] + len(values), 1
                )
                validation = evaluate.evaluate_source(
                    inference.JaxPredictor(state), validation_source, config
                )
                is_best = meta["best_val_loss"] is None or validation["loss"] < meta["best_val_loss"]
                meta.update(epoch_loss_sum=0.0, epoch_steps=0)
                if is_best:
                    meta.update(best_val_loss=validation["loss"], best_epoch=epoch + 1)
                    meta.update(epoch=epoch + 1, iterator=None)
                    run_checkpoints.save("best", step, state, meta)
                save_latest(epoch + 1, None)
                record = {
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": epoch_loss,
                    "val_loss": validation["loss"],
                    "val_dice": validation["dice"],
                    "learning_rate": float(schedule(step - 1)),
                    "seconds": time.perf_counter() - epoch_start,
                }
                if log is not None:
                    log.write(record)
                    overlays = evaluate.validation_overlays(
                        inference.JaxPredictor(state), validation_source, config
                    )
                    visualize.add_overlays_to_tensorboard(log.writer, overlays, epoch + 1)
                    log.writer.flush()
                print(
                    f"epoch {epoch + 1}: loss {epoch_loss:.4f} val_loss {validation['loss']:.4f} "
                    f"val_dice {validation['dice']:.4f}{' (best)' if is_best else ''}",
                    flush=True,
                )
                if stop.signal_number is not None:
                    run_checkpoints.wait()
                    raise TrainingStopped(stop.signal_number, step, run_checkpoints.directory)
    finally:
        run_checkpoints.wait()
        run_checkpoints.close()
        if log is not None:
            log.close()
    if is_first_host:
        visualize.write_curves(workdir)
    return evaluate.evaluate_workdir(config, workdir)
