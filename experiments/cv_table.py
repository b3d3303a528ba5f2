"""Cross-validation table of recipe candidates: Dice per class (and of the binary mask) with intervals.

Reads workdirs named `<candidate>-cv<fold>` (gpu_session.sh's `cv` phase; experiments/*_cv_runs.txt),
each scored on its held-out fold: metrics/validation_slices.csv (the binary, or any-lesion, mask) and, with
a multi-class head, metrics/validation_classes.csv (a row per slice and class). For each candidate and
class: the mean Dice over every slice holding the class (all folds pooled) with a 95% bootstrap interval
over those slices, the fold means with a t-interval over folds, and each candidate's per-slice paired
difference from the reference candidate, or from the recipe study's record of the same folds
(`--reference recipe-record`: experiments/results/recipe/semiseg-small/, the binary recipe's per-slice Dice,
for candidates trained on the binary masks, such as mean teacher). Each row names the candidate's category
(issue #27), read from its config.json: labelled only, plus unlabelled (pseudo-labels, consistency, or a
start pretrained on the pool) or plus other labelled data (joint training, or a start pretrained on
another dataset):

    python -m experiments.cv_table runs/cv --reference dice_ce > table.md
    python -m experiments.cv_table runs/cv --reference recipe-record > table.md
    python -m experiments.cv_table runs/cv --reference selftrain/teacher > table.md  # stages: <run>/<stage>

`--draws NAME=A,B` adds candidate NAME, the runs of A and B (say one recipe with two seeds) averaged per
slice, to pair as any other (it may be the reference).
"""

import argparse
import collections
import csv
import json
import pathlib
import re
import sys

import numpy as np

from experiments.studies import stats, tables
from rdunet_jax.errors import UserError

WORKDIR_NAME = re.compile(r"(?P<candidate>.+)-cv(?P<fold>\d+)$")
RECIPE_RECORDS = pathlib.Path(__file__).resolve().parent / "results" / "recipe" / "semiseg-small"
RECIPE_ARM = "r128_e300_dropout0_decay150"
RECIPE_RECORD = "recipe-record"
LABELLED_ONLY = "labelled only"
PLUS_UNLABELLED = "plus unlabelled"
PLUS_OTHER_LABELLED = "plus other labelled data"


def data_category(config: dict, root: pathlib.Path, run_dir: pathlib.Path | None = None) -> str:
    """What a run learned from besides its dataset's labelled slices (issue #27's categories), from its
    config; a pretrained start (`model_init`) counts as what its pretraining saw."""
    data = config.get("data", {})
    categories = []
    if data.get("extra_labelled_dir") and data.get("extra_fraction", 0) > 0:
        categories.append(PLUS_OTHER_LABELLED)
    pseudo_labels = data.get("pseudo_label_dir") and data.get("pseudo_fraction", 0) > 0
    consistency = (
        config.get("consistency", {}).get("weight", 0) > 0 and data.get("unlabelled_fraction", 0) > 0
    )
    if pseudo_labels or consistency:
        categories.append(PLUS_UNLABELLED)
    if config.get("model_init"):
        init = pathlib.Path(config["model_init"])
        # A start's category may itself be several ("... and ..."), some of them this run's own.
        categories += pretraining_category(init, data.get("name"), root, run_dir).split(" and ")
    categories = sorted(set(categories) - {LABELLED_ONLY})
    return " and ".join(categories) if categories else LABELLED_ONLY


def pretraining_category(
    init: pathlib.Path, dataset: str, root: pathlib.Path, run_dir: pathlib.Path | None = None
) -> str:
    """The category of a `model_init` workdir, found where it was or, as kept in experiments/results, beside
    the runs (`<root>/<its name>`: a candidate fine-tuned further) or in `<root>/pretraining/<its name>`:
    restoration of the pool (experiments/restoration_pretraining.py writes pretraining.json) is plus
    unlabelled; supervised training on another dataset is plus other labelled. A self-training student's
    start, its own teacher (or the student before it), is first looked for beside the student (`run_dir`, a
    stage of a workdir under `root`): the copy kept with it, whatever the workdir was called where it ran."""
    beside = [run_dir.parent / init.name] if run_dir is not None and run_dir.parent != root else []
    for folder in (*beside, init, root / init.name, root / "pretraining" / init.name):
        if (folder / "pretraining.json").is_file():
            return PLUS_UNLABELLED
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            if config.get("data", {}).get("name") != dataset:
                return PLUS_OTHER_LABELLED
            return data_category(config, root, folder)
    return f"pretrained ({init.name}: its data unknown)"


def _recipe_record(fold: int) -> dict:
    """The recipe study's record of `fold` (configs/semiseg.py, seed 0)."""
    path = RECIPE_RECORDS / f"{RECIPE_ARM}-fold{fold}-seed0.json"
    if not path.is_file():
        raise UserError(f"{path}: no record of the recipe for fold {fold} (the study ran folds 0-4 of 5)")
    return json.loads(path.read_text())


def recipe_slice_dice(fold: int) -> dict[str, float]:
    """{slice id: Dice} of the recipe study's record of `fold`."""
    slices = _recipe_record(fold)["slices"]
    return dict(zip(slices["id"], slices["dice"], strict=True))


# How a run was scored, which must be the record's for a per-slice pairing to compare like with like: Dice at
# another model resolution, without the flips, at another threshold or checkpoint is another measurement.
SCORING_KEYS = (
    ("data", "image_size"),
    ("eval", "test_time_flips"),
    ("eval", "checkpoint"),
    ("eval", "threshold"),
)


def check_scored_as_the_record(fold: int, name: str, config: dict) -> None:
    """A run paired with the recipe's record of `fold` must have been scored as the record was."""
    record = _recipe_record(fold)["config"]
    differing = [
        f"{group}.{key}={config.get(group, {}).get(key)!r} (the record's {record[group][key]!r})"
        for group, key in SCORING_KEYS
        if config.get(group, {}).get(key) != record[group][key]
    ]
    if differing:
        raise UserError(
            f"{name}, fold {fold}: scored otherwise than the recipe's record: {', '.join(differing)}"
        )


def check_same_slices(fold: int, name: str, slice_dice: dict, record: dict) -> None:
    """A run paired with the record must have scored the record's slices: another `data.cv_seed` or fold
    count cuts other folds, and pairing only the shared ids would hide that."""
    if set(slice_dice) != set(record):
        raise UserError(
            f"{name}, fold {fold}: scored {len(slice_dice)} slices, the recipe's record {len(record)}, "
            f"{len(set(slice_dice) ^ set(record))} not in both (another data.cv_seed or data.cv_folds?)"
        )


def with_recipe_record(runs: dict) -> dict:
    """`runs` plus the recipe study's record of every fold a candidate holds, as candidate 'recipe-record'.
    The record is of the binary recipe: multi-class candidates are refused."""
    record_by_fold = {}
    for candidate, folds in runs.items():
        for fold, run in folds.items():
            if run["per_class"]:
                raise UserError(f"{candidate}: multi-class; the recipe's record scores the lesion mask only")
            record_by_fold.setdefault(fold, recipe_slice_dice(fold))
            check_same_slices(fold, f"{candidate}-cv{fold}", run["any lesion"], record_by_fold[fold])
            if run.get("config") is not None:  # a run kept without its config.json: category "unknown"
                check_scored_as_the_record(fold, f"{candidate}-cv{fold}", run["config"])
    record_runs = {
        fold: {
            "per_class": {},
            "any lesion": slices,
            "category": LABELLED_ONLY,
            "epochs": 0,
            "seconds": float("nan"),
        }
        for fold, slices in sorted(record_by_fold.items())
    }
    return {RECIPE_RECORD: record_runs, **runs}


def read_run(workdir: pathlib.Path, root: pathlib.Path) -> dict:
    """A finished run's per-slice Dice per class (slices holding the class; none for a binary head), of its
    binary (any-lesion) mask, its training time and its category (`data_category`)."""
    per_class = collections.defaultdict(dict)
    classes_path = workdir / "metrics" / "validation_classes.csv"  # multi-class heads only
    if classes_path.exists():
        with classes_path.open() as file:
            for row in csv.DictReader(file):
                if row["present"] == "1":
                    per_class[row["class"]][row["id"]] = float(row["dice"])
    with (workdir / "metrics" / "validation_slices.csv").open() as file:
        any_lesion = {row["id"]: float(row["dice"]) for row in csv.DictReader(file)}
    log_path = workdir / "train_log.jsonl"  # absent from some copies kept in experiments/results
    log = (
        [json.loads(line) for line in log_path.read_text().splitlines() if line] if log_path.exists() else []
    )
    config_path = workdir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    category = data_category(config, root, workdir) if config is not None else "unknown"
    return {
        "config": config,
        "per_class": dict(per_class),
        "any lesion": any_lesion,
        "category": category,
        "epochs": len(log),
        "seconds": sum(record["seconds"] for record in log) if log else float("nan"),
    }


def collect(root: pathlib.Path) -> dict:
    """{candidate: {fold: run}} of the finished runs under `root`. A run's stages, each in a folder of
    its workdir (self-training's `teacher` and `student1`), are candidates `<candidate>/<stage>`, so that a
    student can be paired with its own teacher (`--reference selftrain/teacher`)."""
    runs = collections.defaultdict(dict)
    for workdir in sorted(root.iterdir()):
        match = WORKDIR_NAME.match(workdir.name)
        if not match or not workdir.is_dir():  # a file, or a link to a run not started yet
            continue
        for run_dir, candidate in [(workdir, match["candidate"])] + [
            (stage, f"{match['candidate']}/{stage.name}")
            for stage in sorted(workdir.iterdir())
            if stage.is_dir()
        ]:
            if (run_dir / "metrics" / "validation_slices.csv").exists():
                runs[candidate][int(match["fold"])] = read_run(run_dir, root)
    return dict(runs)


def _averaged_slices(name: str, fold: int, members: list[str], values: list[dict]) -> dict[str, float]:
    """{slice id: mean Dice over the draws} of one fold; draws that scored other slices are refused."""
    if any(set(draw) != set(values[0]) for draw in values):
        raise UserError(f"--draws {name}: {', '.join(members)} scored other slices on fold {fold}")
    return {slice_id: float(np.mean([draw[slice_id] for draw in values])) for slice_id in sorted(values[0])}


def averaged_draws(runs: dict, name: str, members: list[str]) -> dict:
    """{fold: run} of candidate `name`: the runs of `members` (draws of one recipe, say with other seeds)
    averaged per slice, so that its paired differences carry less of one training run's noise. Every
    member must hold the same folds and, on each, the same slices and classes."""
    missing = [member for member in members if member not in runs]
    if missing:
        raise UserError(f"--draws {name}: no finished runs of {', '.join(missing)}")
    folds = [sorted(runs[member]) for member in members]
    if any(member_folds != folds[0] for member_folds in folds):
        raise UserError(f"--draws {name}: {', '.join(members)} ran other folds ({folds})")
    averaged = {}
    for fold in folds[0]:
        draws = [runs[member][fold] for member in members]
        classes = sorted(draws[0]["per_class"])
        if any(sorted(draw["per_class"]) != classes for draw in draws):
            raise UserError(f"--draws {name}: {', '.join(members)} scored other classes on fold {fold}")
        averaged[fold] = {
            "config": None,
            "per_class": {
                class_name: _averaged_slices(
                    name, fold, members, [draw["per_class"][class_name] for draw in draws]
                )
                for class_name in classes
            },
            "any lesion": _averaged_slices(name, fold, members, [draw["any lesion"] for draw in draws]),
            "category": " / ".join(sorted({draw["category"] for draw in draws})),
            "epochs": 0,  # its members' training times are their own rows
            "seconds": float("nan"),
        }
    return averaged


def class_values(folds: dict, name: str) -> tuple[dict, list[float]]:
    """({slice id: Dice}, [fold means]) of class `name` ('any lesion' for the top-level mask)."""
    by_slice, fold_means = {}, []
    for run in folds.values():
        values = run["any lesion"] if name == "any lesion" else run["per_class"].get(name, {})
        by_slice.update(values)
        if values:
            fold_means.append(float(np.mean(list(values.values()))))
    return by_slice, fold_means


def slice_differences(reference: dict[str, float], alternative: dict[str, float]) -> np.ndarray:
    """Per slice both scored (sorted by id), the alternative's Dice minus the reference's."""
    return stats.paired_slice_differences(
        {key: [value] for key, value in reference.items()},
        {key: [value] for key, value in alternative.items()},
    )


def markdown(runs: dict, reference: str) -> str:
    classes = sorted({name for folds in runs.values() for run in folds.values() for name in run["per_class"]})
    classes.append("any lesion")
    lines = [
        "| candidate | folds | class | slices | Dice (slices pooled) [95% bootstrap] "
        f"| Dice per fold [95% t over folds] | paired vs {reference}, per slice [95% bootstrap] | category |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for candidate, folds in runs.items():
        for name in classes:
            by_slice, fold_means = class_values(folds, name)
            if reference in runs and candidate != reference:
                reference_slices, _ = class_values(runs[reference], name)
                differences = slice_differences(reference_slices, by_slice)
                paired = (
                    tables.format_interval(stats.bootstrap_interval(differences)) + f" (n={differences.size})"
                )
            else:
                paired = ""
            lines.append(
                f"| {candidate} | {len(folds)} | {name} | {len(by_slice)} "
                f"| {tables.format_interval(stats.bootstrap_interval(list(by_slice.values())))} "
                f"| {tables.format_interval(stats.t_interval(fold_means))} | {paired} "
                f"| {' / '.join(sorted({run['category'] for run in folds.values()}))} |"
            )
    # The record has no training time of its own; runs kept without their train log neither.
    timed = [
        (candidate, fold, run)
        for candidate, folds in runs.items()
        for fold, run in sorted(folds.items())
        if run["epochs"]
    ]
    if timed:
        lines += ["", "| candidate | fold | epochs | training seconds (train log) |", "|---|---|---|---|"]
        for candidate, fold, run in timed:
            lines.append(f"| {candidate} | {fold} | {run['epochs']} | {run['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=pathlib.Path, help="folder of <candidate>-cv<fold> workdirs")
    parser.add_argument(
        "--reference",
        default="dice_ce",
        help=f"the candidate the others are paired with ('{RECIPE_RECORD}': the recipe study's record)",
    )
    parser.add_argument(
        "--draws",
        action="append",
        default=[],
        metavar="NAME=CANDIDATE,CANDIDATE[,...]",
        help="adds candidate NAME: the listed candidates' runs averaged per slice (draws of one recipe with "
        "other seeds); it can be the --reference",
    )
    args = parser.parse_args(argv)
    runs = collect(args.root)
    try:
        if args.reference == RECIPE_RECORD:
            runs = with_recipe_record(runs)
        for draws in args.draws:
            name, _, members = draws.partition("=")
            if not name or len(members.split(",")) < 2:
                raise UserError(f"--draws {draws}: not NAME=CANDIDATE,CANDIDATE[,...]")
            if name in runs:
                raise UserError(f"--draws {name}: a candidate of that name exists; name the draws otherwise")
            runs[name] = averaged_draws(runs, name, members.split(","))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(runs, args.reference), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
