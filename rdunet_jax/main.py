"""Command line: `python -m rdunet_jax.main --config configs/rdunet.py [--workdir DIR] [--mode ...]`.

`--mode predict --input PATH --output DIR [--overwrite]` segments a NIfTI volume, a PNG/JPEG slice or a
folder of either with the workdir's best checkpoint.

Parses flags and dispatches; user mistakes end in one line on stderr and exit status 2.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rdunet_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/rdunet.py or configs/rdunet.py:unet."
)
flags.DEFINE_string("workdir", None, "Run folder (checkpoints, logs, metrics); default runs/<config name>.")
flags.DEFINE_enum(
    "mode", "train", ["train", "evaluate", "predict"], "Train (then evaluate), only evaluate, or predict."
)
flags.DEFINE_integer("checkpoint_step", None, "Evaluate or predict with this checkpoint step, not the best.")
flags.DEFINE_string("input", None, "predict: a NIfTI volume, a PNG/JPEG slice, or a folder of either.")
flags.DEFINE_string("output", None, "predict: the folder for masks, summaries and overlays.")
flags.DEFINE_bool("overwrite", False, "predict: replace existing outputs (refused otherwise).")
flags.DEFINE_string(
    "ground_truth", None, "predict: the expert mask (a file, or a folder of same-named files) for overlays."
)
flags.mark_flags_as_required(["config"])


def default_workdir(config) -> pathlib.Path:
    return pathlib.Path("runs") / config.name


def run(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    from rdunet_jax import evaluate, train

    config = FLAGS.config
    workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(config)
    if FLAGS.mode == "train":
        train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "evaluate":
        evaluate.evaluate_workdir(config, workdir, FLAGS.checkpoint_step)
    else:
        from rdunet_jax import predict

        predict.predict_path(
            config,
            workdir,
            FLAGS.input,
            FLAGS.output,
            overwrite=FLAGS.overwrite,
            checkpoint_step=FLAGS.checkpoint_step,
            ground_truth=FLAGS.ground_truth,
        )


def main(argv) -> None:
    # Orbax logs every checkpoint operation (and each failed read of a damaged one) and TFDS warns about
    # every custom builder config; the command reports progress and problems in its own lines.
    logging.set_verbosity(logging.FATAL)
    from rdunet_jax.train import TrainingStopped

    try:
        run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(128 + stopped.signal_number)


if __name__ == "__main__":
    app.run(main)
