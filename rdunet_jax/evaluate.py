"""Evaluation: restore a checkpoint, predict a split, and write its metrics.

`--mode evaluate` restores the best checkpoint of a workdir (or `--checkpoint_step`) and writes
`metrics/<split>.json` with the means over slices, the pooled (global) values and the slice count.
"""

import pathlib

import jax
import numpy as np

from rdunet_jax import checkpoints, datasets, input_pipeline, metrics, train
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic


def predict_source(state, source, config):
    """Yields (ids, images, masks, probabilities, losses) per batch over `source`, in order."""
    for batch in input_pipeline.eval_batches(source, config.data.image_size, config.eval.batch_size):
        outputs = jax.device_get(train.eval_step(state, {"image": batch["image"], "mask": batch["mask"]}))
        count = len(batch["id"])
        yield (
            batch["id"],
            batch["image"][:count, ..., 0],
            batch["mask"][:count, ..., 0],
            outputs["probabilities"][:count, ..., 0],
            outputs["loss"][:count],
        )


def evaluate_source(state, source, config) -> dict:
    """Mean loss and the metric summary of `state` on every slice of `source`."""
    counts, slice_losses = [], []
    for _, _, masks, probabilities, batch_losses in predict_source(state, source, config):
        counts.append(metrics.confusion_counts(probabilities >= config.eval.threshold, masks))
        slice_losses.append(batch_losses)
    tp, fp, fn, tn = (np.concatenate(column) for column in zip(*counts, strict=True))
    summary = metrics.summarize(tp, fp, fn, tn)
    summary["loss"] = float(np.mean(np.concatenate(slice_losses)))
    return summary


def default_split(config) -> str:
    """`eval.split`, falling back to validation when the test split is held out or absent."""
    if config.eval.split == "test" and not datasets.has_split(config.data, "test"):
        return "validation"
    return config.eval.split


def restore_for_evaluation(config, workdir, checkpoint_step: int | None = None):
    """The train state of `workdir`'s best checkpoint (or the given step of `latest`)."""
    model = train.setup_run(config)
    run_checkpoints = checkpoints.RunCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        target = train.abstract_train_state(config, model, steps_per_epoch=1)
        kind = "best" if checkpoint_step is None else "latest"
        if checkpoint_step is not None and checkpoint_step not in run_checkpoints.all_steps(kind):
            kind = "best"
            if checkpoint_step not in run_checkpoints.all_steps(kind):
                available = sorted(
                    set(run_checkpoints.all_steps("latest")) | set(run_checkpoints.all_steps("best"))
                )
                raise UserError(
                    f"--checkpoint_step: no checkpoint at step {checkpoint_step} in "
                    f"{run_checkpoints.directory}; available steps: {available}"
                )
        restored = run_checkpoints.restore(kind, target, checkpoint_step)
        if restored is None:
            raise UserError(f"--workdir: no checkpoint in {run_checkpoints.directory}; train first")
        return restored[0]
    finally:
        run_checkpoints.close()


def evaluate_workdir(config, workdir, checkpoint_step: int | None = None) -> dict:
    """Restores a checkpoint of `workdir`, evaluates the configured split, writes metrics/<split>.json."""
    state = restore_for_evaluation(config, workdir, checkpoint_step)
    split = default_split(config)
    summary = evaluate_source(state, datasets.load_source(config.data, split), config)
    summary.update(split=split, step=int(state.step), threshold=config.eval.threshold)
    path = pathlib.Path(workdir) / "metrics" / f"{split}.json"
    write_json_atomic(path, summary)
    print(
        f"{split}: dice {summary['dice']:.4f} jaccard {summary['jaccard']:.4f} "
        f"f_score {summary['f_score']:.4f} global_dice {summary['global_dice']:.4f} "
        f"({summary['num_slices']} slices) -> {path}",
        flush=True,
    )
    return summary
