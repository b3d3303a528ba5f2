"""Cross-validation table of self-training runs (configs/semiseg_selftrain.py, one workdir per fold).

Each fold's workdir holds the teacher (the semiseg recipe, retrained here) and the student, both scored on
the held-out fold (metrics/validation_slices.csv). The student is paired per slice with its own teacher and
with the recipe study's record of the same fold (experiments/results/recipe/semiseg-small/):

    python -m experiments.selftrain_cv runs/selftrain-cv0 runs/selftrain-cv1 ... > table.md
"""

import argparse
import csv
import json
import pathlib
import sys

from experiments.cv_table import recipe_slice_dice
from experiments.studies import stats, tables


def slice_dice(csv_path: pathlib.Path) -> dict[str, float]:
    with csv_path.open() as file:
        return {row["id"]: float(row["dice"]) for row in csv.DictReader(file)}


def stage_seconds(folder: pathlib.Path) -> float:
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in lines if line.strip())


def fold_of(workdir: pathlib.Path) -> int:
    config = json.loads((workdir / "teacher" / "config.json").read_text())
    return int(config["data"]["cv_fold"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows, pooled = [], {"teacher": {}, "student": {}, "recipe": {}}
    for workdir in args.workdirs:
        student_csv = workdir / "student1" / "metrics" / "validation_slices.csv"
        if not student_csv.is_file():
            print(f"(skipped {workdir}: no finished student)", file=sys.stderr)
            continue
        fold = fold_of(workdir)
        scores = {
            "teacher": slice_dice(workdir / "teacher" / "metrics" / "validation_slices.csv"),
            "student": slice_dice(student_csv),
            "recipe": recipe_slice_dice(fold),
        }
        for name, values in scores.items():
            pooled[name].update({key: [value] for key, value in values.items()})
        means = {name: sum(values.values()) / len(values) for name, values in scores.items()}
        seconds = {stage: stage_seconds(workdir / stage) for stage in ("teacher", "student1")}
        rows.append((fold, means, seconds))
    lines = [
        "| fold | recipe record | teacher (recipe, retrained) | student | student - teacher"
        " | student - record | training min (teacher + student) |",
        "|---|---|---|---|---|---|---|",
    ]
    for fold, means, seconds in rows:
        lines.append(
            f"| {fold} | {means['recipe']:.3f} | {means['teacher']:.3f} | {means['student']:.3f} | "
            f"{means['student'] - means['teacher']:+.3f} | {means['student'] - means['recipe']:+.3f} | "
            f"{seconds['teacher'] / 60:.0f} + {seconds['student1'] / 60:.0f} |"
        )
    for reference in ("teacher", "recipe"):
        differences = stats.paired_slice_differences(pooled[reference], pooled["student"])
        interval = stats.bootstrap_interval(differences, num_resamples=tables.BOOTSTRAP_RESAMPLES)
        lines.append(
            f"\nStudent - {reference}, per slice over {len(differences)} held-out slices: "
            f"{tables.format_interval(interval, 4)} (95% bootstrap)"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
