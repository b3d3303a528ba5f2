"""Cross-validated Dice of ensembles of finished `recipe` arms (nnU-Net's ensembling of configurations).

On every fold, each member's last checkpoint (its run of `run_study.py recipe`, kept under
experiments/runs/) predicts the held-out slices with flip test-time augmentation; the members'
probabilities are averaged and thresholded at `eval.threshold`. Each ensemble is reported per fold, as a
mean with a 95% t-interval over folds, and paired per slice with its first member. Nothing is trained.
`--resolution original` scores each slice at the size of its stored expert mask (the averaged
probabilities resized bilinearly), as published COVID-SemiSeg results are; a one-arm "ensemble" is that
arm alone:

    python -m experiments.ensemble_cv --data_root ../shared/data \\
        --ensemble r128_e200_dropout0,r128_e200_dropout02 \\
        --ensemble r128_e200_dropout0,r128_e200_dropout02,r128_e300
    python -m experiments.ensemble_cv --data_root ../shared/data --resolution original \\
        --ensemble r128_e200_dropout0
"""

import argparse
import pathlib
import shlex
import sys

import numpy as np

from experiments.studies import design, runner, stats, tables
from rdunet_jax import datasets, evaluate, inference, metrics, steps
from rdunet_jax.errors import UserError

EXPERIMENTS = pathlib.Path(__file__).resolve().parent


def parse_args(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ensemble", action="append", required=True, metavar="ARM,ARM,...")
    parser.add_argument("--budget", choices=design.BUDGET_NAMES, default="small")
    parser.add_argument("--data_root", default="../shared/data", help="folder holding the datasets' folders")
    parser.add_argument("--runs_root", default=str(EXPERIMENTS / "runs"))
    parser.add_argument(
        "--resolution",
        choices=("model", "original"),
        default="model",
        help="score at the model's resolution (as the studies) or at each stored mask's own size",
    )
    return parser.parse_args(argv)


def ensemble_slice_dice(member_probabilities, masks, threshold: float) -> np.ndarray:
    """Per-slice Dice of the mean of the members' probabilities (each [N, H, W]) thresholded, against
    `masks`: an [N, H, W] array at the model's resolution, or a list of stored masks of any size."""
    mean = np.mean(np.stack(member_probabilities), axis=0)
    counts = [
        evaluate.original_resolution_counts(probabilities, mask, threshold)
        for probabilities, mask in zip(mean, masks, strict=True)
    ]
    tp, fp, fn, _ = np.array(counts).T
    return metrics.slice_metrics(tp, fp, fn)["dice"]


def recipe_specs(budget_name: str, data_root) -> list:
    """The recipe study's runs at `budget_name` on semiseg (the folds and configs its runner trained)."""
    budget = design.BUDGETS[(budget_name, "semiseg")]
    base = design.base_config("semiseg", budget, data_root)
    return design.plan(design.STUDIES["recipe"], base, budget.seeds)


def check_arms(specs, ensembles) -> None:
    """Every member must be an arm of the recipe study (checked before any run is looked at)."""
    arms = sorted({spec.arm for spec in specs})
    for arm in (arm for members in ensembles for arm in members):
        if arm not in arms:
            raise UserError(f"--ensemble: {arm} is not an arm of the recipe study; choose from {arms}")


def member_runs(specs, arm: str, runs_root) -> dict:
    """fold -> (config, workdir) of `arm`'s finished runs; a UserError names what is missing."""
    runs = {}
    for spec in specs:
        if spec.arm != arm:
            continue
        workdir = runner.workdir_for(runs_root, spec.config)
        if not (workdir / "checkpoints" / "latest").is_dir():
            raise UserError(
                f"--ensemble: {arm} fold {spec.replicate.fold} has no checkpoint in {workdir}; "
                f"train it first: python -m experiments.run_study recipe --arms {arm}"
            )
        runs[spec.replicate.fold] = (spec.config, workdir)
    return runs


def fold_predictions(config, workdir, resolution: str = "model") -> tuple[list, np.ndarray, list]:
    """Slice ids, probabilities and masks (at the model's resolution, or as stored for `original`) of the
    held-out fold from the run's last checkpoint."""
    model = inference.build_model(config)
    predictor = inference.JaxPredictor(steps.restore_state(config, workdir, model=model))
    source = datasets.load_source(config.data, "validation")
    batches = list(evaluate.predict_source(predictor, source, config, test_time_flips=True))
    ids = [meta["id"] for batch in batches for meta in batch["metadata"]]
    probabilities = np.concatenate([batch["probabilities"] for batch in batches])
    if resolution == "original":
        return ids, probabilities, [mask for batch in batches for mask in batch["original_masks"]]
    return ids, probabilities, np.concatenate([batch["masks"] for batch in batches])


def score_ensembles(ensembles, runs, resolution: str = "model") -> dict:
    """members -> per-fold mean Dice, and per-slice Dice of the ensemble and of its first member."""
    scores = {members: {"folds": [], "slices": {}, "first_member": {}} for members in ensembles}
    for fold in sorted(next(iter(runs.values()))):
        predicted = {arm: fold_predictions(*arm_runs[fold], resolution) for arm, arm_runs in runs.items()}
        for members in ensembles:
            ids, _, masks = predicted[members[0]]
            threshold = runs[members[0]][fold][0].eval.threshold
            dice = ensemble_slice_dice([predicted[arm][1] for arm in members], masks, threshold)
            alone = ensemble_slice_dice([predicted[members[0]][1]], masks, threshold)
            scores[members]["folds"].append(float(np.mean(dice)))
            scores[members]["slices"].update(zip(ids, ([value] for value in dice), strict=True))
            scores[members]["first_member"].update(zip(ids, ([value] for value in alone), strict=True))
    return scores


def markdown_table(scores: dict) -> list[str]:
    """One row per ensemble: Dice per fold, the mean [95% t-interval], Δ per slice vs its first member."""
    num_folds = len(next(iter(scores.values()))["folds"])
    lines = [
        "| Ensemble | "
        + " | ".join(f"fold{fold}" for fold in range(num_folds))
        + " | mean [95% CI] | ΔDSC vs its first member, per slice [95% bootstrap] |",
        "|---|" + "---|" * num_folds + "---|---|",
    ]
    for members, score in scores.items():
        differences = stats.paired_slice_differences(score["first_member"], score["slices"])
        paired = stats.bootstrap_interval(differences, num_resamples=tables.BOOTSTRAP_RESAMPLES)
        cells = " | ".join(f"{value:.3f}" for value in score["folds"])
        mean = tables.format_interval(stats.t_interval(score["folds"]))
        lines.append(f"| {' + '.join(members)} | {cells} | {mean} | {tables.format_interval(paired, 4)} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ensembles = [tuple(text.split(",")) for text in args.ensemble]
        specs = recipe_specs(args.budget, args.data_root)
        check_arms(specs, ensembles)
        runs = {arm: member_runs(specs, arm, args.runs_root) for members in ensembles for arm in members}
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "experiments.ensemble_cv", *arguments])
    where = "each stored mask's own size" if args.resolution == "original" else "the model's resolution"
    print(f"Produced by `{command}` ({args.budget} budget, flip TTA, last checkpoints, Dice at {where}):\n")
    print("\n".join(markdown_table(score_ensembles(ensembles, runs, args.resolution))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
