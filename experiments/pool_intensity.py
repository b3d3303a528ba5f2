"""What a teacher sees in the unlabelled pool under each `data.unlabelled_intensity_matching` mode.

Predicts a seeded sample of the unlabelled split with a trained model (no flips) for each mode and prints,
per source of the slice (COVID-SemiSeg's pool: coronacases.org or Radiopaedia, from the file name), the
mean share of pixels called lesion and the share of slices with any; and the labelled training slices'
own lesion share, for scale:

    python -m experiments.pool_intensity --config configs/semiseg_selftrain.py \\
        --model runs/selftrain-cv0/teacher --set data.manual_dir=../shared/data/covid-semiseg \\
        --set data.cv_folds=5 --set data.cv_fold=0
"""

import argparse
import collections

import numpy as np

from experiments import common
from rdunet_jax import config_lib, datasets, evaluate, inference, selftrain, steps


def source_of(example_id: str) -> str:
    """The public collection a pool slice comes from, by its file name."""
    for name in ("coronacases", "radiopaedia"):
        if name in example_id:
            return name
    return "other"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", required=True, help="a workdir with checkpoints (a teacher)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    parser.add_argument("--sample", type=int, default=240)
    args = parser.parse_args(argv)
    config = common.load_config(args.config, args.set)
    model_config = selftrain.teacher_config(config)
    predictor = inference.JaxPredictor(steps.restore_state(model_config, args.model))
    labelled = model_config.data.copy_and_resolve_references()
    labelled.unlabelled_fraction = 0.0  # a mean-teacher config's training split mixes the pool in
    train = datasets.load_source(labelled, labelled.train_split)
    masks = [np.asarray(train[index]["mask"]) for index in range(len(train))]
    print(
        f"labelled training slices: {len(masks)}, lesion {np.mean([mask.mean() for mask in masks]):.4f} "
        f"of pixels, on {np.mean([mask.any() for mask in masks]):.2f} of slices"
    )
    print("| matching | source | slices | lesion share of pixels | slices with lesion |")
    print("|---|---|---|---|---|")
    for mode in config_lib.INTENSITY_MATCHING_MODES:
        config.data.unlabelled_intensity_matching = mode
        pool = datasets.load_source(config.data, "unlabelled")
        rng = np.random.default_rng(0)
        indices = sorted(rng.choice(len(pool), min(args.sample, len(pool)), replace=False).tolist())
        found = collections.defaultdict(list)
        sample = datasets.SubsetSource([(pool, index) for index in indices], pool.name, "sample")
        for batch in evaluate.predict_source(predictor, sample, model_config):
            for meta, probabilities in zip(batch["metadata"], batch["probabilities"], strict=True):
                lesion = probabilities >= config.eval.threshold
                found[source_of(meta["id"])].append((lesion.mean(), lesion.any()))
        for name, rows in sorted(found.items()):
            share, present = np.mean(rows, axis=0)
            print(f"| {mode} | {name} | {len(rows)} | {share:.4f} | {present:.2f} |", flush=True)


if __name__ == "__main__":
    main()
