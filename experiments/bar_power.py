"""How large a gain issue #27's bar can see: draws of one recipe against the record they are paired with.

The bar pairs one cross-validated draw of a candidate (one training run a fold) with one draw of the recipe,
its record, per slice over the 50 held-out slices, and asks for the 95% bootstrap interval to clear zero.
That interval covers which slices were drawn, not which training run: retraining the recipe itself moves
its pooled Dice. Given several draws of the recipe (the first the record; the others the recipe retrained,
say self-training's teachers) and draws of candidates, this prints every draw against the record, then,
under a normal model of the pooled Dice over draws (the record held fixed, as the bar holds it), the chance
that one draw of a recipe clears the bar and the gain over the recipe's mean it needs to clear it half or
four fifths of the time:

    python -m experiments.bar_power experiments/results/recipe/selftrain-cv \\
        --recipe recipe-record,selftrain/teacher,selftrain-ens/teacher,selftrain-seed1/teacher \\
        --draws split=selftrain-dsbn/student1,selftrain-dsbn-s1/student1

The margin a draw needs is the mean, over the recipe's other draws, of its point estimate minus its lower
bound; the spread of draws is the standard deviation of the recipe's pooled Dice over its draws (record
included). Both are estimates from few draws. Draws that are copies of one run (the same Dice on every
slice) are refused: they would shrink the spread to nothing.
"""

import argparse
import pathlib
import sys

import numpy as np
from scipy import stats as scipy_stats

from experiments import cv_table
from experiments.studies import stats, tables
from rdunet_jax.errors import UserError

Z_FOUR_FIFTHS = float(scipy_stats.norm.ppf(0.8))


def against_record(record: dict, draw: dict, name: str) -> tuple[float, float, float]:
    """(mean, low, high) of the draw's per-slice Dice minus the record's, 95% bootstrap; the draw must have
    scored the record's slices."""
    unshared = len(set(draw) ^ set(record))
    if unshared:
        raise UserError(
            f"{name}: {unshared} of its {len(draw)} slices and the record's {len(record)} are not in both "
            "(other folds, or another fold cut)"
        )
    return stats.bootstrap_interval(cv_table.slice_differences(record, draw))


def chance_to_clear(gain_over_record: float, margin: float, spread: float) -> float:
    """The chance that one draw of a recipe whose mean pooled Dice is `gain_over_record` above the record
    clears the bar, its draws spread normally by `spread` and each needing `margin` above zero."""
    return float(scipy_stats.norm.cdf((gain_over_record - margin) / spread))


def check_distinct_draws(draws: dict[str, dict]) -> None:
    """Two names for one run (a stage copied into another workdir, say) are not two draws."""
    names = list(draws)
    for index, name in enumerate(names):
        for other in names[index + 1 :]:
            if draws[name] == draws[other]:
                raise UserError(
                    f"{name} and {other}: the same Dice on every slice, one run and not two draws"
                )


def bar_summary(runs: dict, recipe: list[str], families: dict[str, list[str]]) -> list[str]:
    """The markdown lines: every draw against the record, then the bar's margin and spread, then each
    family of draws (the recipe's own first) with its mean gain and its chance of clearing the bar."""
    if len(recipe) < 3:
        raise UserError("--recipe: name the record and at least two other draws of the recipe")
    named = {"recipe": recipe, **families}
    # {name: {slice id: Dice}} over all its folds; main has checked that every name has runs.
    draws = {
        name: cv_table.class_values(runs[name], "any lesion")[0] for names in named.values() for name in names
    }
    if len(draws) < sum(len(names) for names in named.values()):
        raise UserError("--recipe/--draws: a candidate is named twice")
    check_distinct_draws(draws)
    record = draws[recipe[0]]
    pooled_dice = {name: float(np.mean(list(slices.values()))) for name, slices in draws.items()}
    lines = [
        f"| draw | of | Dice, {len(record)} slices pooled "
        f"| - {recipe[0]}, per slice [95% bootstrap] | clears |",
        "|---|---|---|---|---|",
        f"| {recipe[0]} | recipe | {pooled_dice[recipe[0]]:.3f} | (the record) | |",
    ]
    pooled_dice_by_family, margins = {}, []
    for family, names in named.items():
        pooled_dice_by_family[family] = [pooled_dice[name] for name in names]
        for name in names[1:] if family == "recipe" else names:
            mean, low, high = against_record(record, draws[name], name)
            # One margin for every family, the recipe's: what a draw of the plain recipe needed to clear.
            if family == "recipe":
                margins.append(mean - low)
            lines.append(
                f"| {name} | {family} | {pooled_dice[name]:.3f} "
                f"| {tables.format_interval((mean, low, high))} | {'yes' if low > 0 else 'no'} |"
            )
    margin = float(np.mean(margins))
    spread = float(np.std(pooled_dice_by_family["recipe"], ddof=1))
    if not spread > 1e-9:  # equal means leave a rounding error, not a spread
        raise UserError(f"--recipe: its draws' pooled Dice do not vary ({spread}); no spread to model")
    recipe_mean, record_mean = (
        float(np.mean(pooled_dice_by_family["recipe"])),
        pooled_dice_by_family["recipe"][0],
    )
    gain_for_half = margin - (recipe_mean - record_mean)
    lines += [
        "",
        f"- The margin a draw needs above the record (mean point estimate minus lower bound, the recipe's "
        f"{len(margins)} other draws): {margin:.4f}.",
        f"- The spread of one draw's pooled Dice (standard deviation over the recipe's {len(recipe)} draws): "
        f"{spread:.4f}; the recipe's mean {recipe_mean:.4f}, the record {record_mean:.4f}. A few draws give "
        "a rough spread: more draws, of other seeds above all, may move it and the gain needed 4 times in 5.",
        f"- Gain over the recipe's mean that clears the bar half of the time: {gain_for_half:+.4f}; four "
        f"times in five: {gain_for_half + Z_FOUR_FIFTHS * spread:+.4f}.",
        "",
        "| family | draws | mean pooled Dice | sd over its draws | - the recipe's mean "
        "| chance one draw clears the bar (the recipe's spread) |",
        "|---|---|---|---|---|---|",
    ]
    for family, family_means in pooled_dice_by_family.items():
        mean = float(np.mean(family_means))
        own_spread = f"{np.std(family_means, ddof=1):.4f}" if len(family_means) > 1 else ""
        chance = chance_to_clear(mean - record_mean, margin, spread)
        lines.append(
            f"| {family} | {len(family_means)} | {mean:.4f} | {own_spread} | {mean - recipe_mean:+.4f} "
            f"| {chance:.2f} |"
        )
    return lines


def parse_families(arguments: list[str]) -> dict[str, list[str]]:
    """{family: [candidate, ...]} of the --draws arguments NAME=CANDIDATE[,...]."""
    families = {}
    for draws in arguments:
        name, _, members = draws.partition("=")
        if not name or not members or name == "recipe" or name in families:
            raise UserError(f"--draws {draws}: not NAME=CANDIDATE[,...] with a new NAME other than recipe")
        families[name] = members.split(",")
    return families


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
        root, recipe = pathlib.Path(args.root), args.recipe.split(",")
        if not root.is_dir():
            raise UserError(f"{root}: not a folder of <candidate>-cv<fold> workdirs")
        if cv_table.RECIPE_RECORD in recipe[1:]:
            raise UserError(f"--recipe: {cv_table.RECIPE_RECORD} is the record, so it comes first")
        families = parse_families(args.draws)
        named = set(recipe).union(*families.values())
        # Only the named runs: another run under the root (a multi-class one, say) is none of this table's.
        collected = cv_table.collect(root)
        missing = sorted(named - set(collected) - {cv_table.RECIPE_RECORD})
        if missing:
            available = ", ".join(sorted(collected))
            raise UserError(f"{', '.join(missing)}: no finished runs under {root} (candidates: {available})")
        runs = {name: folds for name, folds in collected.items() if name in named}
        if recipe[0] == cv_table.RECIPE_RECORD:
            runs = cv_table.with_recipe_record(runs)
        lines = bar_summary(runs, recipe, families)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
