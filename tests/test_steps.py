"""steps.py: the train step, the eval step, and Adam on the learning-rate staircase."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
import reference_model as reference
from helpers import assert_running_stats_as_the_reference, make_tiny_config

from rdunet_jax import config_lib, datasets, input_pipeline, layers, models, steps
from rdunet_jax import losses as losses_lib


def _fixed_batch(config):
    source = datasets.load_source(config.data, "train")
    dataset = input_pipeline.train_dataset(source, config.data, config.batch_size, config.seed, epoch=0)
    return dataset[0]


def test_train_steps_on_one_batch_lower_the_loss(one_level_state, one_level_config):
    batch = _fixed_batch(one_level_config)
    state = one_level_state
    losses = []
    for _ in range(12):
        state, step_metrics = steps.train_step(state, batch)
        losses.append(float(step_metrics["loss"]))
    assert int(state.step) == 12
    # Dropout makes single steps noisy: compare the first and last few.
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01
    # Batch statistics are updated by training, not frozen at their initial values.
    before = jax.tree_util.tree_leaves(one_level_state.batch_stats)
    after = jax.tree_util.tree_leaves(state.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_train_step_is_deterministic_and_dropout_depends_on_step(one_level_state, one_level_config):
    batch = _fixed_batch(one_level_config)
    first, metrics_a = steps.train_step(one_level_state, batch)
    again, metrics_b = steps.train_step(one_level_state, batch)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    for a, b in zip(
        jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(again.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Same parameters, different step: a different dropout mask gives a different loss.
    shifted = one_level_state.replace(step=one_level_state.step + 1)
    _, metrics_c = steps.train_step(shifted, batch)
    assert float(metrics_c["loss"]) != float(metrics_a["loss"])


def test_the_train_step_minimises_the_configured_loss(one_level_state, one_level_config):
    batch = _fixed_batch(one_level_config)
    dropout_key = jax.random.fold_in(one_level_state.dropout_key, one_level_state.step)
    logits, _ = one_level_state.apply_fn(
        {"params": one_level_state.params, "batch_stats": one_level_state.batch_stats},
        batch["image"],
        train=True,
        rngs={"dropout": dropout_key},
        mutable=["batch_stats"],
    )
    for name in ("dice", "dice_bce"):
        _, step_metrics = steps.train_step(one_level_state.replace(loss=name), batch)
        expected = float(np.mean(losses_lib.LOSSES[name](logits, batch["mask"])))
        np.testing.assert_allclose(float(step_metrics["loss"]), expected, rtol=1e-5)
    validation = steps.eval_step(one_level_state.replace(loss="dice_bce"), batch)["loss"]
    assert validation.shape == (one_level_config.batch_size,)
    # Cross-entropy is positive, so the validation loss rises above plain Dice on every image.
    assert np.all(validation > steps.eval_step(one_level_state, batch)["loss"])
    config = make_tiny_config()
    config.loss = "dice_bce"
    model = models.build_model(config.model)
    assert steps.abstract_train_state(config, model, steps_per_epoch=2).loss == "dice_bce"


def test_a_train_step_moves_the_running_statistics_by_the_momentum_and_reports_the_gradients_norm(
    one_level_state, one_level_config
):
    batch = _fixed_batch(one_level_config)
    after, step_metrics = steps.train_step(one_level_state, batch)
    # Running statistics s' = m s + (1 - m) (the batch's): starting 0.5 higher ends m x 0.5 higher, and
    # the training forward pass (batch statistics) is unchanged. A step that dropped the stored statistics
    # (re-initialised them) gave a difference of 0.
    shifted = one_level_state.replace(
        batch_stats=jax.tree_util.tree_map(lambda s: s + 0.5, one_level_state.batch_stats)
    )
    after_shifted, _ = steps.train_step(shifted, batch)
    for moved, plain in zip(
        jax.tree_util.tree_leaves(after_shifted.batch_stats),
        jax.tree_util.tree_leaves(after.batch_stats),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(moved) - np.asarray(plain), layers.BATCH_NORM_MOMENTUM * 0.5, atol=1e-5
        )
    # The gradient norm the loop checks for non-finite values: that of jax.grad of the step's loss.
    dropout_key = jax.random.fold_in(one_level_state.dropout_key, one_level_state.step)

    def loss_of(params):
        logits, _ = one_level_state.apply_fn(
            {"params": params, "batch_stats": one_level_state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return jax.numpy.mean(losses_lib.LOSSES["dice"](logits, batch["mask"]))

    gradients = jax.tree_util.tree_leaves(jax.grad(loss_of)(one_level_state.params))
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in gradients))
    assert expected > 0
    np.testing.assert_allclose(float(step_metrics["gradient_norm"]), expected, rtol=1e-4)


def test_the_train_step_is_scheduled_for_memory_with_the_same_result(one_level_state, one_level_config):
    batch = _fixed_batch(one_level_config)
    default_order = jax.jit(steps.train_step.__wrapped__)  # XLA:CPU's own scheduler
    ours = steps.train_step.lower(one_level_state, batch).compile()
    theirs = default_order.lower(one_level_state, batch).compile()
    # 1.5 MB against 2.2 MB for this one-level model (1.7 GB against 2.5 GB at 256 px, batch 8).
    assert ours.memory_analysis().temp_size_in_bytes < 0.8 * theirs.memory_analysis().temp_size_in_bytes
    np.testing.assert_allclose(
        float(ours(one_level_state, batch)[1]["loss"]),
        float(theirs(one_level_state, batch)[1]["loss"]),
        rtol=1e-5,
    )


def test_the_eval_step_uses_xlas_own_convolutions_with_the_same_result(one_level_state, one_level_config):
    batch = _fixed_batch(one_level_config)
    ours = steps.eval_step.lower(one_level_state, batch).compile()
    theirs = jax.jit(steps.eval_step.__wrapped__).lower(one_level_state, batch).compile()
    assert "ynn" in theirs.as_text() and "ynn" not in ours.as_text()
    np.testing.assert_allclose(
        ours(one_level_state, batch)["probabilities"],
        theirs(one_level_state, batch)["probabilities"],
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "learning_rate, decay_epochs, decay_factor, steps_per_epoch, boundary_steps, expected",
    [
        # The paper's: 1e-3, divided by 10 every 20 epochs (5 steps an epoch: a drop every 100 steps).
        (1e-3, 20, 0.1, 5, [0, 99, 100, 199, 200, 299, 300], [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6]),
        # Not the paper's, so a hard-coded 0.1 or 20 fails: halved every 7 epochs of 3 steps (21 steps).
        (3e-3, 7, 0.5, 3, [0, 20, 21, 41, 42, 62, 63], [3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4, 7.5e-4, 3.75e-4]),
    ],
)
def test_learning_rate_staircase_at_the_boundaries(
    learning_rate, decay_epochs, decay_factor, steps_per_epoch, boundary_steps, expected
):
    config = make_tiny_config()
    config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor = (
        learning_rate,
        decay_epochs,
        decay_factor,
    )
    schedule = steps.learning_rate_schedule(config, steps_per_epoch)
    got = [float(schedule(step)) for step in boundary_steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Flat between drops: every step of an epoch, not only the boundaries, has its staircase value.
    drop_every = decay_epochs * steps_per_epoch
    for step in range(3 * drop_every + 2):
        assert float(schedule(step)) == pytest.approx(expected[2 * (step // drop_every)], rel=1e-6)


@pytest.mark.parametrize(
    "warmup_epochs, expected",
    [
        # 3 warm-up steps: (step + 1) / 3 of the staircase, then the staircase (1e-3, 1e-4 from step 6).
        (1, [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4]),
        # A warm-up past the first drop (9 steps, drop at 6) scales the staircase's own value there.
        (3, [1e-3 / 9, 2e-3 / 9, 3e-3 / 9, 4e-3 / 9, 5e-3 / 9, 6e-3 / 9, 7e-4 / 9, 8e-4 / 9, 1e-4, 1e-4]),
        (0, [1e-3] * 6 + [1e-4] * 4),
    ],
)
def test_a_warm_up_scales_the_staircase_linearly_without_moving_its_drops(warmup_epochs, expected):
    config = make_tiny_config()
    config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor = 1e-3, 2, 0.1
    config.warmup_epochs = warmup_epochs
    schedule = steps.learning_rate_schedule(config, steps_per_epoch=3)
    np.testing.assert_allclose([float(schedule(step)) for step in range(10)], expected, rtol=1e-6)


def test_the_schedule_reads_only_the_keys_the_stored_train_steps_key_holds():
    config = make_tiny_config()
    config.warmup_epochs = 1
    only = ml_collections.ConfigDict({key: config[key] for key in steps.SCHEDULE_KEYS})
    schedule, full = steps.learning_rate_schedule(only, 3), steps.learning_rate_schedule(config, 3)
    assert [float(schedule(step)) for step in range(8)] == [float(full(step)) for step in range(8)]


def test_the_optimizer_is_adam_with_the_scheduled_learning_rate():
    """One update of the train state's optimizer against Adam written out (Kingma and Ba, Algorithm 1,
    optax's defaults beta1 0.9, beta2 0.999, eps 1e-8), at steps on both sides of each drop."""
    config = make_tiny_config()
    paper = config_lib.base_config()
    config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor = (
        paper.learning_rate,
        paper.lr_decay_epochs,
        paper.lr_decay_factor,
    )
    optimizer = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=3).tx
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=6).astype(np.float32)}
    gradient = {"w": rng.normal(size=6).astype(np.float32)}
    first_moment = rng.normal(size=6).astype(np.float32)
    second_moment = rng.uniform(0.1, 2.0, size=6).astype(np.float32)
    # 20 epochs of 3 steps: the learning rate drops after step 59 and after step 119.
    for step, learning_rate in [(0, 1e-3), (59, 1e-3), (60, 1e-4), (119, 1e-4), (120, 1e-5)]:
        state = optimizer.init(params)
        state = optax.tree_utils.tree_set(
            state, count=np.int32(step), mu={"w": first_moment}, nu={"w": second_moment}
        )
        updates, _ = optimizer.update(gradient, state, params)
        g = gradient["w"].astype(np.float64)
        m = 0.9 * first_moment + 0.1 * g
        v = 0.999 * second_moment + 0.001 * g**2
        m_hat, v_hat = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.999 ** (step + 1))
        expected = -learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-5, err_msg=f"step {step}")


def _state_with_labelled_rows(model, variables, labelled_rows: int):
    return steps.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.0),
        dropout_key=jax.random.PRNGKey(0),
        labelled_rows=labelled_rows,
    )


def test_batch_norm_by_source_normalises_each_source_by_its_own_statistics_against_the_reference():
    """`model.batch_norm_by_source` (domain-specific batch statistics): the numpy reference network in its
    training form run on the labelled rows alone and on the other rows alone gives the logits, and the
    labelled rows alone give the running averages stored."""
    config = config_lib.base_config()
    config.model.features = 4
    config.model.update(dropout_rate=0.0, batch_norm_momentum=0.8)
    model = models.build_model(config.model)
    rng = np.random.default_rng(3)
    variables = models.initialize_variables(model, 32, seed=4)
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda leaf: jax.numpy.asarray(rng.uniform(0.5, 1.5, leaf.shape), jax.numpy.float32),
        variables["batch_stats"],
    )
    ramp = np.linspace(-1.0, 1.0, 32)[None, :, None, None]
    # The other source brighter and wider, as another dataset's processing would make it.
    images = rng.normal(size=(5, 32, 32, 1)) + ramp
    images[3:] = 3.0 * images[3:] + 2.0
    images = images.astype(np.float32)
    architecture = reference.Architecture.from_config(config.model)
    labelled = reference.Variables(variables, training_momentum=0.8)
    other = reference.Variables(variables, training_momentum=0.8)
    want = np.concatenate(
        [
            reference.forward(labelled, images[:3], architecture),
            reference.forward(other, images[3:], architecture),
        ]
    )
    forward = jax.jit(lambda state, x: steps.train_forward(state, state.params, x, state.dropout_key))
    with jax.default_matmul_precision("highest"):
        got, updates = forward(_state_with_labelled_rows(model, variables, 3), images)
        whole, _ = forward(_state_with_labelled_rows(model, variables, 0), images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # The whole batch's statistics give other logits: the comparison above could fail.
    assert np.abs(np.asarray(whole) - want).max() > 0.05 * np.abs(want).max()
    assert_running_stats_as_the_reference(updates["batch_stats"], labelled)


def test_a_train_step_with_batch_norm_by_source_keeps_running_statistics_of_the_labelled_rows(
    one_level_state, one_level_config
):
    batch = _fixed_batch(one_level_config)
    split = one_level_state.replace(labelled_rows=2)
    after, _ = steps.train_step(split, batch)
    # Other images in the other rows: the same running statistics, other parameters.
    changed = dict(batch, image=batch["image"].copy())
    changed["image"][2:] = 1.0 - changed["image"][2:]
    after_changed, _ = steps.train_step(split, changed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after.batch_stats, after_changed.batch_stats)
    assert _some_leaf_differs(after.params, after_changed.params)
    # Without the split they move with the other rows.
    whole, _ = steps.train_step(one_level_state, batch)
    whole_changed, _ = steps.train_step(one_level_state, changed)
    assert _some_leaf_differs(whole.batch_stats, whole_changed.batch_stats)


def _some_leaf_differs(tree, other) -> bool:
    return any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(other), strict=True)
    )


def test_batch_norm_by_source_draws_the_other_rows_dropout_masks_apart(one_level_config):
    """The two parts of a split batch are two forward passes: the other rows get their own dropout key, not
    the labelled rows' masks again."""
    images = np.asarray(_fixed_batch(one_level_config)["image"][:2])
    twice = np.concatenate([images, images])  # the same rows, so the same statistics, on both sides
    forward = jax.jit(lambda state, x: steps.train_forward(state, state.params, x, state.dropout_key))
    logits = {}
    for dropout_rate in (0.5, 0.0):
        model_config = one_level_config.model.copy_and_resolve_references()
        model_config.dropout_rate = dropout_rate
        model = models.build_model(model_config)
        variables = models.initialize_variables(model, one_level_config.data.image_size, seed=0)
        logits[dropout_rate], _ = forward(_state_with_labelled_rows(model, variables, 2), twice)
    np.testing.assert_allclose(logits[0.0][:2], logits[0.0][2:], rtol=1e-5, atol=1e-6)  # only dropout differs
    assert np.abs(np.asarray(logits[0.5][:2]) - np.asarray(logits[0.5][2:])).max() > 1e-3


@pytest.mark.parametrize(("head", "loss"), [("exclusive", "dice_ce"), ("multilabel", "dice_bce")])
def test_a_class_heads_evaluation_loss_compares_the_logits_with_the_class_labels_not_the_lesion_mask(
    head, loss
):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = head, ("ggo", "consolidation"), loss
    model = models.build_model(config.model, config.data.classes)
    state = steps.create_train_state(config, model, steps_per_epoch=1)
    rng = np.random.default_rng(4)
    images = rng.random((2, 32, 32, 1), np.float32)
    # Every pipeline batch carries the binary lesion mask too; here it disagrees with the labels.
    if head == "exclusive":  # a label map: 0 background, 1 ggo, 2 consolidation
        labels = rng.integers(0, 3, (2, 32, 32, 1)).astype(np.int32)
    else:  # per-class channels
        labels = rng.integers(0, 2, (2, 32, 32, 2)).astype(np.int32)
    batch = {"image": images, "mask": np.ones((2, 32, 32, 1), np.float32), "labels": labels}
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    expected = losses_lib.LOSSES_BY_HEAD[head][loss](logits, labels)
    np.testing.assert_allclose(np.asarray(steps.eval_step(state, batch)["loss"]), expected, rtol=1e-6)
    assert "loss" not in steps.eval_step(state, {"image": images, "mask": batch["mask"]})  # no labels
