"""Training: the epoch loop, resume, logging, signals and the stop on a non-finite loss.

`train_and_evaluate(config, workdir)` trains with Dice loss (or `config.loss`) and Adam on a staircase
schedule (`steps`), validates every epoch (or every `eval.validate_every_epochs`-th and the last), keeps
the latest checkpoint (resume) and the best by validation loss, and at the end restores `eval.checkpoint`
(the best, or the last) and evaluates it on the test split (validation where no test split exists).
The first step of a second run of a config loads its compiled train step from the cache folder
(`compile_cache`).

Running the same command again resumes from the latest checkpoint, exactly: batches are a pure function
of (seed, epoch, position), dropout of (seed, step), and the checkpoint holds the data position, so a
run stopped at any step and resumed ends bit-identical to one that never stopped. SIGTERM or SIGINT
saves a checkpoint at the current step and exits. The batch is sharded over every local device (and
host) along a `data` mesh axis; parameters and optimizer state are replicated (`devices`).
"""

import json
import math
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np

from rdunet_jax import (
    checkpoints,
    config_lib,
    config_validation,
    datasets,
    devices,
    evaluate,
    files,
    inference,
    input_pipeline,
    mean_teacher,
    models,
    visualize,
)
from rdunet_jax.compile_cache import compiled_train_step
from rdunet_jax.datasets import labels as class_labels
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic, write_text_atomic
from rdunet_jax.orientation import model_orientation
from rdunet_jax.steps import create_train_state, learning_rate_schedule


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

        # TensorBoard hides the points of the epochs trained again (steps > start_epoch) written before.
        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_epoch + 1)

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key in ("loss", "val_loss", "val_dice", "learning_rate"):
            if key in record:  # val_* only on validated epochs (eval.validate_every_epochs)
                self.writer.add_scalar(key, record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _StopOnSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first; a second signal gets the
    handlers from before (Ctrl-C twice stops at once, as a user pressing it again expects)."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def _handle(self, signal_number, frame):
        if self.signal_number is None:
            self.signal_number = signal_number
            return
        self.__exit__()
        signal.raise_signal(signal_number)

    def __enter__(self):
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)


class _LossCheck:
    """Collects step losses and gradient norms on device and checks them in batches (one host sync per log
    interval)."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []

    def add(self, step: int, step_metrics: dict) -> None:
        self.pending.append((step, {name: step_metrics[name] for name in ("loss", "gradient_norm")}))

    def flush(self) -> list[float]:
        """The pending losses as floats; raises NonFiniteLossError naming the first step whose loss or
        gradient is not finite (its update is never saved)."""
        values = jax.device_get([step_metrics for _, step_metrics in self.pending])
        for (step, _), step_values in zip(self.pending, values, strict=True):
            loss, gradient_norm = float(step_values["loss"]), float(step_values["gradient_norm"])
            problem = None
            if not np.isfinite(loss):
                problem = f"loss is {loss}"
            elif not np.isfinite(gradient_norm):
                problem = f"the gradient norm is {gradient_norm} (loss {loss:.4f})"
            if problem:
                raise NonFiniteLossError(
                    f"{problem} at step {step}; training stopped, the last good checkpoint is kept "
                    f"(lower learning_rate or check the data)"
                )
        self.pending = []
        return [float(step_values["loss"]) for step_values in values]


def new_meta(config, steps_per_epoch: int | None = None) -> dict:
    """The JSON part of a checkpoint at the start of training."""
    meta = {
        "epoch": 0,
        "steps_per_epoch": steps_per_epoch,
        "iterator": None,
        "epoch_loss_sum": 0.0,
        "epoch_steps": 0,
        "best_val_loss": None,
        "best_epoch": None,
        "model": checkpoints.architecture(config.model, config.data),
        "orientation": model_orientation(config.data),
    }
    if mean_teacher.averages_parameters(mean_teacher.settings(config, steps_per_epoch=1)):
        meta[checkpoints.MEAN_TEACHER] = True  # absent otherwise: other runs' meta stays as it was
    return meta


# What a resumed run may change: how long it trains, where its data and its start come from, how it is
# evaluated. Anything else would continue one run's checkpoint as another run (a batch size resumed at the
# old one's step and data position) and overwrite the record of the first.
# Data paths may change too, as long as they only move the data (`config_lib.makes_another_run`).
RESUMABLE_KEYS = ("num_epochs", "model_init")


def check_resumable(config, workdir: pathlib.Path, finished: bool = False) -> None:
    """UserError naming the first setting in which `config` differs from the run it would resume (a
    `finished` one trains no more: it is only evaluated again)."""
    consistency = config.get("consistency")
    # FixMatch's pseudo-labels are its probabilities thresholded at eval.threshold: a training setting there.
    trains_with = (
        {"eval.threshold"}
        if consistency and consistency.weight > 0 and consistency.get("method") == "fixmatch" and not finished
        else set()
    )
    config_lib.check_against_run(
        config,
        workdir,
        lambda key, before, now: (
            key not in RESUMABLE_KEYS
            and config_lib.makes_another_run(key, before, now, finished)
            and (not key.startswith("eval.") or key in trains_with)
        ),
        "resuming would continue that run with another setting: run it unchanged (only num_epochs, eval.* "
        "and where the data are may change), or use another --workdir",
    )


def with_pretrained_weights(state, pretrained):
    """`state` with the parameters and BatchNorm statistics of `pretrained` (`checkpoints.restore_weights`);
    the step and dropout key stay those of a fresh run, and the optimizer starts afresh from them."""
    params, batch_stats, _ = pretrained

    def like(restored, fresh):
        return jax.numpy.asarray(restored, fresh.dtype)

    # The architecture check of restore_weights (checkpoints.ARCHITECTURE_KEYS) makes the trees fit.
    params = jax.tree_util.tree_map(like, params, state.params)
    # Initialised from these parameters: Adam's moments are zeros either way, but mean teacher's moving
    # average would otherwise start at the fresh draw they replace.
    return state.replace(
        params=params,
        batch_stats=jax.tree_util.tree_map(like, batch_stats, state.batch_stats),
        opt_state=state.tx.init(params),
    )


def _due(epoch: int, every: int, config) -> bool:
    """Whether the end of (0-based) `epoch` is an every-`every`-th one or the run's last."""
    return (epoch + 1) % every == 0 or epoch + 1 == config.num_epochs


def _step_due(step: int, config) -> bool:
    """Whether `checkpoint_every_steps` saves `latest` at (1-based) `step`."""
    return bool(config.checkpoint_every_steps) and step % config.checkpoint_every_steps == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains (resuming if `workdir` has a checkpoint), then evaluates the `eval.checkpoint` checkpoint.

    Args:
      config: a full run config (`config_lib.base_config()` and a config file's changes); validated here.
      workdir: the run folder (a path or string), created if missing: checkpoints/, train_log.jsonl,
        tensorboard/, config.json and metrics/.

    Returns the evaluation summary of `evaluate.evaluate_workdir` (also written to metrics/). Raises
    TrainingStopped after saving a checkpoint on SIGTERM or SIGINT, NonFiniteLossError on a NaN or
    infinite loss, and UserError for a bad config or workdir, or one that another run is using.
    """
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir: {workdir} exists and is not a folder")
    devices.initialize_distributed()
    config_validation.validate(config)
    devices.enable_compilation_cache(config.compilation_cache_dir)
    with files.exclusive_workdir(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    classes = class_labels.check_classes(config.data, config.model.head)
    model = models.build_model(config.model, classes)
    mesh = devices.data_parallel_mesh()
    devices.check_batch_divides(config.batch_size, mesh)
    train_source = class_labels.for_head(datasets.load_source(config.data, config.data.train_split), config)
    validation_source = class_labels.for_head(datasets.load_source(config.data, "validation"), config)
    evaluate.default_split(config)  # a run that could be scored only on slices it trains on stops here
    steps_per_epoch = len(devices.host_batches(train_source, config, 0))
    is_first_host = jax.process_index() == 0

    started = time.perf_counter()
    state = create_train_state(config, model, steps_per_epoch)
    # Of the global batch: the hosts' parts in host order, as jax.devices() orders the data mesh.
    state = state.replace(labelled_rows=input_pipeline.batch_norm_split_row(train_source, config))
    print(
        f"model {config.model.variant}: {models.count_parameters(state.params):,} parameters "
        f"(built in {time.perf_counter() - started:.1f}s); "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s)",
        flush=True,
    )
    pretrained = None
    if config.get("model_init") and not checkpoints.saved_steps(workdir):
        # Read before anything is written in the workdir, so a bad model_init leaves it as it was.
        pretrained = checkpoints.restore_weights(config.model_init, config.model, config.data)
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = new_meta(config, steps_per_epoch)

    def check(restored):
        state, meta = restored
        past = meta["epoch"] + bool(meta["iterator"])  # epochs begun
        if past > config.num_epochs:
            # It would be evaluated, and recorded in config.json, as a run of fewer epochs than it trained.
            trained = f" and {meta['epoch_steps']} steps" if meta["iterator"] else ""
            raise UserError(
                f"num_epochs: {config.num_epochs}, but the run in {workdir} trained {meta['epoch']} epochs"
                f"{trained} (step {int(state.step)}); set it to at least {past}, or use another --workdir"
            )
        check_resumable(config, workdir, finished=meta["epoch"] >= config.num_epochs and not meta["iterator"])
        checkpoints.check_steps_per_epoch(meta, int(state.step), steps_per_epoch, len(train_source))

    restored = checkpoints.restore_latest(run_checkpoints, state, config, check)
    if restored is not None:
        state, meta = restored
        meta.update(run_checkpoints.best_after(int(state.step)), steps_per_epoch=steps_per_epoch)
        position = f", {meta['epoch_steps']} steps into it" if meta["iterator"] else ""
        resumed = f"resumed at epoch {meta['epoch'] + 1}{position}"
        if meta["epoch"] >= config.num_epochs and not meta["iterator"]:  # a finished run re-evaluates
            resumed = f"all {meta['epoch']} epochs trained: evaluating only"
        print(f"{resumed} (step {int(state.step)})", flush=True)
    elif pretrained is not None:
        state = with_pretrained_weights(state, pretrained)
        print(
            f"model_init: parameters and BatchNorm statistics of {config.model_init} (step {pretrained[2]})",
            flush=True,
        )
    if is_first_host:
        # Written only once the checkpoints (if any) were found to fit this config.
        write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
    state = devices.replicate(state, mesh)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    log = _Log(workdir, meta["epoch"]) if is_first_host else None
    total_steps = config.num_epochs * steps_per_epoch
    loss_check = _LossCheck()
    # Epoch ends (validation, overlays, saves) count in the time left, not in the train steps' images/s.
    timer_start, timed_from, epoch_end_seconds = None, 0, 0.0
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
                    devices.host_batches(train_source, config, epoch), meta["iterator"]
                )
                for batch in iterator:
                    batch = devices.shard_batch(batch, mesh)
                    if step_function is None:
                        # Looked up in this module, so a caller can wrap the step (tests/kill_at_step.py).
                        step_function = compiled_train_step(config, state, batch, steps_per_epoch, mesh)
                        devices.wait_for_every_host("rdunet_train_step_compiled")
                    state, step_metrics = step_function(state, batch)
                    step += 1
                    loss_check.add(step, step_metrics)
                    # The last step of an epoch is saved after validation, with the epoch's record.
                    save_now = step % steps_per_epoch != 0 and (
                        stop.signal_number is not None or _step_due(step, config)
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
                        elapsed = time.perf_counter() - timer_start
                        rate = (step - timed_from) / max(elapsed, 1e-9)
                        images_per_second = (
                            (step - timed_from) * config.batch_size / max(elapsed - epoch_end_seconds, 1e-9)
                        )
                        print(
                            f"epoch {epoch + 1}/{config.num_epochs} step {step}/{total_steps} "
                            f"{images_per_second:.1f} img/s loss {values[-1]:.4f} "
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
                # A saved position is inside this epoch: the next one starts at its first batch, whether
                # or not this epoch's end is saved.
                meta["iterator"] = None
                values = loss_check.flush()  # waits for the steps still running: train time, not the end's
                epoch_end_start = time.perf_counter()
                epoch_loss = (meta["epoch_loss_sum"] + sum(values)) / max(
                    meta["epoch_steps"] + len(values), 1
                )
                validation = None
                if _due(epoch, config.eval.validate_every_epochs, config):
                    validation = evaluate.evaluate_source(
                        inference.JaxPredictor(state), validation_source, config
                    )
                # A non-finite validation loss is never the best: kept as best, no later loss is below it.
                is_best = (
                    validation is not None
                    and math.isfinite(validation["loss"])
                    and (meta["best_val_loss"] is None or validation["loss"] < meta["best_val_loss"])
                )
                meta.update(epoch_loss_sum=0.0, epoch_steps=0)
                if is_best:
                    meta.update(best_val_loss=validation["loss"], best_epoch=epoch + 1)
                    meta.update(epoch=epoch + 1)
                    run_checkpoints.save("best", step, state, meta)
                record = {"epoch": epoch + 1, "step": step, "loss": epoch_loss}
                if validation is not None:
                    record.update(val_loss=validation["loss"], val_dice=validation["dice"])
                record.update(
                    learning_rate=float(schedule(step - 1)), seconds=time.perf_counter() - epoch_start
                )
                if log is not None:
                    log.write(record)
                    if _due(epoch, config.eval.overlay_every_epochs, config):
                        overlays = evaluate.validation_overlays(
                            inference.JaxPredictor(state), validation_source, config
                        )
                        visualize.add_overlays_to_tensorboard(log.writer, overlays, epoch + 1)
                        log.writer.flush()
                # After the log and overlays: a signal that arrives while they are written is saved too. A
                # last step due by checkpoint_every_steps is saved here, whether or not the epoch end is due.
                if (
                    _due(epoch, config.checkpoint_every_epochs, config)
                    or _step_due(step, config)
                    or stop.signal_number is not None
                ):
                    save_latest(epoch + 1, None)
                validated = (
                    f" val_loss {validation['loss']:.4f} val_dice {validation['dice']:.4f}"
                    f"{' (best)' if is_best else ''}"
                    if validation is not None
                    else ""
                )
                print(f"epoch {epoch + 1}: loss {epoch_loss:.4f}{validated}", flush=True)
                if timer_start is not None:
                    epoch_end_seconds += time.perf_counter() - epoch_end_start
                if stop.signal_number is not None:
                    run_checkpoints.wait()
                    raise TrainingStopped(stop.signal_number, step, run_checkpoints.directory)
    finally:
        run_checkpoints.wait()
        run_checkpoints.close()
        if log is not None:
            log.close()
    if is_first_host:
        visualize.write_curves(workdir, config.loss, consistency=bool(config.consistency.weight))
    return evaluate.evaluate_workdir(config, workdir)
