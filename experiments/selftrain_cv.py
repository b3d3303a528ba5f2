"""Cross-validation table of self-training runs (configs/semiseg_selftrain.py, one workdir per fold).

Each fold's workdir holds the teacher (the semiseg recipe, retrained here) and the student, both scored on
the held-out fold (metrics/validation_slices.csv). The student is paired per slice with its own teacher and
with the recipe study's record of the same fold (experiments/results/recipe/semiseg-small/), on the same
slices (another fold cut is refused); then the pooled Dice of records, teachers and students, and the paired
differences over every fold's slices:

    python -m experiments.selftrain_cv runs/selftrain-cv0 runs/selftrain-cv1 ... > table.md
"""

import argparse
import csv
import json
import pathlib
import sys

import numpy as np

from experiments.cv_table import check_same_slices, recipe_slice_dice
from experiments.studies import stats, tables
from rdunet_jax.errors import UserError


def slice_dice(csv_path: pathlib.Path) -> dict[str, float]:
    with csv_path.open() as file:
        return {row["id"]: float(row["dice"]) for row in csv.DictReader(file)}


def stage_seconds(folder: pathlib.Path) -> float:
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in lines if line.strip())


def fold_of(workdir: pathlib.Path) -> int:
    config = json.loads((workdir / "teacher" / "config.json").read_text())
    return int(config["data"]["cv_fold"])


def fold_scores(workdir: pathlib.Path, fold: int) -> dict[str, dict[str, float]]:
    """{'teacher' | 'student' | 'recipe': {slice id: Dice}} of one fold; all three on the same slices."""
    scores = {
        "teacher": slice_dice(workdir / "teacher" / "metrics" / "validation_slices.csv"),
        "student": slice_dice(workdir / "student1" / "metrics" / "validation_slices.csv"),
        "recipe": recipe_slice_dice(fold),
    }
    for stage in ("teacher", "student"):
        check_same_slices(fold, f"{workdir} ({stage})", scores[stage], scores["recipe"])
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows, pooled, workdir_of_fold = [], {"teacher": {}, "student": {}, "recipe": {}}, {}
    try:
        for workdir in args.workdirs:
            if not (workdir / "student1" / "metrics" / "validation_slices.csv").is_file():
                print(f"(skipped {workdir}: no finished student)", file=sys.stderr)
                continue
            fold = fold_of(workdir)
            if fold in workdir_of_fold:
                raise UserError(f"{workdir}: fold {fold} again (also in {workdir_of_fold[fold]})")
            workdir_of_fold[fold] = workdir
            scores = fold_scores(workdir, fold)
            for name, values in scores.items():
                pooled[name].update({key: [value] for key, value in values.items()})
            means = {name: float(np.mean(list(values.values()))) for name, values in scores.items()}
            seconds = {stage: stage_seconds(workdir / stage) for stage in ("teacher", "student1")}
            rows.append((fold, means, seconds))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lines = [
        "| fold | recipe record | teacher (recipe, retrained) | student | student - teacher"
        " | student - record | training min (teacher + student) |",
        "|---|---|---|---|---|---|---|",
    ]
    for fold, means, seconds in sorted(rows, key=lambda row: row[0]):
        lines.append(
            f"| {fold} | {means['recipe']:.3f} | {means['teacher']:.3f} | {means['student']:.3f} | "
            f"{means['student'] - means['teacher']:+.3f} | {means['student'] - means['recipe']:+.3f} | "
            f"{seconds['teacher'] / 60:.0f} + {seconds['student1'] / 60:.0f} |"
        )
    lines += [
        "",
        "| model | Dice, slices pooled [95% bootstrap] | per fold [95% t over folds] |",
        "|---|---|---|",
    ]
    for name, label in (("recipe", "recipe record"), ("teacher", "teachers"), ("student", "students")):
        fold_means = [means[name] for _, means, _ in rows]
        slices = [value for values in pooled[name].values() for value in values]
        lines.append(
            f"| {label} | {tables.format_interval(stats.bootstrap_interval(slices))} "
            f"| {tables.format_interval(stats.t_interval(fold_means))} |"
        )
    for compared, reference in (("student", "teacher"), ("student", "recipe"), ("teacher", "recipe")):
        differences = stats.paired_slice_differences(pooled[reference], pooled[compared])
        interval = stats.bootstrap_interval(differences, num_resamples=tables.BOOTSTRAP_RESAMPLES)
        lines.append(
            f"\n{compared.capitalize()} - {reference}, per slice over {len(differences)} held-out slices: "
            f"{tables.format_interval(interval, 4)} (95% bootstrap)"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
