"""Training: the train state, the jit-compiled train and eval steps, and the epoch loop.

`train_and_evaluate(config, workdir)` trains with Dice loss and Adam on a staircase schedule,
validates every epoch, keeps the latest checkpoint (resume) and the best by validation loss, and at the
end restores the best and evaluates it on the test split (validation where no test split exists).
Running the same command again resumes from the latest checkpoint.
"""

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from rdunet_jax import checkpoints, config_lib, datasets, input_pipeline, losses, models
from rdunet_jax.files import write_json_atomic


class TrainState(train_state.TrainState):
    """Parameters and optimizer state, plus BatchNorm statistics and the dropout key."""

    batch_stats: Any
    dropout_key: jax.Array


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache ('' leaves it off)."""
    if not directory:
        return
    path = pathlib.Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The paper's staircase: learning_rate, multiplied by lr_decay_factor every lr_decay_epochs."""
    return optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=config.lr_decay_epochs * steps_per_epoch,
        decay_rate=config.lr_decay_factor,
        staircase=True,
    )


def create_train_state(config, model, steps_per_epoch: int) -> TrainState:
    """Initialises the model (seeded by `config.seed`) and Adam on the staircase schedule."""
    variables = models.initialize_variables(model, config.data.image_size, config.seed)
    dropout_key = jax.random.PRNGKey(config.seed)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(learning_rate_schedule(config, steps_per_epoch)),
        dropout_key=dropout_key,
    )


def abstract_train_state(config, model, steps_per_epoch: int) -> TrainState:
    """The train state's structure, shapes and dtypes, without computing it (a restore target)."""
    return jax.eval_shape(lambda: create_train_state(config, model, steps_per_epoch))


@jax.jit
def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One Adam step on the mean soft Dice loss of the batch; dropout keyed by (seed, step)."""
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return jnp.mean(losses.soft_dice_loss(logits, batch["mask"])), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, {"loss": loss}


@jax.jit
def eval_step(state: TrainState, batch: dict) -> dict:
    """Per-image Dice loss and lesion probabilities, with running BatchNorm statistics."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    return {
        "loss": losses.soft_dice_loss(logits, batch["mask"]),
        "probabilities": jax.nn.sigmoid(logits),
    }


def _format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class _Log:
    """train_log.jsonl and TensorBoard, written once per epoch."""

    def __init__(self, workdir: pathlib.Path, start_epoch: int):
        self.path = workdir / "train_log.jsonl"
        kept = []
        if self.path.exists():
            # Epochs past the restored checkpoint were not kept: drop their lines.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= start_epoch
            ]
        self.path.write_text("".join(line + "\n" for line in kept))
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


def setup_run(config: ml_collections.ConfigDict):
    """Validates the config and builds what a run needs: the model and the train split's size."""
    config_lib.validate(config)
    enable_compilation_cache(config.compilation_cache_dir)
    model = models.build_model(config.model)
    return model


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains (resuming if `workdir` has a checkpoint), then evaluates the best checkpoint."""
    from rdunet_jax import evaluate  # evaluate builds on this module's steps and state

    workdir = pathlib.Path(workdir)
    model = setup_run(config)
    train_source = datasets.load_source(config.data, "train")
    validation_source = datasets.load_source(config.data, "validation")
    steps_per_epoch = input_pipeline.steps_per_epoch(train_source, config.batch_size)
    if steps_per_epoch == 0:
        raise config_lib.UserError(
            f"batch_size: {config.batch_size} is larger than the training split ({len(train_source)} slices)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))

    started = time.perf_counter()
    state = create_train_state(config, model, steps_per_epoch)
    print(
        f"model {config.model.variant}: {models.count_parameters(state.params):,} parameters "
        f"(built in {time.perf_counter() - started:.1f}s)",
        flush=True,
    )

    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta = {"epoch": 0, "iterator": None, "best_val_loss": None, "best_epoch": None}
    restored = run_checkpoints.restore("latest", state)
    if restored is not None:
        state, meta = restored
        print(
            f"resumed from {workdir / 'checkpoints' / 'latest'} at epoch {meta['epoch']}, "
            f"step {int(state.step)}",
            flush=True,
        )
    schedule = learning_rate_schedule(config, steps_per_epoch)
    log = _Log(workdir, meta["epoch"])
    total_steps = config.num_epochs * steps_per_epoch
    first_step = int(state.step)
    timer_start = None

    for epoch in range(meta["epoch"], config.num_epochs):
        epoch_start = time.perf_counter()
        dataset = input_pipeline.train_dataset(
            train_source, config.data, config.batch_size, config.seed, epoch
        )
        iterator = input_pipeline.to_iterator(dataset, meta["iterator"])
        epoch_losses = []
        for batch in iterator:
            state, step_metrics = train_step(state, batch)
            step = int(state.step)
            epoch_losses.append(step_metrics["loss"])
            if timer_start is None:
                # Time from the first completed step, so compilation does not skew images/s.
                jax.block_until_ready(state)
                timer_start, timed_from = time.perf_counter(), step
            elif step % config.log_every_steps == 0 or step == total_steps:
                loss = float(step_metrics["loss"])
                elapsed = time.perf_counter() - timer_start
                rate = (step - timed_from) / max(elapsed, 1e-9)
                print(
                    f"epoch {epoch + 1}/{config.num_epochs} step {step}/{total_steps} "
                    f"{rate * config.batch_size:.1f} img/s loss {loss:.4f} "
                    f"left {_format_seconds((total_steps - step) / max(rate, 1e-9))}",
                    flush=True,
                )
        meta["iterator"] = None

        validation = evaluate.evaluate_source(state, validation_source, config)
        epoch_loss = float(np.mean(jax.device_get(epoch_losses)))
        meta["epoch"] = epoch + 1
        is_best = meta["best_val_loss"] is None or validation["loss"] < meta["best_val_loss"]
        if is_best:
            meta["best_val_loss"], meta["best_epoch"] = validation["loss"], epoch + 1
            run_checkpoints.save("best", int(state.step), state, meta)
        run_checkpoints.save("latest", int(state.step), state, meta)
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "loss": epoch_loss,
            "val_loss": validation["loss"],
            "val_dice": validation["dice"],
            "learning_rate": float(schedule(int(state.step) - 1)),
            "seconds": time.perf_counter() - epoch_start,
        }
        log.write(record)
        print(
            f"epoch {epoch + 1}: loss {epoch_loss:.4f} val_loss {validation['loss']:.4f} "
            f"val_dice {validation['dice']:.4f}{' (best)' if is_best else ''}",
            flush=True,
        )
    run_checkpoints.wait()
    log.close()
    if first_step < int(state.step):
        print(f"trained {int(state.step) - first_step} steps", flush=True)
    run_checkpoints.close()
    return evaluate.evaluate_workdir(config, workdir)
