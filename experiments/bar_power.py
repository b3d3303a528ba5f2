"""How large a gain issue #27's bar can see: draws of one recipe against the record they are paired with.

The bar pairs one cross-validated draw of a candidate (one training run a fold) with one draw of the recipe,
its record, per slice over the 50 held-out slices, and asks for the 95% bootstrap interval to clear zero.
That interval covers which slices were drawn, not which training run: retraining the recipe itself moves
its pooled Dice. Given several draws of the recipe (the first the record; the others the recipe retrained,
say self-training's teachers) and draws of candidates, this prints every draw against the record, then,
under a normal model of the pooled Dice over draws, the chance that one draw of a recipe clears the bar
and the gain over the recipe's mean it needs to clear it half or four fifths of the time:

    python -m experiments.bar_power experiments/results/recipe/selftrain-cv \\
        --recipe recipe-record,selftrain/teacher,selftrain-ens/teacher \\
        --draws split=selftrain-dsbn/student1,selftrain-dsbn-s1/student1

The margin a draw needs is the mean, over the recipe's other draws, of its point estimate minus its lower
bound; the spread of draws is the standard deviation of the recipe's pooled Dice over its draws (record
included). Both are estimates from few draws: three draws give a rough spread.
"""

import argparse
import pathlib
import sys

import numpy as np
from scipy import stats as scipy_stats

from experiments import cv_table
from experiments.studies import stats, tables
from rdunet_jax.errors import UserError

FOUR_FIFTHS = float(scipy_stats.norm.ppf(0.8))


def pooled_slices(runs: dict, name: str) -> dict[str, float]:
    """{slice id: Dice} of candidate `name` over all its folds; a UserError when it has no runs."""
    if name not in runs:
        raise UserError(f"{name}: no finished runs (candidates: {', '.join(sorted(runs))})")
    return cv_table.class_values(runs[name], "any lesion")[0]


def against_record(record: dict, draw: dict, name: str) -> tuple[float, float, float]:
    """(mean, low, high) of the draw's per-slice Dice minus the record's, 95% bootstrap; the draw must have
    scored the record's slices."""
    if set(draw) != set(record):
        raise UserError(f"{name}: scored {len(draw)} slices, the record {len(record)}; not the same slices")
    differences = stats.paired_slice_differences(
        {key: [value] for key, value in record.items()}, {key: [value] for key, value in draw.items()}
    )
    return stats.bootstrap_interval(differences)


def chance_to_clear(gain_over_record: float, margin: float, spread: float) -> float:
    """The chance that one draw of a recipe whose mean pooled Dice is `gain_over_record` above the record
    clears the bar, its draws spread normally by `spread` and each needing `margin` above zero."""
    return float(scipy_stats.norm.cdf((gain_over_record - margin) / spread))


def bar_summary(runs: dict, recipe: list[str], families: dict[str, list[str]]) -> list[str]:
    """The markdown lines: every draw against the record, then the bar's margin and spread, then each
    family of draws (the recipe's own first) with its mean gain and its chance of clearing the bar."""
    if len(recipe) < 3:
        raise UserError("--recipe: name the record and at least two other draws of the recipe")
    record = pooled_slices(runs, recipe[0])
    lines = [
        f"| draw | of | Dice, {len(record)} slices pooled "
        f"| - {recipe[0]}, per slice [95% bootstrap] | clears |",
        "|---|---|---|---|---|",
    ]
    means, margins = {}, []
    for family, names in {"recipe": recipe, **families}.items():
        means[family] = []
        for name in names:
            draw = pooled_slices(runs, name)
            means[family].append(float(np.mean(list(draw.values()))))
            if name == recipe[0]:
                lines.append(f"| {name} | {family} | {means[family][-1]:.3f} | (the record) | |")
                continue
            difference = against_record(record, draw, name)
            if family == "recipe":
                margins.append(difference[0] - difference[1])
            cleared = "yes" if difference[1] > 0 else "no"
            lines.append(
                f"| {name} | {family} | {means[family][-1]:.3f} | {tables.format_interval(difference)} "
                f"| {cleared} |"
            )
    margin = float(np.mean(margins))
    spread = float(np.std(means["recipe"], ddof=1))
    recipe_mean, record_mean = float(np.mean(means["recipe"])), means["recipe"][0]
    half = margin - (recipe_mean - record_mean)
    lines += [
        "",
        f"- The margin a draw needs above the record (mean point estimate minus lower bound, the recipe's "
        f"{len(margins)} other draws): {margin:.4f}.",
        f"- The spread of one draw's pooled Dice (standard deviation over the recipe's {len(recipe)} draws): "
        f"{spread:.4f}; the recipe's mean {recipe_mean:.4f}, the record {record_mean:.4f}.",
        f"- Gain over the recipe's mean that clears the bar half of the time: {half:+.4f}; four times in "
        f"five: {half + FOUR_FIFTHS * spread:+.4f}.",
        "",
        "| family | draws | mean pooled Dice | sd over its draws | - the recipe's mean "
        "| chance one draw clears the bar |",
        "|---|---|---|---|---|---|",
    ]
    for family, family_means in means.items():
        mean = float(np.mean(family_means))
        own_spread = f"{np.std(family_means, ddof=1):.4f}" if len(family_means) > 1 else ""
        chance = chance_to_clear(mean - record_mean, margin, spread)
        lines.append(
            f"| {family} | {len(family_means)} | {mean:.4f} | {own_spread} | {mean - recipe_mean:+.4f} "
            f"| {chance:.2f} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="folder of <candidate>-cv<fold> workdirs (as experiments.cv_table)")
    parser.add_argument(
        "--recipe",
        required=True,
        metavar="RECORD,DRAW,DRAW[,...]",
        help=f"draws of the recipe, the record first ('{cv_table.RECIPE_RECORD}': the recipe study's)",
    )
    parser.add_argument("--draws", action="append", default=[], metavar="NAME=CANDIDATE,CANDIDATE[,...]")
    args = parser.parse_args(argv)
    try:
        runs = cv_table.collect(pathlib.Path(args.root))
        recipe = args.recipe.split(",")
        if recipe[0] == cv_table.RECIPE_RECORD:
            runs = cv_table.with_recipe_record(runs)
        families = {}
        for draws in args.draws:
            name, _, members = draws.partition("=")
            if not name or not members or name == "recipe" or name in families:
                raise UserError(
                    f"--draws {draws}: not NAME=CANDIDATE[,...] with a new NAME other than recipe"
                )
            families[name] = members.split(",")
        lines = bar_summary(runs, recipe, families)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
