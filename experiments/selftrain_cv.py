"""Cross-validation table of self-training runs (configs/semiseg_selftrain.py, one workdir per fold).

Each fold's workdir holds the teacher (the semiseg recipe, retrained here) and the student, both scored on
the held-out fold (metrics/validation_slices.csv). The student is paired per slice with its own teacher and
with the recipe study's record of the same fold (experiments/results/recipe/semiseg-small/), on the same
slices (another fold cut is refused); then the pooled Dice of records, teachers and students, and the paired
differences over every fold's slices:

    python -m experiments.selftrain_cv runs/selftrain-cv0 runs/selftrain-cv1 ... > table.md

`--ensemble` adds the teacher and the student together as a fourth model (the mean of their probabilities
from their last checkpoints with flip TTA, thresholded at `eval.threshold`, as each stage was scored: a
stage scored otherwise is refused; the checkpoints must be in the workdirs), paired with each of the others;
`--slices_csv FILE` writes every held-out slice's Dice of each model (fold, id, one column a model), so the
pooled and paired figures can be derived again once the checkpoints are gone.
"""

import argparse
import csv
import json
import pathlib
import sys

import ml_collections
import numpy as np

from experiments import ensemble_cv
from experiments.cv_table import check_same_slices, check_scored_as_the_record, recipe_slice_dice
from experiments.studies import stats, tables
from rdunet_jax.errors import UserError


def _read(path: pathlib.Path) -> str:
    """The text of `path`; a UserError naming it when it is missing (a record copied without it)."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    return path.read_text()


def slice_dice(csv_path: pathlib.Path) -> dict[str, float]:
    """{slice id: Dice} of a stage's per-slice metrics CSV."""
    return {row["id"]: float(row["dice"]) for row in csv.DictReader(_read(csv_path).splitlines())}


def _train_log(folder: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in _read(folder / "train_log.jsonl").splitlines() if line.strip()]


def stage_seconds(folder: pathlib.Path) -> float:
    """The training time of a stage: its logged epochs' seconds."""
    return sum(entry["seconds"] for entry in _train_log(folder))


def fold_of(workdir: pathlib.Path) -> int:
    """The cross-validation fold the workdir's teacher was trained without."""
    return int(json.loads(_read(workdir / "teacher" / "config.json"))["data"]["cv_fold"])


def final_student(workdir: pathlib.Path) -> str:
    """The folder name of the last round's student: 'student1' after one round, 'student2' after two."""
    suffixes = (path.name[len("student") :] for path in workdir.glob("student[0-9]*"))
    rounds = [int(suffix) for suffix in suffixes if suffix.isdigit()]
    return f"student{max(rounds, default=1)}"


def scored_to_the_end(folder: pathlib.Path) -> bool:
    """Whether the stage in `folder` trained to its config's last epoch and was scored on the validation
    split: an evaluation of a half-trained run writes its metrics too."""
    if not (folder / "metrics" / "validation_slices.csv").is_file() or not (folder / "config.json").is_file():
        return False
    log = _train_log(folder) if (folder / "train_log.jsonl").is_file() else []
    return bool(log) and log[-1]["epoch"] == json.loads(_read(folder / "config.json"))["num_epochs"]


def ensemble_dice(workdir: pathlib.Path) -> dict[str, float]:
    """{slice id: Dice} of the teacher's and the student's mean probability on the held-out fold."""
    configs = {}
    student = final_student(workdir)
    for stage in ("teacher", student):
        if not (workdir / stage / "checkpoints" / "latest").is_dir():
            raise UserError(f"{workdir / stage}: no checkpoint to ensemble (kept only where the run ran)")
        configs[stage] = ml_collections.ConfigDict(json.loads(_read(workdir / stage / "config.json")))
        scoring = configs[stage].eval
        # fold_predictions mirrors every slice; a stage scored without the flips would not pair fairly.
        if not scoring.test_time_flips or scoring.checkpoint != "last":
            raise UserError(
                f"{workdir / stage}: scored with eval.test_time_flips={scoring.test_time_flips}, "
                f"eval.checkpoint={scoring.checkpoint!r}; the ensemble is scored with flips and the last"
            )
    threshold = configs["teacher"].eval.threshold
    if configs[student].eval.threshold != threshold:
        raise UserError(
            f"{workdir}: the teacher and the student are thresholded differently (eval.threshold)"
        )
    (ids, teacher, masks), (student_ids, student, _) = (
        ensemble_cv.fold_predictions(config, workdir / stage) for stage, config in configs.items()
    )
    if ids != student_ids:
        raise UserError(f"{workdir}: the teacher and the student scored other slices")
    dice = ensemble_cv.ensemble_slice_dice([teacher, student], masks, threshold)
    return dict(zip(ids, (float(value) for value in dice), strict=True))


def fold_scores(workdir: pathlib.Path, fold: int, ensemble: bool = False) -> dict[str, dict[str, float]]:
    """{'teacher' | 'student' | 'recipe' (| 'ensemble'): {slice id: Dice}} of one fold, on the same slices."""
    scores = {
        "teacher": slice_dice(workdir / "teacher" / "metrics" / "validation_slices.csv"),
        "student": slice_dice(workdir / final_student(workdir) / "metrics" / "validation_slices.csv"),
        "recipe": recipe_slice_dice(fold),
    }
    if ensemble:
        scores["ensemble"] = ensemble_dice(workdir)
    for stage in (name for name in scores if name != "recipe"):
        check_same_slices(fold, f"{workdir} ({stage})", scores[stage], scores["recipe"])
    for stage in ("teacher", final_student(workdir)):
        check_scored_as_the_record(
            fold, f"{workdir / stage}", json.loads(_read(workdir / stage / "config.json"))
        )
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--ensemble", action="store_true", help="also the teacher and student together")
    parser.add_argument("--slices_csv", type=pathlib.Path, help="write each held-out slice's Dice here")
    args = parser.parse_args(argv)
    names = ["recipe", "teacher", "student"] + (["ensemble"] if args.ensemble else [])
    rows, pooled, workdir_of_fold = [], {name: {} for name in names}, {}
    try:
        for workdir in args.workdirs:
            student = final_student(workdir)
            if not scored_to_the_end(workdir / student):
                print(
                    f"(skipped {workdir}: {student} not trained to its last epoch and scored on the "
                    "validation split)",
                    file=sys.stderr,
                )
                continue
            fold = fold_of(workdir)
            if fold in workdir_of_fold:
                raise UserError(f"{workdir}: fold {fold} again (also in {workdir_of_fold[fold]})")
            workdir_of_fold[fold] = workdir
            scores = fold_scores(workdir, fold, args.ensemble)
            for name, values in scores.items():
                pooled[name].update({key: [value] for key, value in values.items()})
            means = {name: float(np.mean(list(values.values()))) for name, values in scores.items()}
            seconds = {
                "teacher": stage_seconds(workdir / "teacher"),
                "student": stage_seconds(workdir / student),
            }
            rows.append((fold, means, seconds))
        if not rows:
            raise UserError("no workdir holds a student trained to its last epoch and scored on validation")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ensemble_header = " teacher + student |" if args.ensemble else ""
    lines = [
        "| fold | recipe record | teacher (recipe, retrained) | student |"
        + ensemble_header
        + " student - teacher"
        " | student - record | training min (teacher + student) |",
        "|---|---|---|---|" + "---|" * args.ensemble + "---|---|---|",
    ]
    for fold, means, seconds in sorted(rows, key=lambda row: row[0]):
        ensemble_cell = f" {means['ensemble']:.3f} |" if args.ensemble else ""
        lines.append(
            f"| {fold} | {means['recipe']:.3f} | {means['teacher']:.3f} | {means['student']:.3f} |"
            f"{ensemble_cell} "
            f"{means['student'] - means['teacher']:+.3f} | {means['student'] - means['recipe']:+.3f} | "
            f"{seconds['teacher'] / 60:.0f} + {seconds['student'] / 60:.0f} |"
        )
    lines += [
        "",
        "| model | Dice, slices pooled [95% bootstrap] | per fold [95% t over folds] |",
        "|---|---|---|",
    ]
    labels = {
        "recipe": "recipe record",
        "teacher": "teachers",
        "student": "students",
        "ensemble": "teacher + student",
    }
    for name, label in ((name, labels[name]) for name in names):
        fold_means = [means[name] for _, means, _ in rows]
        slices = [value for values in pooled[name].values() for value in values]
        lines.append(
            f"| {label} | {tables.format_interval(stats.bootstrap_interval(slices))} "
            f"| {tables.format_interval(stats.t_interval(fold_means))} |"
        )
    comparisons = [("student", "teacher"), ("student", "recipe"), ("teacher", "recipe")]
    if args.ensemble:
        comparisons += [("ensemble", "student"), ("ensemble", "teacher"), ("ensemble", "recipe")]
    compared_labels = {"ensemble": "Teacher + student"}
    for compared, reference in comparisons:
        differences = stats.paired_slice_differences(pooled[reference], pooled[compared])
        interval = stats.bootstrap_interval(differences, num_resamples=tables.BOOTSTRAP_RESAMPLES)
        compared_label = compared_labels.get(compared, compared.capitalize())
        lines.append(
            f"\n{compared_label} - {reference}, per slice over {len(differences)} held-out slices: "
            f"{tables.format_interval(interval, 4)} (95% bootstrap)"
        )
    print("\n".join(lines))
    if args.slices_csv:
        write_slices_csv(
            args.slices_csv, pooled, {fold: workdir for fold, workdir in workdir_of_fold.items()}
        )
    return 0


def write_slices_csv(path: pathlib.Path, pooled: dict, workdir_of_fold: dict) -> None:
    """fold, id and each model's Dice of every held-out slice, by fold and id."""
    names = list(pooled)
    fold_of_slice = {}
    for fold, workdir in workdir_of_fold.items():
        for slice_id in slice_dice(workdir / "teacher" / "metrics" / "validation_slices.csv"):
            fold_of_slice[slice_id] = fold
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["fold", "id", *names])
        for slice_id in sorted(pooled["teacher"], key=lambda key: (fold_of_slice[key], key)):
            writer.writerow(
                [fold_of_slice[slice_id], slice_id, *(f"{pooled[name][slice_id][0]:.6f}" for name in names)]
            )


if __name__ == "__main__":
    sys.exit(main())
