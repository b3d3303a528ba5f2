"""Runs one of the paper's comparisons and writes its tables.

    python -m experiments.run_study ablation|dilation|lesion_size|split_leakage|recipe \\
        --budget smoke|small|paper [--dataset semiseg|ma2020_2d] [--data_root ../shared/data] \\
        [--max_runs N] [--folds K,...] [--arms A,...] [--dry_run]

Each run's config and metrics go to experiments/results/<study>/<tag>/<run>.json (tag: <dataset>-<budget>)
and its workdir to experiments/runs/<config digest>/ (gitignored). Finished runs are skipped, runs another
study already finished are copied, and an interrupted run resumes from its checkpoint: run the same
command again to continue. The tables go to experiments/results/<study>/<tag>.md after every run.
"""

import argparse
import dataclasses
import pathlib
import shlex
import sys

from experiments.studies import design, runner, tables
from rdunet_jax.errors import UserError

EXPERIMENTS = pathlib.Path(__file__).resolve().parent

# Budget fields `--set` may change, with their parsers.
BUDGET_OVERRIDES = {
    "image_size": int,
    "num_epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "lr_decay_epochs": int,
    "cv_folds": int,
    "seeds": lambda text: tuple(int(value) for value in text.split(",")),
    "dtype": lambda text: _one_of(text, ("float32", "bfloat16")),
    "checkpoint": lambda text: _one_of(text, ("best", "last")),
}


def _one_of(text: str, choices: tuple) -> str:
    if text not in choices:
        raise ValueError(text)
    return text


def parse_args(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=sorted(design.STUDIES))
    parser.add_argument("--budget", choices=design.BUDGET_NAMES, default="small")
    parser.add_argument("--dataset", choices=sorted(design.DATA_FOLDERS), default=None)
    parser.add_argument("--data_root", default="../shared/data", help="folder holding the datasets' folders")
    parser.add_argument("--data_dir", default="", help="prepared-dataset cache (TFDS default when empty)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"change the budget: {', '.join(BUDGET_OVERRIDES)} (seeds: comma-separated)",
    )
    parser.add_argument(
        "--tag", default=None, help="results sub-folder (default <dataset>-<budget>[-<sets>])"
    )
    parser.add_argument("--max_runs", type=int, default=None, help="train at most this many runs now")
    parser.add_argument(
        "--folds",
        type=_fold_list,
        default=None,
        help="train only these cross-validation folds now, comma-separated (e.g. one process per fold)",
    )
    parser.add_argument(
        "--seeds",
        type=_fold_list,
        default=None,
        help="train only these of the budget's seeds now, comma-separated (e.g. one process per seed)",
    )
    parser.add_argument(
        "--arms",
        type=lambda text: tuple(text.split(",")),
        default=None,
        help="train only these arms now, comma-separated (two processes must never share a run)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the plan and each run's status only")
    parser.add_argument("--results_root", default=str(EXPERIMENTS / "results"))
    parser.add_argument("--runs_root", default=str(EXPERIMENTS / "runs"))
    return parser.parse_args(argv)


def _fold_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def resolve_budget(budget_name: str, dataset: str, settings: list[str]) -> design.Budget:
    """The named budget for `dataset`, changed by `--set KEY=VALUE` items."""
    budget = design.BUDGETS[(budget_name, dataset)]
    changes = {}
    for item in settings:
        key, separator, text = item.partition("=")
        if not separator or key not in BUDGET_OVERRIDES:
            raise UserError(f"--set {item}: expected KEY=VALUE with KEY one of {sorted(BUDGET_OVERRIDES)}")
        try:
            changes[key] = BUDGET_OVERRIDES[key](text)
        except ValueError:
            raise UserError(f"--set {item}: {text!r} is not a valid {key}") from None
    return dataclasses.replace(budget, **changes)


def default_tag(dataset: str, budget_name: str, settings: list[str]) -> str:
    """'<dataset>-<budget>', plus the --set items, so changed budgets never mix with the named one."""
    suffix = "".join(f"-{item}" for item in settings).replace("=", "").replace(",", "_")
    return f"{dataset}-{budget_name}{suffix}"


def canonical_command(args, dataset: str) -> str:
    """The command that reproduces the tables (progress flags such as --max_runs left out)."""
    parts = ["python", "-m", "experiments.run_study", args.study, "--budget", args.budget]
    if dataset != design.DEFAULT_DATASETS.get(args.study, dataset):
        parts += ["--dataset", dataset]
    parts += ["--data_root", args.data_root]
    for item in args.set:
        parts += ["--set", item]
    if args.tag:
        parts += ["--tag", args.tag]
    return shlex.join(parts)


def prepare_study(args):
    """(study, dataset, budget, base config, run specs, tag) of the command line."""
    study = design.STUDIES[args.study]
    dataset = args.dataset or design.DEFAULT_DATASETS.get(study.name, study.datasets[0])
    if dataset not in study.datasets:
        raise UserError(f"--dataset {dataset}: the {study.name} study runs on {list(study.datasets)}")
    budget = resolve_budget(args.budget, dataset, args.set)
    base = design.base_config(dataset, budget, args.data_root)
    base.data.data_dir = args.data_dir
    specs = design.plan(study, base, budget.seeds)
    tag = args.tag or default_tag(dataset, args.budget, args.set)
    return study, dataset, budget, base, specs, tag


def select_folds(specs, budget: design.Budget, folds) -> list:
    """The runs of `specs` on the given cross-validation folds (all of them when `folds` is None)."""
    if folds is None:
        return specs
    if not budget.cv_folds:
        raise UserError("--folds: this budget has no cross-validation folds")
    if not set(folds) <= set(range(budget.cv_folds)):
        raise UserError(f"--folds {','.join(map(str, folds))}: folds run from 0 to {budget.cv_folds - 1}")
    return [spec for spec in specs if spec.replicate.fold in folds]


def select_seeds(specs, budget: design.Budget, seeds) -> list:
    """The runs of `specs` with the given seeds (all of them when `seeds` is None)."""
    if seeds is None:
        return specs
    if not set(seeds) <= set(budget.seeds):
        listed = ",".join(map(str, seeds))
        raise UserError(f"--seeds {listed}: this budget's seeds are {','.join(map(str, budget.seeds))}")
    return [spec for spec in specs if spec.replicate.seed in seeds]


def select_arms(study, specs, arms) -> list:
    """The runs of `specs` of the given arms (all of them when `arms` is None)."""
    if arms is None:
        return specs
    names = [arm.name for arm in study.arms]
    unknown = [arm for arm in arms if arm not in names]
    if unknown:
        raise UserError(f"--arms: {', '.join(unknown)} not in the {study.name} study's arms {names}")
    return [spec for spec in specs if spec.arm in arms]


def write_tables(args, study, dataset, budget, base, specs, tag) -> pathlib.Path:
    """Writes <results_root>/<study>/<tag>.md from the finished records."""
    from rdunet_jax.files import write_text_atomic

    records = runner.load_records(study, specs, tag, args.results_root)
    markdown = tables.study_markdown(
        study, base, args.budget, budget, specs, records, canonical_command(args, dataset)
    )
    path = pathlib.Path(args.results_root) / study.name / f"{tag}.md"
    write_text_atomic(path, markdown)
    return path


def print_plan(study, specs, tag, args) -> None:
    """One line per run: name, config digest, status and workdir."""
    results_dir = pathlib.Path(args.results_root) / study.name / tag
    for spec in specs:
        status, _ = runner.run_status(spec, results_dir, args.results_root)
        workdir = runner.workdir_for(args.runs_root, spec.config)
        print(f"{spec.name:32s} {runner.config_digest(spec.config)} {status:9s} {workdir}")
    print(f"{len(specs)} runs; results in {results_dir}")


def main(argv=None) -> int:
    """Runs the study of the command line; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from absl import logging

    # As in rdunet_jax.main: Orbax and TFDS log every operation; the runs print their own progress.
    logging.set_verbosity(logging.FATAL)
    from rdunet_jax import train

    try:
        study, dataset, budget, base, specs, tag = prepare_study(args)
        selected = select_folds(specs, budget, args.folds)
        selected = select_arms(study, select_seeds(selected, budget, args.seeds), args.arms)
        if args.dry_run:
            print_plan(study, selected, tag, args)
            return 0

        def tables_now():
            return write_tables(args, study, dataset, budget, base, specs, tag)

        counts = runner.execute(
            study,
            selected,
            tag,
            args.results_root,
            args.runs_root,
            train.train_and_evaluate,
            args.max_runs,
            tables_now,
        )
        path = tables_now()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except train.TrainingStopped as stopped:
        print(str(stopped), file=sys.stderr)
        return 128 + stopped.signal_number
    print(
        f"{study.name}: {counts['trained']} trained, {counts['reused']} reused, {counts['finished']} already "
        f"finished, {counts['pending']} left; tables in {path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
