"""Prepares every dataset a cross-validation run list (experiments/*_cv_runs.txt) reads, once, before
gpu_session.sh's cv phase starts its runs side by side (processes preparing one TFDS folder at once race).

    python -m experiments.prepare_cv experiments/pool_window_cv_runs.txt DATA_ROOT DATA_DIR

A run list's line is "candidate fold config [--config.key=value ...]"; `{data_root}` in an override stands
for DATA_ROOT (joint training's `data.extra_labelled_dir={data_root}/covid19-ct-seg-2d`).
"""

import argparse
import pathlib

from experiments import common

DATA_ROOT_PLACEHOLDER = "{data_root}"


def run_list_configs(run_list, data_root, data_dir=None) -> list[tuple[str, int, object]]:
    """(candidate, fold, config) of each line of `run_list`, as gpu_session.sh runs it: COVID-SemiSeg in
    `data_root`, 5 folds, scored on the held-out fold."""
    runs = []
    for line in pathlib.Path(run_list).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        candidate, fold, config_path, *overrides = line.split()
        if fold not in tuple("01234") or not all(
            override.startswith("--config.") and "=" in override for override in overrides
        ):
            raise ValueError(f"{run_list}: not 'candidate fold(0-4) config [--config.key=value ...]': {line}")
        settings = [
            override.removeprefix("--config.").replace(DATA_ROOT_PLACEHOLDER, str(data_root))
            for override in overrides
        ]
        config = common.load_config(str(common.REPO_ROOT / config_path), settings)
        config.data.manual_dir = str(pathlib.Path(data_root) / "covid-semiseg")
        if data_dir is not None:
            config.data.data_dir = str(data_dir)
        config.data.cv_folds, config.data.cv_fold, config.eval.split = 5, int(fold), "validation"
        runs.append((candidate, int(fold), config))
    return runs


def main(argv=None) -> None:
    from rdunet_jax import datasets
    from rdunet_jax.datasets import builder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_list")
    parser.add_argument("data_root")
    parser.add_argument("data_dir")
    args = parser.parse_args(argv)
    prepared = set()
    for candidate, _, config in run_list_configs(args.run_list, args.data_root, args.data_dir):
        if candidate in prepared:
            continue
        prepared.add(candidate)
        builder.prepare(config.data)
        if config.data.extra_labelled_dir:
            datasets.extra_labelled_source(config.data)
        print(f"prepared the data of {candidate}", flush=True)


if __name__ == "__main__":
    main()
