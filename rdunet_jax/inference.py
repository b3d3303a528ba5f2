"""The inference layer: a Predictor runs a trained model on batches of images, in JAX or in ONNX Runtime.

Evaluation and prediction receive a Predictor and never see the trainer (big_vision's evaluators take a
predict function the same way). What both need exists here once: test-time flip averaging, and the
fixed-shape, zero-padded batches (so nothing compiles a second shape) streamed with a few batches in
flight. The sigmoid belongs to each backend's compiled program: `steps.eval_step` in JAX, the exported
graph's `probabilities` output in ONNX Runtime (onnx_runtime.py).
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import config_validation, devices, input_pipeline, models, steps
from rdunet_jax.datasets import labels as class_labels

# nnU-Net's mirroring in 2-D: none, left-right, up-down, both (axes of an NHWC batch).
TEST_TIME_FLIPS = ((), (2,), (1,), (1, 2))
# Batches dispatched but not yet collected: enough to overlap preparing, computing and collecting, few
# enough to bound memory.
BATCHES_IN_FLIGHT = 2


class Predictor:
    """A trained model's forward pass in evaluation mode (running BatchNorm statistics), for NHWC float32
    images (N, S, S, 1) in [0, 1] preprocessed as in training.

    Attributes: `step`, the checkpoint step the model comes from; `head`, its `model.head` (probabilities
    have one channel per output of the head). Backends implement `logits(images)`,
    `_probabilities(images)` and `_loss_and_probabilities(batch)`; each may return device arrays still
    being computed (JAX dispatches asynchronously) or numpy arrays.
    """

    step: int
    head: str = "binary"

    def logits(self, images):
        """The model's logits (N, S, S, C) of `images` (C = 1 for the binary head)."""
        raise NotImplementedError

    def _probabilities(self, images):
        raise NotImplementedError

    def _loss_and_probabilities(self, batch: dict):
        raise NotImplementedError

    def probabilities(self, images, test_time_flips: bool = False):
        """Probabilities (N, S, S, C) of `images` (lesion for the binary head, C = 1); with
        `test_time_flips`, their mean over
        TEST_TIME_FLIPS, each flipped back."""
        probabilities = self._probabilities(images)
        return self._mirrored(images, probabilities) if test_time_flips else probabilities

    def loss_and_probabilities(self, batch: dict, test_time_flips: bool = False):
        """(per-image loss (N,) of the trained loss against batch['mask'] (batch['labels'] for the
        multi-class heads), probabilities (N, S, S, C)) of batch['image']; the loss is that of the
        unflipped images."""
        loss, probabilities = self._loss_and_probabilities(batch)
        if test_time_flips:
            probabilities = self._mirrored(batch["image"], probabilities)
        return loss, probabilities

    def _mirrored(self, images, probabilities):
        """The mean of `probabilities` (the unflipped images') and those of the flipped images."""
        for axes in TEST_TIME_FLIPS[1:]:
            flipped = self._probabilities(jnp.flip(images, axis=axes))
            probabilities = probabilities + jnp.flip(flipped, axis=axes)
        return probabilities / len(TEST_TIME_FLIPS)


class JaxPredictor(Predictor):
    """A Predictor in JAX: XLA runs `steps.eval_step`, compiled once per batch shape.

    Args: `state`, a `steps.TrainState` (or any state with apply_fn, params, batch_stats, loss and step).
    """

    def __init__(self, state):
        self.state = state
        self.step = int(state.step)
        self.head = state.head

    @classmethod
    def from_variables(
        cls, model, variables: dict, loss: str = "dice", step: int = 0, head: str = "binary"
    ) -> "JaxPredictor":
        """A Predictor of `model` with `variables` ({'params', 'batch_stats'}), for benchmarks and tests
        that have no train state; `loss` names the eval loss (a key of `losses.LOSSES_BY_HEAD[head]`)."""
        state = steps.TrainState(
            step=step,
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=None,
            opt_state=None,
            dropout_key=None,
            loss=loss,
            head=head,
        )
        return cls(state)

    def logits(self, images):
        return _eval_logits(self.state, images)

    def _probabilities(self, images):
        if self.head != "binary":  # no labels: the step computes no loss
            return steps.eval_step(self.state, {"image": images})["probabilities"]
        return steps.eval_step(self.state, {"image": images, "mask": np.zeros(np.shape(images), np.float32)})[
            "probabilities"
        ]

    def _loss_and_probabilities(self, batch: dict):
        outputs = steps.eval_step(self.state, batch)
        return outputs["loss"], outputs["probabilities"]


@jax.jit
def _eval_logits(state, images):
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)


def build_model(config):
    """Validates `config`, turns on its compilation cache and builds its model: what evaluation, prediction
    and export start from."""
    config_validation.validate(config)
    classes = class_labels.check_classes(config.data, config.model.get("head", "binary"))
    devices.enable_compilation_cache(config.compilation_cache_dir)
    return models.build_model(config.model, classes)


@dataclasses.dataclass
class Batch:
    """One padded batch: the payloads of its real rows, the preprocessed arrays (`image`, `mask`, each
    (batch_size, S, S, 1), and `labels` (batch_size, S, S, C) when the records carry class labels) and the
    model's outputs for the real rows, as numpy: `probabilities` (n, S, S) for the binary head, (n, S, S, C)
    for the others, and, when asked for, `loss` (n,)."""

    payloads: list
    arrays: dict
    outputs: dict


def padded_batches(examples, image_size: int, batch_size: int, hu_window=None):
    """Yields (payloads, {'image', 'mask'}) for an iterable of (payload, record): records preprocessed as
    in training (`input_pipeline.preprocess` with `hu_window`), `batch_size` rows, the last zero-padded."""
    payloads, arrays = [], None
    for payload, record in examples:
        if arrays is None:
            arrays = {
                key: np.zeros((batch_size, image_size, image_size, 1), np.float32)
                for key in ("image", "mask")
            }
        example = input_pipeline.preprocess(record, image_size, hu_window)
        if "labels" in example and "labels" not in arrays:
            arrays["labels"] = np.zeros((batch_size, *example["labels"].shape), np.int32)
        for key in arrays:
            arrays[key][len(payloads)] = example[key]
        payloads.append(payload)
        if len(payloads) == batch_size:
            yield payloads, arrays
            payloads, arrays = [], None
    if payloads:
        yield payloads, arrays


def predict_batches(
    predictor: Predictor,
    examples,
    image_size: int,
    batch_size: int,
    test_time_flips: bool = False,
    hu_window=None,
    with_loss: bool = False,
):
    """Yields a `Batch` per padded batch of `examples` ((payload, record) pairs), in order; at most
    BATCHES_IN_FLIGHT batches wait on the predictor while the next is prepared."""
    in_flight = collections.deque()

    def collect_oldest() -> Batch:
        payloads, arrays, pending = in_flight.popleft()
        count = len(payloads)
        outputs = {key: np.asarray(value)[:count] for key, value in jax.device_get(pending).items()}
        if predictor.head == "binary":
            outputs["probabilities"] = outputs["probabilities"][..., 0]
        return Batch(payloads, arrays, outputs)

    for payloads, arrays in padded_batches(examples, image_size, batch_size, hu_window):
        if with_loss:
            loss, probabilities = predictor.loss_and_probabilities(arrays, test_time_flips)
            pending = {"loss": loss, "probabilities": probabilities}
        else:
            pending = {"probabilities": predictor.probabilities(arrays["image"], test_time_flips)}
        in_flight.append((payloads, arrays, pending))
        if len(in_flight) > BATCHES_IN_FLIGHT:
            yield collect_oldest()
    while in_flight:
        yield collect_oldest()
