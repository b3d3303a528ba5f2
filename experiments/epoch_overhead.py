"""Seconds of an epoch's work besides its train steps, for a trained workdir: the validation pass (the
best-checkpoint choice) and the TensorBoard overlays (predicted again, with the config's flips), medians
of repeated calls after a warm-up that compiles:

    python -m experiments.epoch_overhead --config configs/semiseg.py --workdir runs/selftrain-cv2/teacher \\
        --set data.manual_dir=../shared/data/covid-semiseg --set data.cv_folds=5 --set data.cv_fold=2
"""

import argparse
import json
import sys

from experiments import common
from rdunet_jax import datasets, evaluate, inference, steps
from rdunet_jax.errors import UserError


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
    # One untimed call compiles each; the validation pass is what every epoch runs, the overlays what
    # TensorBoard's images cost on top.
    timed = {
        "validation_s": lambda: evaluate.evaluate_source(predictor, validation_source, config),
        "overlays_s": lambda: evaluate.validation_overlays(predictor, validation_source, config),
    }
    result = {name: common.median_seconds(call, args.repeats, warmup=1) for name, call in timed.items()}
    print(
        json.dumps(
            {
                "median": {name: median for name, (median, _) in result.items()},
                "all": {name: times for name, (_, times) in result.items()},
                "validation_slices": len(validation_source),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
