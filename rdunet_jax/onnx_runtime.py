"""The ONNX export of a model in an ONNX Runtime session, as a Predictor (`eval.runtime='onnxruntime'`):
the fastest CPU inference we measured, for evaluation and prediction (training always runs in JAX)."""

import jax.numpy as jnp
import numpy as np

from rdunet_jax import inference, losses, onnx_export, steps
from rdunet_jax.errors import UserError


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError(
            "eval.runtime='onnxruntime' needs the onnxruntime package: pip install -e '.[onnx]'"
        ) from error
    return onnxruntime


class OnnxRuntimePredictor(inference.Predictor):
    """An exported model (`onnx_export.export_model`) in a CPU ONNX Runtime session.

    Args: `onnx_model`, the ONNX ModelProto; `step`, its checkpoint step; `loss`, the trained loss's name
    (a key of `losses.LOSSES_BY_HEAD[head]`) for evaluation losses; `threads`, ONNX Runtime's intra-op
    threads (0: one per physical core); `head`, the model's `model.head`.
    """

    def __init__(self, onnx_model, step: int, loss: str = "dice", threads: int = 0, head: str = "binary"):
        onnxruntime = _onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only; ONNX Runtime warns about every unused initializer
        self.session = onnxruntime.InferenceSession(
            onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.step, self.loss, self.head = step, loss, head

    @classmethod
    def from_state(cls, config, model, state) -> "OnnxRuntimePredictor":
        """`state` (of `model`, built from `config.model`) exported and loaded into ONNX Runtime."""
        return cls(
            onnx_export.export_state(config, model, state), int(state.step), state.loss, head=state.head
        )

    def _run(self, names, images) -> list:
        return self.session.run(
            list(names), {onnx_export.INPUT_NAME: np.ascontiguousarray(images, np.float32)}
        )

    def logits(self, images) -> np.ndarray:
        return self._run(onnx_export.OUTPUT_NAMES[:1], images)[0]

    def _probabilities(self, images) -> np.ndarray:
        return self._run(onnx_export.OUTPUT_NAMES[1:], images)[0]

    def _loss_and_probabilities(self, batch: dict):
        logits, probabilities = self._run(onnx_export.OUTPUT_NAMES, batch["image"])
        target = jnp.asarray(steps.loss_target(batch, self.head))
        loss = np.asarray(losses.LOSSES_BY_HEAD[self.head][self.loss](jnp.asarray(logits), target))
        return loss, probabilities
