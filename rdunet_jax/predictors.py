"""The Predictor a config's `eval.runtime` asks for: above both backends, so that inference.py (the base
class and JAX) and onnx_runtime.py (a subclass) import one way."""

from rdunet_jax import inference


def for_config(config, model, state) -> inference.Predictor:
    """The Predictor that `eval.runtime` asks for: `state` in JAX, or exported from `model` and `state` into
    ONNX Runtime ('onnxruntime')."""
    if config.eval.runtime == "onnxruntime":
        # Imported only when asked for: the ONNX path is the optional `onnx` extra.
        from rdunet_jax import onnx_export, onnx_runtime

        onnx_export.note_float32_export(
            config, "; --config.eval.runtime=jax scores the model as training validated it"
        )
        return onnx_runtime.OnnxRuntimePredictor.from_state(config, model, state)
    return inference.JaxPredictor(state)
