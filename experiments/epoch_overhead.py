"""Seconds of an epoch's work besides its train steps, for a trained workdir: the validation pass (the
best-checkpoint choice) and the TensorBoard overlays (predicted again, with the config's flips), medians
of repeated calls after a warm-up that compiles:

    python -m experiments.epoch_overhead --config configs/semiseg.py --workdir runs/selftrain-cv2/teacher \\
        --set data.manual_dir=../shared/data/covid-semiseg --set data.cv_folds=5 --set data.cv_fold=2
"""

import argparse
import json
import statistics
import sys
import time

from experiments import common
from rdunet_jax import datasets, evaluate, inference, steps
from rdunet_jax.errors import UserError


def seconds_of(function, repeats: int) -> list[float]:
    function()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True, help="a trained run (its checkpoints are restored)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        config = common.load_config(args.config, args.set)
        predictor = inference.JaxPredictor(steps.restore_state(config, args.workdir))
        validation_source = datasets.load_source(config.data, "validation")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = {
        "validation_s": seconds_of(
            lambda: evaluate.evaluate_source(predictor, validation_source, config), args.repeats
        ),
        "overlays_s": seconds_of(
            lambda: evaluate.validation_overlays(predictor, validation_source, config), args.repeats
        ),
    }
    summary = {name: statistics.median(times) for name, times in result.items()}
    print(json.dumps({"median": summary, "all": result, "validation_slices": len(validation_source)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
