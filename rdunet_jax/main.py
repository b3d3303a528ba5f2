"""Command line: `python -m rdunet_jax.main --config configs/rdunet.py [--workdir DIR] [--mode ...]`.

`--mode predict --input PATH --output DIR [--overwrite]` segments a NIfTI volume, a DICOM series, a PNG/JPEG
slice or a folder of them with the workdir's scored checkpoint (`eval.checkpoint`: best or last).
`--mode export --output FILE.onnx` writes that checkpoint as an ONNX model (for ONNX Runtime, or
`--config.eval.runtime=onnxruntime` in predict).

Parses flags and dispatches; user mistakes end in one line on stderr and exit status 2.
"""

import errno
import pathlib
import re
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rdunet_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/rdunet.py or configs/rdunet.py:unet."
)
flags.DEFINE_string("workdir", None, "Run folder (checkpoints, logs, metrics); default runs/<config name>.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict", "export"],
    "Train (then evaluate), only evaluate, predict, or export the checkpoint to ONNX.",
)
flags.DEFINE_integer(
    "checkpoint_step",
    None,
    "evaluate, predict, export: this checkpoint step, not the one eval.checkpoint names (best or last).",
)
flags.DEFINE_string(
    "input", None, "predict: a NIfTI volume, a PNG/JPEG slice, a folder of either, or a DICOM series folder."
)
flags.DEFINE_string(
    "output", None, "predict: the folder for masks, summaries and overlays; export: the .onnx file."
)
flags.DEFINE_bool("overwrite", False, "predict, export: replace existing outputs (refused otherwise).")
flags.DEFINE_string(
    "ground_truth",
    None,
    "predict: the expert mask (a file, or a folder of same-named files), outlined in the overlays and "
    "scored against.",
)
flags.DEFINE_enum(
    "input_units",
    "hu",
    ["hu", "display"],
    "predict: how volumes hold their values: CT in Hounsfield units (checked: refused without air near "
    "-1000), or display-windowed images in [0, 255] or [0, 1], read as the PNG datasets are.",
)
flags.DEFINE_enum(
    "input_window",
    "as_is",
    ["as_is", "match"],
    "predict: PNG/JPEG slices as they are, or each window-matched to the training slices (its 5th and "
    "95th intensity percentiles mapped onto theirs) for slices exported in another display window.",
)
flags.DEFINE_string(
    "series",
    None,
    "predict: the SeriesInstanceUID to read when the --input folder holds several DICOM series.",
)
flags.mark_flags_as_required(["config"])


FILE_SYSTEM_REFUSALS = {
    errno.ENAMETOOLONG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
}


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's flag parsing, with every mistake (unknown key, bad value, broken config file) on one line."""
    try:
        remaining = FLAGS(argv)
    except flags.Error as error:
        if "Error whilst parsing config file" in str(error):
            # ml_collections wraps a ValueError or TypeError of the file's own code in its traceback, whose
            # last line is the reason.
            _fail(f"--config: cannot load the config file: {_last_line(error)}")
        _fail(str(error).splitlines()[0])
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for `--config.KEY` naming no key of the config: the KeyError's
        # message is "'KEY'" and, for a near miss, a line 'Did you mean "NAME" instead of "KEY"?'.
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        message = str(error.args[0]) if error.args else ""
        key = (message.splitlines() or [""])[0].strip("\"'")
        flag = next(
            (
                arg.split("=")[0]
                for arg in argv
                if arg.startswith("--config.") and key in arg.split("=")[0].split(".")[1:]
            ),
            "--config",
        )
        if flag == "--config":  # no override names it: the config file's own code failed
            _fail(f"--config: cannot load the config file: {type(error).__name__}: {message}".splitlines()[0])
        suggestion = re.search(r'Did you mean "([^"]+)"', message)
        hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
        _fail(f"{flag}: the config has no key {key!r}{hint}")
    except UserError as error:  # raised by a config file's get_config()
        _fail(str(error))
    except OSError as error:  # a config file not found, first read by an override of one of its keys
        _fail(f"--config: cannot load the config file: {_last_line(error)}")
    except Exception as error:  # noqa: BLE001 - a config file is user code: any failure is the user's
        _fail(f"--config: cannot load the config file: {type(error).__name__}: {error}".splitlines()[0])
    try:
        config = FLAGS.config
        # A config file that could not be found or loaded raises when first read: ml_collections >= 1.1
        # returns a stand-in whose every attribute raises the loading error (an OSError).
        getattr(config, "lock", None)
        if not isinstance(config, ml_collections.ConfigDict):
            _fail(
                "--config: get_config() must return an ml_collections.ConfigDict built on "
                f"rdunet_jax.config_lib.base_config(), not {type(config).__name__}"
            )
    except OSError as error:
        _fail(f"--config: cannot load the config file: {_last_line(error)}")
    return remaining


def _last_line(error: Exception) -> str:
    """The reason ml_collections gives last in its loading error ('[Errno 2] No such file ...')."""
    return [line.strip() for line in str(error).splitlines() if line.strip()][-1]


# The modes that read each optional flag: given to another mode, it would be silently ignored (a user
# passing --checkpoint_step to train may expect a resume from that step).
FLAG_MODES = {
    "checkpoint_step": ("evaluate", "predict", "export"),
    "input": ("predict",),
    "output": ("predict", "export"),
    "overwrite": ("predict", "export"),
    "ground_truth": ("predict",),
    "input_units": ("predict",),
    "input_window": ("predict",),
    "series": ("predict",),
}


def check_flags_fit_the_mode() -> None:
    """UserError naming the first flag given that `--mode` does not read."""
    for name, modes in FLAG_MODES.items():
        if FLAGS[name].present and FLAGS.mode not in modes:
            raise UserError(
                f"--{name}: --mode={FLAGS.mode} does not use it (only --mode={' or --mode='.join(modes)})"
            )


def default_workdir(config) -> pathlib.Path:
    return pathlib.Path("runs") / config.name


def run(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags_fit_the_mode()
    config = FLAGS.config
    from rdunet_jax import config_validation

    config_validation.check_complete(config)  # before any key is read
    workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(config)
    if config.selftrain.rounds and FLAGS.mode != "train":  # evaluate, predict, export: the final student
        workdir = workdir / f"student{config.selftrain.rounds}"
    if FLAGS.mode == "train" and config.selftrain.rounds:
        from rdunet_jax import selftrain

        selftrain.run(config, workdir)
    elif FLAGS.mode == "train":
        from rdunet_jax import train

        train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "evaluate":
        from rdunet_jax import evaluate

        evaluate.evaluate_workdir(config, workdir, FLAGS.checkpoint_step)
    elif FLAGS.mode == "export":
        from rdunet_jax import onnx_export

        onnx_export.export_workdir(config, workdir, FLAGS.output, FLAGS.overwrite, FLAGS.checkpoint_step)
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
            input_units=FLAGS.input_units if FLAGS["input_units"].present else None,
            series=FLAGS.series,
            input_window=FLAGS.input_window,
        )


class _Terminated(BaseException):
    """SIGTERM outside the training loop: unwinds like Ctrl-C, so every atomic write removes its temporary
    file (the default action killed the process mid-write and left it)."""


def _raise_terminated(signal_number, frame):
    raise _Terminated


def main(argv) -> None:
    # Orbax logs every checkpoint operation (and each failed read of a damaged one) and TFDS warns about
    # every custom builder config; the command reports progress and problems in its own lines.
    logging.set_verbosity(logging.FATAL)
    from rdunet_jax.train import TrainingStopped

    # The training loop and files.signals_deferred put their own handler in place while they run.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run(argv)
    except UserError as error:
        _fail(str(error))
    except TrainingStopped as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(128 + stopped.signal_number)
    except KeyboardInterrupt:
        # Outside the training loop (which checkpoints on SIGINT), nothing is left to save.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except OSError as error:
        # The file system refused a path (a name too long, a folder that cannot be made, a full disk): one
        # line naming it. Any other OSError, a missing file among them, may be the code's: its traceback.
        if error.filename is None or error.errno not in FILE_SYSTEM_REFUSALS:
            raise
        _fail(f"{error.filename}: {error.strerror}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
