"""Speed and accuracy of an int8 ONNX Runtime model against the float32 export, on a trained checkpoint.

The float32 export (`--mode export`, `eval.runtime=onnxruntime`) is statically quantised with ONNX
Runtime's own tool (QDQ format, per-channel int8 weights, uint8 activations calibrated on the first
`--calibration_slices` slices of the training split), then both models predict `--split` (never the
test split: this is model selection territory) and are scored with the project's metrics; the forward
passes are timed alternately, batch by batch, in one process.

    python -m experiments.onnx_int8 --config configs/rdunet.py --workdir runs/rdunet \\
        --set data.manual_dir=../shared/data/covid19-ct-seg-2d --json OUT.json

JSON: per model, ms per slice (median of `--repeats` batches of `eval.batch_size`), Dice and the other
pooled metrics on the split; the int8/float32 time ratio; the per-slice Dice difference (mean and the
largest) and the fraction of pixels whose mask changes.
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

from experiments import common
from rdunet_jax import inference, metrics, onnx_export, onnx_runtime, steps


def parse_args(argv=None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", required=True, help="a config file, optionally with :ARGUMENT")
    parser.add_argument("--workdir", required=True, help="the run folder whose checkpoint is quantised")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--split", default="validation", choices=("train", "validation"))
    parser.add_argument("--calibration_slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per model")
    parser.add_argument("--json", default="")
    return parser.parse_args(argv)


def quantized_model(float_model, calibration_images: np.ndarray, batch_size: int):
    """The int8 (QDQ) model of `float_model`, calibrated on `calibration_images`."""
    import onnx
    from onnxruntime import quantization

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            batches = [
                calibration_images[start : start + batch_size]
                for start in range(0, len(calibration_images), batch_size)
            ]
            self.batches = iter({onnx_export.INPUT_NAME: batch} for batch in batches)

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        float_path, prepared, quantized = (
            pathlib.Path(folder) / name for name in ("f.onnx", "p.onnx", "q.onnx")
        )
        onnx.save(float_model, float_path)
        # Symbolic shape inference needs sympy, which the project does not depend on; ONNX's is enough here.
        quantization.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(
            str(prepared),
            str(quantized),
            Calibration(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            # ONNX Runtime 1.32 fails adjusting per-channel weight scales for int32 biases without this.
            extra_options={"QDQDisableWeightAdjustForInt32Bias": True},
        )
        return onnx.load(quantized)


def predict_all(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [
            model.probabilities(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
    )[..., 0]


def scores(probabilities: np.ndarray, masks: np.ndarray, threshold: float) -> dict:
    tp, fp, fn, tn = metrics.confusion_counts(probabilities >= threshold, masks[..., 0] > 0.5)
    summary = metrics.summarize(tp, fp, fn, tn)
    summary["slice_dice"] = metrics.slice_metrics(tp, fp, fn)["dice"]
    return summary


def run(args) -> dict:
    config = common.load_config(args.config, args.set)
    head = config.model.get("head", "binary")
    if head != "binary":  # channel 0 is the background (exclusive) or the lungs (Ma et al.'s multilabel)
        raise SystemExit(
            f"--config: model.head={head!r}; this experiment scores a binary model's lesion mask"
        )
    network = inference.build_model(config)
    state = steps.restore_state(config, args.workdir, model=network)
    float_model = onnx_export.export_state(config, network, state)
    calibration, _ = common.first_slices(config, "train", args.calibration_slices)
    batch_size = config.eval.batch_size
    models = {
        "float32": onnx_runtime.OnnxRuntimePredictor(float_model, int(state.step)),
        "int8": onnx_runtime.OnnxRuntimePredictor(
            quantized_model(float_model, calibration, batch_size), int(state.step)
        ),
    }
    images, masks = common.first_slices(config, args.split)
    batch = images[:batch_size]
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            started = time.perf_counter()
            model.probabilities(batch)
            times[name].append(time.perf_counter() - started)
    report = {"split": args.split, "num_slices": len(images), "checkpoint_step": int(state.step)}
    probabilities = {}
    for name, model in models.items():
        probabilities[name] = predict_all(model, images, batch_size)
        summary = scores(probabilities[name], masks, config.eval.threshold)
        report[name] = {
            "ms_per_slice": 1e3 * statistics.median(times[name]) / len(batch),
            **{key: float(summary[key]) for key in ("dice", "jaccard", "precision", "recall", "global_dice")},
        }
        report[name]["slice_dice"] = summary["slice_dice"]
    report["int8_time_ratio"] = statistics.median(
        ours / theirs for ours, theirs in zip(times["int8"], times["float32"], strict=True)
    )
    dice_change = np.asarray(report["int8"].pop("slice_dice")) - np.asarray(
        report["float32"].pop("slice_dice")
    )
    threshold = config.eval.threshold
    report["slice_dice_change_mean"] = float(np.mean(dice_change))
    report["slice_dice_change_largest"] = float(np.max(np.abs(dice_change)))
    report["mask_pixels_changed"] = float(
        np.mean((probabilities["int8"] >= threshold) != (probabilities["float32"] >= threshold))
    )
    report["max_probability_difference"] = float(
        np.max(np.abs(probabilities["int8"] - probabilities["float32"]))
    )
    report["command"] = " ".join(["python", *sys.argv])
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
