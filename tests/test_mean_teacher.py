"""Mean teacher: the parameters' moving average against hand values, the ramp-up, the train step's loss
against a numpy recomputation, the unlabelled rows of mixed batches, the config's errors, and a resumed
run that ends bit-identical to an uninterrupted one."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_refused,
    assert_same_training_state,
    make_consistency_config,
    make_tiny_config,
    sigmoid64,
    train_to_the_end,
)

from rdunet_jax import (
    compile_cache,
    datasets,
    input_pipeline,
    mean_teacher,
    models,
    steps,
    train,
)
from rdunet_jax.errors import UserError


def test_the_teacher_is_the_moving_average_of_the_updated_parameters_with_the_warm_up():
    def run(decay, updates):
        transform = mean_teacher.track_parameter_ema(decay)
        params = {"w": jnp.array([1.0])}
        state = transform.init(params)
        assert state.count.dtype == jnp.int32  # a count of updates, exact however long the run
        teachers = []
        for update in updates:
            passed, state = transform.update({"w": jnp.array([update])}, state, params)
            assert float(passed["w"][0]) == update  # the updates themselves are not changed
            params = optax.apply_updates(params, passed)
            teachers.append(float(state.ema["w"][0]))
        return teachers

    # Parameters 1.5, 0.5, 1.5; the teacher keeps min(decay, 1 - 1/n) of itself after update n.
    assert run(0.99, [0.5, -1.0, 1.0]) == pytest.approx(
        [1.5, 0.5 * 1.5 + 0.5 * 0.5, 2 / 3 * 1.0 + 1 / 3 * 1.5]
    )
    assert run(0.5, [0.5, -1.0, 1.0]) == pytest.approx([1.5, 1.0, 0.5 * 1.0 + 0.5 * 1.5])


def test_the_ramp_up_is_a_sigmoid_shaped_rise_to_one():
    assert float(mean_teacher.rampup(0, 10)) == pytest.approx(np.exp(-5.0))
    assert float(mean_teacher.rampup(5, 10)) == pytest.approx(np.exp(-1.25))
    assert float(mean_teacher.rampup(10, 10)) == float(mean_teacher.rampup(25, 10)) == 1.0
    assert float(mean_teacher.rampup(0, 0)) == 1.0
    # A ramp-up of one step still starts low; t is clipped below at 0 as above at 1.
    assert float(mean_teacher.rampup(0, 1)) == pytest.approx(np.exp(-5.0))
    assert float(mean_teacher.rampup(1, 1)) == 1.0
    assert float(mean_teacher.rampup(-3, 10)) == pytest.approx(np.exp(-5.0))


def test_the_settings_ramp_up_over_the_configured_epochs_in_steps():
    config = make_consistency_config()
    config.consistency.rampup_epochs, config.consistency.noise_std = 2, 0.05
    settings = mean_teacher.settings(config, steps_per_epoch=3)
    assert settings[:4] == (2.0, 6, 0.05, "mean_teacher") and mean_teacher.averages_parameters(settings)
    # A config saved before consistency.method existed ran mean teacher.
    del config.consistency["method"]
    assert mean_teacher.settings(config, steps_per_epoch=3) == settings
    config.consistency.weight = 0.0
    assert mean_teacher.settings(config, steps_per_epoch=3) == ()
    assert not mean_teacher.averages_parameters(())


def test_the_step_adds_the_weighted_consistency_to_the_supervised_loss_of_the_labelled_rows():
    config = make_consistency_config()
    model = models.build_model(config.model)
    state = steps.create_train_state(config, model, steps_per_epoch=2)
    assert state.consistency[:4] == (2.0, 0, 0.0, "mean_teacher")
    # Noise and a ramp-up over 4 steps, so that the loss of step 2 sees the ramp-up at t = 1/2 and a
    # teacher that differs from the student (after update 2 it keeps half of itself).
    # The untrained model's probabilities all lie within 1e-4 of 0.5, too close for the consistency term to
    # show; a steeper output layer spreads them.
    output = {"kernel": 30 * state.params["Conv_0"]["kernel"], "bias": state.params["Conv_0"]["bias"] - 0.3}
    params = {**state.params, "Conv_0": output}
    state = state.replace(
        params=params,
        opt_state=state.tx.init(params),  # the teacher starts as these parameters
        consistency=state.consistency._replace(rampup_steps=4, noise_std=0.05),
    )
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 1), np.float32)
    masks = (rng.random((4, 32, 32, 1)) > 0.7).astype(np.float32)
    weights = np.ones((4, 32, 32, 1), np.float32)
    weights[2:] = 0.0  # two unlabelled rows: their Dice term is 0, counted in the mean over the 4 rows
    batch = {"image": images, "mask": np.concatenate([masks, weights], axis=-1)}

    def expected_loss(student_params, batch_stats, teacher_params, step):
        teacher = sigmoid64(model.apply({"params": teacher_params, "batch_stats": batch_stats}, images))
        # The student's input: the batch plus noise from the step's own stream (its dropout key, folded
        # with 1).
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), step), 1)
        noisy = images + 0.05 * np.asarray(jax.random.normal(key, images.shape, jnp.float32))
        variables = {"params": student_params, "batch_stats": batch_stats}
        student_logits, _ = model.apply(variables, noisy, train=True, mutable=["batch_stats"])
        student = sigmoid64(student_logits)
        intersection = np.sum(weights * student * masks, axis=(1, 2, 3))
        total = np.sum(weights * student, axis=(1, 2, 3)) + np.sum(weights * masks, axis=(1, 2, 3))
        supervised = 1.0 - (2.0 * intersection + 1.0) / (total + 1.0)
        rampup = np.exp(-5.0 * (1.0 - step / 4) ** 2)
        return np.mean(supervised) + 2.0 * rampup * np.mean((student - teacher) ** 2)

    first, metrics = steps.train_step(state, batch)
    # Step 0: the teacher is the student; the ramp-up exp(-5).
    assert float(metrics["loss"]) == pytest.approx(
        expected_loss(state.params, state.batch_stats, state.params, 0), rel=1e-5
    )
    second, _ = steps.train_step(first, batch)
    # After update 1 the teacher is the student; after update 2 it keeps half of itself (min(0.99, 1/2)).
    halfway = jax.tree_util.tree_map(
        lambda a, b: 0.5 * np.asarray(a) + 0.5 * np.asarray(b), first.params, second.params
    )
    for name, trained, wanted in (("first", first, first.params), ("second", second, halfway)):
        teacher_leaves = jax.tree_util.tree_leaves(mean_teacher.teacher_parameters(trained.opt_state))
        for got, want in zip(teacher_leaves, jax.tree_util.tree_leaves(wanted), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=name)
    # Step 2: the teacher is that average, not the student's parameters; the ramp-up exp(-1.25).
    _, metrics = steps.train_step(second, batch)
    expected = expected_loss(second.params, second.batch_stats, halfway, 2)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    consistency = expected - expected_loss(second.params, second.batch_stats, second.params, 2)
    assert abs(consistency) > 1e-3 * expected  # a teacher equal to the student would be seen (1.6%)


def test_a_run_started_from_another_runs_weights_starts_its_teacher_there_too():
    # model_init: the moving average is of the pretrained parameters, not of the fresh draw they replace
    # (step 1's consistency target would be a random network).
    config = make_consistency_config()
    state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    pretrained = jax.tree_util.tree_map(lambda leaf: leaf + 1, state.params)
    started = train.with_pretrained_weights(state, (pretrained, state.batch_stats, 7))
    teacher = mean_teacher.teacher_parameters(started.opt_state)
    for name, parameters in (("student", started.params), ("teacher", teacher)):
        leaves = zip(
            jax.tree_util.tree_leaves(parameters), jax.tree_util.tree_leaves(pretrained), strict=True
        )
        for leaf, expected in leaves:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)
    assert int(started.opt_state[1].count) == 0 and int(started.step) == 0


def test_without_consistency_the_state_has_no_settings_and_no_moving_average():
    config = make_tiny_config()
    state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    assert state.consistency == () and isinstance(state.opt_state, tuple)
    assert not any(isinstance(part, mean_teacher.ParameterEmaState) for part in state.opt_state)


def test_mixed_batches_hold_the_configured_share_of_unlabelled_rows_at_weight_zero():
    config = make_consistency_config()
    config.data.zoom_range = 0.0  # a zoom-out fills the borders of every channel, the weight's too, with 0
    source = datasets.load_source(config.data, "train")
    batches = list(input_pipeline.train_dataset(source, config.data, 4, seed=0, epoch=0))
    assert len(batches) == len(source) // 2  # 2 labelled rows a batch
    for batch in batches:
        weights = batch["mask"][..., 1]
        assert weights.shape == (4, 32, 32)
        assert np.all(weights[:2] == 1.0) and np.all(weights[2:] == 0.0)
        assert np.all(batch["mask"][2:, ..., 0] == 0.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data.unlabelled_fraction": 0.0}, "consistency.weight: mean teacher needs unlabelled slices"),
        ({"consistency.weight": 0.0}, "data.unlabelled_fraction: unlabelled slices train only through"),
        ({"loss": "dice"}, "loss: mean teacher's mixed batches need a weighted loss"),
        (
            {"selftrain.rounds": 1},
            "consistency.weight: mean teacher and selftrain.rounds > 0 are alternatives",
        ),
        (
            {"data.pseudo_label_dir": "x"},
            "data.pseudo_label_dir: cannot be mixed in together with mean teacher",
        ),
        ({"consistency.ema_decay": 1.0}, "consistency.ema_decay: must be a number in [0, 1), got 1.0"),
        ({"consistency.weight": -1.0}, "consistency.weight: must be a non-negative number, got -1.0"),
        ({"data.unlabelled_fraction": 0.1}, "data.unlabelled_fraction: 0.1 of a batch of 4 rounds to no"),
    ],
)
def test_bad_consistency_settings_are_refused_naming_the_key(changes, message):
    assert_refused(make_consistency_config(), changes, message)


def _crash_resume_config():
    # One epoch of 4 steps, checkpointed after each: the ramp-up, the noise draws, the teacher and the
    # data order must all carry on from a mid-epoch checkpoint.
    config = make_consistency_config(checkpoint_every_steps=1, num_epochs=1)
    config.consistency.rampup_epochs, config.consistency.noise_std = 1, 0.05
    config.eval.checkpoint = "last"
    return config


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def uninterrupted_run(tmp_path_factory):
    """One uninterrupted mean-teacher run, shared because compiling its step is most of a test's time."""
    workdir = tmp_path_factory.mktemp("mean_teacher") / "uninterrupted"
    train_to_the_end(_crash_resume_config(), workdir)
    return workdir


def test_a_run_crashed_mid_epoch_resumes_to_the_uninterrupted_runs_student_and_teacher(
    tmp_path, uninterrupted_run
):
    config = _crash_resume_config()
    reference = steps.restore_state(config, uninterrupted_run)
    resumed = train_to_the_end(config, tmp_path / "resumed", crash_after_step=2)
    assert int(resumed.step) == int(reference.step) == 4
    assert_same_training_state(resumed, reference)


def test_the_stored_train_step_is_another_for_another_decay_of_the_moving_average():
    keys = []
    for decay in (0.99, 0.999):
        config = make_consistency_config()
        config.consistency.ema_decay = decay
        state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=2)
        batch = {"image": np.zeros((4, 32, 32, 1), np.float32), "mask": np.zeros((4, 32, 32, 2), np.float32)}
        keys.append(compile_cache.train_step_key(config, state, batch, steps_per_epoch=2))
    assert keys[0] != keys[1]


def test_a_checkpoint_with_or_without_mean_teacher_is_refused_by_the_other_in_one_line(
    tmp_path, uninterrupted_run
):
    mean_teacher_config = _crash_resume_config()
    plain_config = make_consistency_config(num_epochs=1)  # the same model, without mean teacher
    plain_config.consistency.weight, plain_config.data.unlabelled_fraction = 0.0, 0.0
    # A copy: a refusal that wrote to the workdir must not spoil the shared run for the resume test.
    shutil.copytree(uninterrupted_run, tmp_path / "mt")
    train.train_and_evaluate(plain_config, tmp_path / "plain")
    for name, other, expected in (
        ("mt", plain_config, "with mean teacher, the config has none"),
        ("plain", mean_teacher_config, "without mean teacher, the config has it"),
    ):
        workdir = tmp_path / name
        for load in (steps.restore_state, train.train_and_evaluate):
            with pytest.raises(UserError, match=expected):
                load(other, workdir)
        assert not (workdir / "checkpoints" / "damaged").exists()
