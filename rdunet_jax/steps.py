"""The train state and the two jit-compiled steps: one Adam step on the loss, and the eval forward pass;
and the restore of a run's checkpoint for evaluation, prediction and export.

Module functions over a `TrainState` (whose `apply_fn` is the model's), so the trainer, the evaluator and
the benchmarks share them without importing each other.
"""

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from rdunet_jax import checkpoints, fixmatch, heads, losses, mean_teacher, models
from rdunet_jax.errors import UserError


class TrainState(train_state.TrainState):
    """Parameters and optimizer state, plus BatchNorm statistics, the dropout key and the loss's name."""

    batch_stats: Any
    dropout_key: jax.Array
    # A key of `losses.LOSSES_BY_HEAD[head]`; static, so each loss is its own compiled program and nothing
    # is saved.
    loss: str = struct.field(pytree_node=False, default="dice")
    # `model.head`: which loss family, target and activation the steps use; static like the loss.
    head: str = struct.field(pytree_node=False, default="binary")
    # Mean teacher's or FixMatch's settings (`mean_teacher.settings`); () trains without either.
    consistency: tuple = struct.field(pytree_node=False, default=())
    # `model.batch_norm_by_source` in a mixed batch: its first `labelled_rows` rows (the labelled ones) and
    # the rest are normalised each by their own batch statistics; 0 normalises the batch as one.
    labelled_rows: int = struct.field(pytree_node=False, default=0)


def loss_target(batch: dict, head: str):
    """What the head's loss compares the logits with: the binary lesion `mask`, else the class `labels`."""
    return batch["mask"] if head == "binary" else batch["labels"]


def per_image_loss(state, logits, batch: dict):
    """The trained loss of each image of the batch (shape [batch])."""
    return losses.LOSSES_BY_HEAD[state.head][state.loss](logits, loss_target(batch, state.head))


# Every config key `learning_rate_schedule` reads: the schedule is traced into the compiled train step, so
# the stored step's key (compile_cache.train_step_key) holds each of them.
SCHEDULE_KEYS = ("learning_rate", "lr_decay_epochs", "lr_decay_factor", "warmup_epochs")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The paper's staircase: learning_rate, multiplied by lr_decay_factor every lr_decay_epochs; with
    warmup_epochs, scaled by (step + 1) / warm-up steps until that reaches 1."""
    staircase = optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=config.lr_decay_epochs * steps_per_epoch,
        decay_rate=config.lr_decay_factor,
        staircase=True,
    )
    warmup_steps = config.warmup_epochs * steps_per_epoch
    if not warmup_steps:
        return staircase
    # The staircase keeps counting from step 0, so a warm-up never moves the decay epochs.
    return lambda step: staircase(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)


def create_train_state(config, model, steps_per_epoch: int) -> TrainState:
    """Initialises the model (seeded by `config.seed`) and Adam on the staircase schedule."""
    variables = models.initialize_variables(model, config.data.image_size, config.seed)
    optimizer = optax.adam(learning_rate_schedule(config, steps_per_epoch))
    consistency = mean_teacher.settings(config, steps_per_epoch)
    if mean_teacher.averages_parameters(consistency):
        optimizer = optax.chain(optimizer, mean_teacher.track_parameter_ema(config.consistency.ema_decay))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optimizer,
        dropout_key=jax.random.PRNGKey(config.seed),
        loss=config.loss,
        head=config.model.get("head", "binary"),
        consistency=consistency,
    )


def abstract_train_state(config, model, steps_per_epoch: int) -> TrainState:
    """The train state's structure, shapes and dtypes, without computing it (a restore target)."""
    return jax.eval_shape(lambda: create_train_state(config, model, steps_per_epoch))


# XLA:CPU orders a program for concurrency by default, which kept 2.5 GB of temporaries in the train
# step at 256 px, batch 8; its memory-minimising order needs 1.7 GB and ran 12% faster on 2 cores
# (experiments/README.md, "XLA options"). Other backends ignore XLA:CPU options.
COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# The forward pass alone is another matter: XLA's own convolution kernels ran it in 0.61-0.65 of the time
# of the YNNPACK ones it picks by default, and the memory-minimising order cost it 13% while it needs
# only 320 MB at 256 px, batch 16 (experiments/README.md, "XLA options"). Same numbers to 1e-7.
EVAL_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def train_forward(state: TrainState, params, inputs, dropout_key):
    """The model's training-mode logits of `inputs` and its new BatchNorm statistics; with
    `state.labelled_rows`, domain-specific batch statistics: the labelled rows and the rest each normalised
    by their own, the running statistics updated by the labelled rows' alone."""

    def forward(rows, key):
        variables = {"params": params, "batch_stats": state.batch_stats}
        return state.apply_fn(variables, rows, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

    if not state.labelled_rows:
        return forward(inputs, dropout_key)
    logits, updates = forward(inputs[: state.labelled_rows], dropout_key)
    # Evaluation sees labelled-like slices only, so the other source's running averages are dropped.
    other_logits, _ = forward(inputs[state.labelled_rows :], jax.random.fold_in(dropout_key, 1))
    return jnp.concatenate([logits, other_logits]), updates


@functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One Adam step on the batch's mean loss (`state.loss`, the paper's soft Dice by default); dropout
    keyed by (seed, step). With mean teacher or FixMatch (`state.consistency`) the student sees the batch
    perturbed and the loss adds the consistency term (`_mean_teacher_terms`, `_fixmatch_terms`)."""
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    inputs, consistency_term = batch["image"], None
    if state.consistency:
        terms = {"mean_teacher": _mean_teacher_terms, "fixmatch": _fixmatch_terms}[state.consistency.method]
        inputs, consistency_term = terms(state, batch, dropout_key)

    def loss_fn(params):
        logits, updates = train_forward(state, params, inputs, dropout_key)
        loss = jnp.mean(per_image_loss(state, logits, batch))
        if consistency_term is not None:
            loss = loss + consistency_term(logits)
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    # The gradients' norm too: an infinite gradient of a finite loss makes the new parameters NaN, which a
    # check of the loss alone would let the step's checkpoint keep.
    return state, {"loss": loss, "gradient_norm": optax.tree_utils.tree_norm(grads)}


def _mean_teacher_terms(state: TrainState, batch: dict, dropout_key):
    """Mean teacher's student input (the batch plus Gaussian noise) and consistency term: weight x ramp-up
    x the squared difference from the teacher's probabilities on the batch (the teacher: the parameters'
    moving average, with the running BatchNorm statistics)."""
    weight, rampup_steps, noise_std = state.consistency[:3]
    teacher_logits = state.apply_fn(
        {"params": mean_teacher.teacher_parameters(state.opt_state), "batch_stats": state.batch_stats},
        batch["image"],
        train=False,
    )
    teacher = jax.lax.stop_gradient(jax.nn.sigmoid(teacher_logits.astype(jnp.float32)))
    noise_key = jax.random.fold_in(dropout_key, 1)  # a stream of its own, beside dropout's
    image = batch["image"]
    noisy = image + noise_std * jax.random.normal(noise_key, image.shape, image.dtype)
    scale = weight * mean_teacher.rampup(state.step, rampup_steps)
    return noisy, lambda logits: scale * mean_teacher.consistency_loss(logits, teacher)


def _fixmatch_terms(state: TrainState, batch: dict, dropout_key):
    """FixMatch's student input (the labelled rows as they are, the unlabelled rows' strong view) and
    consistency term: weight x ramp-up x the cross-entropy of the unlabelled rows against the confident
    pseudo-labels of the model's own prediction of the batch (current parameters, running BatchNorm
    statistics, no gradient)."""
    settings = state.consistency
    weak_logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    teacher = jax.lax.stop_gradient(jax.nn.sigmoid(weak_logits.astype(jnp.float32)))
    strong = fixmatch.strong_view(
        batch["image"],
        jax.random.fold_in(dropout_key, 1),  # a stream of its own, beside dropout's
        settings.strong_intensity_range,
        settings.noise_std,
    )
    scale = settings.weight * mean_teacher.rampup(state.step, settings.rampup_steps)
    rows = fixmatch.unlabelled_rows(batch["mask"])
    # As in FixMatch, the supervised loss sees the labelled slices' weak view.
    inputs = jnp.where(rows[:, None, None, None] > 0, strong, batch["image"])
    # Every unlabelled row is seen strong (so the batch statistics do not depend on the filter); only the
    # rows the filter keeps teach.
    taught = rows * fixmatch.rows_with_lesion(teacher, settings.mask_threshold, settings.min_lesion_fraction)

    def consistency_term(logits):
        loss = fixmatch.pseudo_label_loss(
            logits, teacher, taught, settings.mask_threshold, settings.confidence_threshold
        )
        return scale * loss

    return inputs, consistency_term


@functools.partial(jax.jit, compiler_options=EVAL_COMPILER_OPTIONS)
def eval_step(state: TrainState, batch: dict) -> dict:
    """Per-image loss (the trained one; left out when the batch has no target) and the head's
    probabilities (sigmoid, or softmax over channels for 'exclusive'), with running BatchNorm statistics."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    outputs = {"probabilities": heads.activate(logits, state.head)}
    if ("mask" if state.head == "binary" else "labels") in batch:
        outputs["loss"] = per_image_loss(state, logits, batch)
    return outputs


# eval.checkpoint -> the checkpoints.RunCheckpoints kind it restores.
_CHECKPOINT_KINDS = {"best": "best", "last": "latest"}


def restore_state(config, workdir, checkpoint_step: int | None = None, model=None) -> TrainState:
    """The train state of `workdir`'s `eval.checkpoint` (best or last), or the given step of `latest`
    (else `best`), for `model` (built from `config.model` when None). Creates nothing: a workdir without
    checkpoints, an unknown step or a damaged checkpoint is a UserError."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"--workdir: no checkpoint in {directory.absolute()}; train first")
    if model is None:
        model = models.build_model(config.model, config.data.get("classes", models.BINARY_CLASSES))
    run_checkpoints = checkpoints.RunCheckpoints(directory, create=False)
    try:
        target = abstract_train_state(config, model, steps_per_epoch=1)
        available = sorted(set(run_checkpoints.all_steps("latest")) | set(run_checkpoints.all_steps("best")))
        kind = _CHECKPOINT_KINDS[config.eval.checkpoint] if checkpoint_step is None else "latest"
        if checkpoint_step is not None and checkpoint_step not in run_checkpoints.all_steps(kind):
            kind = "best"
            if checkpoint_step not in run_checkpoints.all_steps(kind):
                raise UserError(
                    f"--checkpoint_step: no checkpoint at step {checkpoint_step} in "
                    f"{run_checkpoints.directory}; available steps: {available}"
                )
        saved_steps = run_checkpoints.all_steps(kind)
        if not saved_steps and kind == "best" and available:
            # Between validations (eval.validate_every_epochs) a run has `latest` but maybe no `best` yet;
            # a run whose every validation loss was NaN never has one.
            raise UserError(
                f"--workdir: no best checkpoint yet in {run_checkpoints.directory} (no epoch validated, or "
                "every validation loss NaN or infinite: see train_log.jsonl); finish training, or use "
                f"--config.eval.checkpoint=last (steps {available})"
            )
        if not saved_steps:
            raise UserError(f"--workdir: no checkpoint in {run_checkpoints.directory}; train first")
        step = max(saved_steps) if checkpoint_step is None else checkpoint_step
        # best/S and latest/S are the same state: a damaged one is read from the other.
        twin = "latest" if kind == "best" else "best"
        damage = None
        for read_kind in (kind, twin) if step in run_checkpoints.all_steps(twin) else (kind,):
            try:
                restored = run_checkpoints.restore(
                    read_kind, target, step, model_config=config.model, data_config=config.data
                )
            except UserError:  # checkpoints.ModelMismatchError: another model's checkpoint, not damage
                raise
            except Exception as error:  # orbax and tensorstore raise many types for missing or cut files
                if checkpoints.not_damage(error):
                    raise UserError(
                        f"cannot read checkpoint step {step} in {run_checkpoints.directory / read_kind} "
                        f"({type(error).__name__}); out of memory or file handles: free them and run again"
                    ) from None
                damage = damage or type(error).__name__
                continue
            if read_kind != kind:
                print(
                    f"warning: checkpoint step {step} in {run_checkpoints.directory / kind} is damaged "
                    f"({damage}); read the same step from {run_checkpoints.directory / read_kind}",
                    flush=True,
                )
            return restored[0]
        others = [other for other in available if other != step]
        remedy = (
            f"evaluate another with --mode=evaluate --checkpoint_step (available: {others})"
            if others
            else "no other step is saved: train the run again in another --workdir"
        )
        raise UserError(
            f"checkpoint step {step} in {run_checkpoints.directory / kind} is damaged ({damage}); {remedy}"
        )
    finally:
        run_checkpoints.close()
