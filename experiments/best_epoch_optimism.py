"""How optimistic is choosing a run's epoch by its loss on the fold it is scored on?

The ablation, lesion-size and dilation records were scored with `eval.checkpoint=best` while the validation
split was the held-out fold. The recipe's self-training teachers logged their held-out loss and Dice every
10th epoch over 300 epochs (last checkpoint scored), so their logs show what that choice buys: the held-out
Dice at the epoch of lowest held-out loss minus that at the last logged epoch, within the first 40 epochs
(the studies' budget) and over all 300. The logs' Dice is without flips, as the studies' validation was.

    python -m experiments.best_epoch_optimism experiments/results/recipe/selftrain-cv/selftrain-*cv*/teacher
"""

import argparse
import json
import pathlib

import numpy as np


def optimism(log: list[dict], horizon: int) -> float:
    """Held-out Dice at the lowest-loss validated epoch up to `horizon` minus that at the last one."""
    validated = [entry for entry in log if entry["epoch"] <= horizon and entry.get("val_loss") is not None]
    best = min(validated, key=lambda entry: entry["val_loss"])
    return best["val_dice"] - validated[-1]["val_dice"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="+", type=pathlib.Path, help="folders holding a train_log.jsonl")
    args = parser.parse_args(argv)
    logs = [
        [json.loads(line) for line in (stage / "train_log.jsonl").read_text().splitlines() if line.strip()]
        for stage in args.stages
    ]
    report = {}
    for horizon in (40, 300):
        values = [optimism(log, horizon) for log in logs]
        mean, low, high = float(np.mean(values)), float(np.min(values)), float(np.max(values))
        report[horizon] = (mean, low, high)
        print(
            f"first {horizon} epochs, {len(values)} runs: the lowest-loss epoch's held-out Dice minus the "
            f"last one's: mean {mean:+.4f} (from {low:+.4f} to {high:+.4f})"
        )
    return report


if __name__ == "__main__":
    main()
