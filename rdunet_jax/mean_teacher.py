"""Mean teacher (Tarvainen & Valpola, 2017): consistency regularisation on unlabelled slices.

The teacher is an exponential moving average of the student's parameters, kept in the optimizer state
(`track_parameter_ema`, chained after Adam), so a checkpoint and its restore need nothing new. Each train
step adds to the supervised loss (the batch's mean, to which the unlabelled rows, at weight 0, add 0, as
pseudo-labelled batches are averaged) the mean squared
difference between the student's probabilities on the batch plus Gaussian noise and the teacher's on the
batch, weighted by `consistency.weight` times a sigmoid ramp-up over `consistency.rampup_epochs`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ParameterEmaState(NamedTuple):
    """How many updates the average has seen, and the averaged parameters (the teacher)."""

    count: jax.Array
    ema: Any


def track_parameter_ema(decay: float) -> optax.GradientTransformation:
    """The mean teacher: after the n-th update the teacher moves to the updated parameters at rate
    1 - a, a = min(decay, 1 - 1/n) (the paper's warm-up: the teacher starts as the student). Updates pass
    through unchanged."""

    def init(params):
        return ParameterEmaState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.array, params))

    def update(updates, state, params):
        count = state.count + 1
        keep = jnp.minimum(decay, 1.0 - 1.0 / count.astype(jnp.float32))
        updated = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda old, new: keep * old + (1.0 - keep) * new, state.ema, updated)
        return updates, ParameterEmaState(count, ema)

    return optax.GradientTransformation(init, update)


def teacher_parameters(opt_state):
    """The teacher's parameters, from an optimizer state chained as `optax.chain(adam, ema)`."""
    return opt_state[1].ema


def rampup(step, rampup_steps: int):
    """exp(-5 (1 - t)^2), t = step / rampup_steps clipped to [0, 1] (1 without a ramp-up)."""
    if rampup_steps <= 0:
        return jnp.float32(1.0)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
    return jnp.exp(-5.0 * jnp.square(1.0 - progress))


def consistency_loss(student_logits, teacher_probabilities):
    """Mean squared difference of the student's sigmoid probabilities from the teacher's."""
    return jnp.mean(jnp.square(jax.nn.sigmoid(student_logits.astype(jnp.float32)) - teacher_probabilities))


class Consistency(NamedTuple):
    """A run's consistency regularisation (`consistency.*`), static in the train state."""

    weight: float
    rampup_steps: int
    noise_std: float
    method: str = "mean_teacher"
    # FixMatch's (rdunet_jax/fixmatch.py): pseudo-label and confidence thresholds, strong view's jitter,
    # and the slice filter (0: every unlabelled slice).
    mask_threshold: float = 0.5
    confidence_threshold: float = 0.0
    strong_intensity_range: float = 0.0
    min_lesion_fraction: float = 0.0


def settings(config, steps_per_epoch: int) -> Consistency | tuple:
    """The `Consistency` of a config with `consistency.weight` > 0, else ()."""
    consistency = config.get("consistency")
    if consistency is None or not consistency.weight:
        return ()
    shared = (
        float(consistency.weight),
        int(consistency.rampup_epochs) * int(steps_per_epoch),
        float(consistency.noise_std),
    )
    method = consistency.get("method", "mean_teacher")
    if method == "mean_teacher":
        return Consistency(*shared)
    if method != "fixmatch":
        raise ValueError(f"consistency.method: {method!r} is neither 'mean_teacher' nor 'fixmatch'")
    return Consistency(
        *shared,
        method=consistency.method,
        mask_threshold=float(config.eval.threshold),
        confidence_threshold=float(consistency.confidence_threshold),
        strong_intensity_range=float(consistency.strong_intensity_range),
        # A config stored before the key existed (a run folder's) trains as it did: every slice.
        min_lesion_fraction=float(consistency.get("min_lesion_fraction", 0.0)),
    )


def averages_parameters(consistency) -> bool:
    """Whether the run keeps mean teacher's moving average of the parameters in its optimizer state."""
    return bool(consistency) and consistency.method == "mean_teacher"
