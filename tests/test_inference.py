"""The inference layer: flip averaging, padded batches and their streaming, the JAX Predictor.

The flips and batching are checked on stand-in predictors against plain numpy; the JAX Predictor against
`steps.eval_step` and the model's own `apply` at the tiny config's shapes (32 px, batch 16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tiny_config, refusal

from rdunet_jax import devices, inference, models, steps
from rdunet_jax.errors import UserError


class RampPredictor(inference.Predictor):
    """A stand-in model that is not mirror-symmetric: probability = image x a ramp over rows and columns.
    Records how many batches it was given."""

    step = 5

    def __init__(self, size=32):
        rows, columns = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        self.ramp = ((1 + rows + 2 * columns) / (3 * size))[None, :, :, None].astype(np.float32)
        self.calls = 0

    def _probabilities(self, images):
        self.calls += 1
        return np.asarray(images) * self.ramp

    def _loss_and_probabilities(self, batch):
        return np.asarray(batch["mask"]).sum(axis=(1, 2, 3)), self._probabilities(batch["image"])


def _images(count=3, size=32, seed=0):
    return np.random.default_rng(seed).random((count, size, size, 1), dtype=np.float32)


def test_flips_average_the_four_mirrored_predictions_flipped_back():
    predictor, images = RampPredictor(), _images()
    ramp = predictor.ramp[0, :, :, 0]
    expected = np.stack(
        [
            np.mean(
                [
                    image * ramp,
                    (image[:, ::-1] * ramp)[:, ::-1],
                    (image[::-1, :] * ramp)[::-1, :],
                    (image[::-1, ::-1] * ramp)[::-1, ::-1],
                ],
                axis=0,
            )
            for image in images[..., 0]
        ]
    )
    mirrored = np.asarray(predictor.probabilities(images, test_time_flips=True))[..., 0]
    np.testing.assert_allclose(mirrored, expected, rtol=1e-6)
    assert predictor.calls == 4
    np.testing.assert_array_equal(predictor.probabilities(images)[..., 0], images[..., 0] * ramp)
    batch = {"image": images, "mask": np.ones_like(images)}
    loss, probabilities = predictor.loss_and_probabilities(batch, test_time_flips=True)
    np.testing.assert_array_equal(loss, [32 * 32] * 3)  # of the unflipped batch
    np.testing.assert_allclose(np.asarray(probabilities)[..., 0], expected, rtol=1e-6)


def test_jax_flips_match_eval_step_on_each_flipped_batch(tiny_state):
    images = _images(16)
    batch = {"image": images, "mask": np.zeros_like(images)}
    predictor = inference.JaxPredictor(tiny_state)
    expected = np.zeros((16, 32, 32), np.float32)
    for axes in ((), (2,), (1,), (1, 2)):
        flipped = {key: np.flip(value, axis=axes) for key, value in batch.items()}
        probabilities = np.asarray(steps.eval_step(tiny_state, flipped)["probabilities"])
        expected += np.flip(probabilities, axis=axes)[..., 0] / 4
    _, mirrored = predictor.loss_and_probabilities(batch, test_time_flips=True)
    np.testing.assert_allclose(np.asarray(mirrored)[..., 0], expected, atol=1e-6)
    dispatched = predictor.probabilities(images, test_time_flips=True)
    assert isinstance(dispatched, jnp.ndarray)  # still on the device: the caller prepares the next batch
    np.testing.assert_array_equal(np.asarray(dispatched), np.asarray(mirrored))
    plain = steps.eval_step(tiny_state, batch)
    loss, probabilities = predictor.loss_and_probabilities(batch)
    np.testing.assert_array_equal(np.asarray(probabilities), np.asarray(plain["probabilities"]))
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(plain["loss"]))
    assert predictor.step == int(tiny_state.step)


def test_a_predictor_from_variables_gives_the_models_logits_and_their_sigmoid():
    config = make_tiny_config()
    model = models.build_model(config.model)
    variables = models.initialize_variables(model, 32, seed=3)
    predictor = inference.JaxPredictor.from_variables(model, variables)
    images = _images(16)
    logits = np.asarray(predictor.logits(images))
    np.testing.assert_allclose(logits, np.asarray(model.apply(variables, images, train=False)), atol=1e-6)
    probabilities = np.asarray(predictor.probabilities(images), np.float64)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)
    assert predictor.step == 0


def test_padded_batches_have_one_shape_keep_order_and_pad_with_zeros():
    rng = np.random.default_rng(1)
    records = [
        {
            "image": rng.integers(0, 256, (40, 40), dtype=np.uint8),
            "mask": rng.integers(0, 2, (40, 40), dtype=np.uint8),
        }
        for _ in range(21)
    ]
    batches = list(inference.padded_batches(enumerate(records), 32, 16))
    assert [arrays["image"].shape for _, arrays in batches] == [(16, 32, 32, 1)] * 2
    assert [payloads for payloads, _ in batches] == [list(range(16)), list(range(16, 21))]
    assert not batches[1][1]["image"][5:].any() and not batches[1][1]["mask"][5:].any()
    # Row 4 of the second batch is record 20, resized to 32 px by PIL as training does.
    from PIL import Image

    expected = np.asarray(Image.fromarray(records[20]["image"]).resize((32, 32), Image.BILINEAR)) / 255
    np.testing.assert_allclose(batches[1][1]["image"][4, ..., 0], expected, atol=1e-6)


def test_padded_batches_window_hounsfield_units_with_the_given_window():
    record = {"image": np.full((32, 32), -400.0, np.float32), "mask": np.zeros((32, 32), np.uint8)}
    ((_, lung),) = inference.padded_batches([(0, record)], 32, 2)
    ((_, custom),) = inference.padded_batches([(0, record)], 32, 2, hu_window=(-1000.0, 0.0))
    assert lung["image"][0, 0, 0, 0] == pytest.approx((-400 + 1350) / 1500)  # W1500/L-600
    assert custom["image"][0, 0, 0, 0] == pytest.approx(0.6)


def test_predict_batches_bound_the_batches_in_flight_and_cut_the_padding():
    predictor = RampPredictor()
    records = [
        {"image": (np.ones((32, 32)) * index).astype(np.uint8), "mask": np.zeros((32, 32), np.uint8)}
        for index in range(9)
    ]
    batches = inference.predict_batches(predictor, enumerate(records), 32, 2)
    collected = [next(batches)]
    assert predictor.calls == 1 + inference.BATCHES_IN_FLIGHT  # two more dispatched before the first returns
    for batch in batches:
        # When a batch comes out, at most BATCHES_IN_FLIGHT later ones have been dispatched.
        assert predictor.calls - len(collected) - 1 <= inference.BATCHES_IN_FLIGHT
        collected.append(batch)
    assert [batch.payloads for batch in collected] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert collected[-1].outputs["probabilities"].shape == (1, 32, 32)
    np.testing.assert_allclose(
        collected[-1].outputs["probabilities"], (8 / 255) * predictor.ramp[..., 0], rtol=1e-6
    )
    assert "loss" not in collected[0].outputs
    with_loss = list(inference.predict_batches(RampPredictor(), enumerate(records), 32, 4, with_loss=True))
    assert [batch.outputs["loss"].shape for batch in with_loss] == [(4,), (4,), (1,)]


def test_device_arrays_come_back_as_numpy():
    class DevicePredictor(RampPredictor):
        def _probabilities(self, images):
            return jax.device_put(super()._probabilities(images))

    (batch,) = inference.predict_batches(
        DevicePredictor(),
        [(0, {"image": np.zeros((32, 32), np.uint8), "mask": np.zeros((32, 32), np.uint8)})],
        32,
        2,
    )
    assert type(batch.outputs["probabilities"]) is np.ndarray


def test_predict_batches_pass_the_flips_and_the_window_on():
    predictor = RampPredictor()
    image = np.random.default_rng(2).integers(0, 256, (32, 32)).astype(np.uint8)
    records = [(0, {"image": image, "mask": np.zeros((32, 32), np.uint8)})]
    (plain,) = inference.predict_batches(predictor, records, 32, 2)
    for with_loss in (False, True):
        (flipped,) = inference.predict_batches(
            predictor, records, 32, 2, test_time_flips=True, with_loss=with_loss
        )
        expected = predictor.probabilities(flipped.arrays["image"], test_time_flips=True)[:1, ..., 0]
        np.testing.assert_allclose(flipped.outputs["probabilities"], expected, rtol=1e-6)
        assert not np.allclose(flipped.outputs["probabilities"], plain.outputs["probabilities"])  # the ramp
    ct = [(0, {"image": np.full((32, 32), -975.0, np.float32), "mask": np.zeros((32, 32), np.uint8)})]
    (lung,) = inference.predict_batches(predictor, ct, 32, 2)
    (windowed,) = inference.predict_batches(predictor, ct, 32, 2, hu_window=(-975.0, 25.0))
    assert lung.arrays["image"][0, 0, 0, 0] == pytest.approx(0.25)  # (-975 + 1350) / 1500
    assert windowed.arrays["image"][0, 0, 0, 0] == 0.0


def test_padded_batches_are_float32_with_int32_labels():
    record = {"image": np.zeros((8, 8), np.uint8), "mask": np.zeros((8, 8), np.uint8)}
    record["labels"] = np.eye(8, dtype=np.uint8) * 2
    ((_, arrays),) = inference.padded_batches([(0, record)], 8, 3)
    assert {key: value.dtype for key, value in arrays.items()} == {
        "image": np.float32,
        "mask": np.float32,
        "labels": np.int32,
    }
    assert arrays["labels"].shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(arrays["labels"][0, ..., 0], np.eye(8) * 2)


def test_binary_probabilities_reuse_the_evaluation_program_and_other_heads_get_their_activation():
    config = make_tiny_config()
    model = models.build_model(config.model)
    predictor = inference.JaxPredictor.from_variables(model, models.initialize_variables(model, 32, seed=3))
    images = _images(16)
    predictor.loss_and_probabilities({"image": images, "mask": np.zeros_like(images)})
    compiled = steps.eval_step._cache_size()
    predictor.probabilities(images)
    # The same inputs as evaluation's (a zero mask): no second compilation of the whole model.
    assert steps.eval_step._cache_size() == compiled

    config.model.head = "exclusive"
    model = models.build_model(config.model, ("ggo", "consolidation"))
    variables = models.initialize_variables(model, 32, seed=3)
    predictor = inference.JaxPredictor.from_variables(model, variables, loss="dice_ce", head="exclusive")
    assert (predictor.head, predictor.state.loss) == ("exclusive", "dice_ce")
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    probabilities = np.asarray(predictor.probabilities(images))
    assert probabilities.shape == (16, 32, 32, 3)
    np.testing.assert_allclose(probabilities, softmax, atol=1e-6)


def test_build_model_validates_turns_the_cache_on_and_builds_the_heads_channels(monkeypatch, tmp_path):
    enabled = []
    monkeypatch.setattr(devices, "enable_compilation_cache", enabled.append)
    config = make_tiny_config()
    config.compilation_cache_dir = str(tmp_path / "xla")
    assert inference.build_model(config) == models.build_model(config.model)
    assert enabled == [str(tmp_path / "xla")]
    config.model.head, config.data.classes = "exclusive", ("ggo", "consolidation")
    assert inference.build_model(config) == models.build_model(config.model, ("ggo", "consolidation"))
    assert inference.build_model(config) != models.build_model(config.model)
    config.model.head = "softmax"
    with pytest.raises(UserError, match="model.head"):
        inference.build_model(config)
    # The classes are checked against the head's: an exclusive head needs the phantom's two.
    config.model.head, config.data.classes = "exclusive", ("lesion",)
    assert refusal(inference.build_model, config) == (
        "data.classes: data.name='synthetic' has 2 classes ['ggo', 'consolidation'], got ['lesion']"
    )
    # A config saved before heads existed builds the binary model.
    saved_earlier = make_tiny_config()
    del saved_earlier.model["head"]
    assert inference.build_model(saved_earlier) == models.build_model(make_tiny_config().model)
