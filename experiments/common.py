"""What the experiment scripts share: timers, random batches, config overrides, reports, the timing phantom.

Standard library only at import time (numpy, jax and the package are imported inside the functions), so a
script that only starts other processes, such as fair_benchmark.py, never loads a framework itself.
"""

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- timing ----------------------------------------------------------------------------------------


def median_seconds(function, repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """(median, every) wall time of `function()` over `repeats` calls after `warmup` untimed ones;
    `function` must block until its result is ready."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    VmHWM, not getrusage's ru_maxrss: a child started by fork and exec inherits the parent's high-water
    mark in ru_maxrss, so a child of a big parent would report the parent's peak.
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_command(command: list[str]) -> tuple[float, float]:
    """Runs `command` (printed first) to completion: (wall seconds, peak RSS in MB of its processes)."""
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# --- inputs ----------------------------------------------------------------------------------------


def prediction_timing_parser(description: str, default_config: str, workdir_help: str):
    """The command line of the `--mode predict` timings: config, workdir, volume size, extra flags."""
    import argparse

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=description, formatter_class=formatter)
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--workdir", required=True, help=workdir_help)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("overrides", nargs="*", help="extra flags, e.g. --config.eval.batch_size=16")
    return parser


def timed_prediction(args, workdir, input_path, output, what: str, prefix=()) -> None:
    """Runs `--mode predict` on `input_path` as the command line does, in a child process (after `prefix`,
    e.g. /usr/bin/time -v), and prints `what` with its wall time, slices/s and peak memory."""
    command = [*prefix, sys.executable, "-m", "rdunet_jax.main", f"--config={args.config}"]
    command += [f"--workdir={workdir}", "--mode=predict", f"--input={input_path}", f"--output={output}"]
    seconds, peak_mb = timed_command([*command, *args.overrides])
    raw_mb = args.slices * args.size * args.size * 4 / 1e6
    print(
        f"{what} in {seconds:.1f}s ({args.slices / seconds:.1f} slices/s); peak RSS {peak_mb:.0f} MB "
        f"(the volume as float32 would be {raw_mb:.0f} MB)"
    )


def random_batch(batch_size: int, image_size: int) -> dict:
    """A phantom-like batch as numpy arrays: uniform images, a sparse mask (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (batch_size, image_size, image_size, 1)
    return {
        "image": rng.random(shape, dtype=np.float32),
        "mask": (rng.random(shape) > 0.9).astype(np.float32),
    }


def phantom_slices(slices: int, size: int):
    """Yields `slices` int16 Hounsfield-unit slices (size, size): a body ellipse of soft tissue with two
    air-filled lungs and a dense blob that moves from slice to slice, plus noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body = (xx / 0.9) ** 2 + (yy / 0.7) ** 2 <= 1
    lungs = ((np.abs(xx) - 0.4) / 0.3) ** 2 + (yy / 0.5) ** 2 <= 1
    base = np.where(body, 40.0, -1000.0)
    base = np.where(lungs, -850.0, base)
    for index in range(slices):
        blob = (xx - 0.4 * np.sin(index / 20)) ** 2 + (yy - 0.1) ** 2 <= 0.01
        image = np.where(lungs & blob, -300.0, base) + rng.normal(0, 20, (size, size))
        yield np.clip(image, -1024, 3000).astype(np.int16)


def first_slices(config, split: str, count: int | None = None):
    """Images and masks (N, S, S, 1) of the first `count` (default: all) slices of `split`, preprocessed
    as evaluation does (no augmentation)."""
    import numpy as np

    from rdunet_jax import datasets, input_pipeline

    source = datasets.load_source(config.data, split)
    count = len(source) if count is None else min(count, len(source))
    examples = [input_pipeline.preprocess(source[index], config.data.image_size) for index in range(count)]
    return np.stack([example["image"] for example in examples]), np.stack([ex["mask"] for ex in examples])


# --- configs ---------------------------------------------------------------------------------------


def _as_tuples(value):
    """JSON lists as (nested) tuples, the form config defaults take."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def _typed(old, text: str):
    """`text` parsed to the type of the config's current value (so '4' stays an int)."""
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(old, (int, float)):
        return type(old)(text)
    if isinstance(old, tuple):
        return _as_tuples(json.loads(text))
    return text


def parse_named_overrides(text: str, flag: str) -> tuple[str, list[str]]:
    """'NAME=KEY=VALUE[,KEY=VALUE]' (the value of `flag`) as (NAME, ['KEY=VALUE', ...])."""
    name, separator, body = text.partition("=")
    overrides = [item for item in body.split(",") if item]
    if not name or not separator or not overrides or not all("=" in item for item in overrides):
        raise SystemExit(f"{flag} {text}: expected NAME=KEY=VALUE[,KEY=VALUE]")
    return name, overrides


def apply_set_items(config, items):
    """`--set KEY=VALUE` items (dotted keys, e.g. model.dtype=bfloat16) applied to `config` (returned),
    each value parsed to the type of the one it replaces."""
    from rdunet_jax import config_lib

    for item in items:
        key, _, text = item.partition("=")
        current = config
        for part in key.split("."):
            current = current[part]
        config_lib.apply_overrides(config, {key: _typed(current, text)})
    return config


def load_config(spec: str, overrides=()):
    """`configs/NAME.py[:ARGUMENT]`'s get_config, with `--set KEY=VALUE` overrides."""
    from rdunet_jax import config_lib

    path, _, argument = spec.partition(":")
    module = config_lib.config_module(path)
    config = module.get_config(argument) if argument else module.get_config()
    return apply_set_items(config, overrides)


def mode_name(model_config) -> str:
    """The compute dtype plus every speed option away from the config default, e.g.
    'bfloat16+dropout_impl=flax'."""
    from rdunet_jax import config_lib

    defaults = config_lib.base_config().model
    parts = [model_config.dtype]
    for key in config_lib.SPEED_OPTIONS:
        value = model_config.get(key)
        if value != defaults[key]:
            parts.append(key if value is True else f"{key}={value}")
    return "+".join(parts)


# --- child processes -------------------------------------------------------------------------------


def module_command(module: str) -> list[str]:
    """This interpreter running `experiments.<module>` as a fresh process (see `child_environment`)."""
    return [sys.executable, "-m", f"experiments.{module}"]


def child_environment() -> dict:
    """This environment with the checkout last on PYTHONPATH, so a child finds `experiments` from any
    folder while this checkout's own path order (the current folder first) is kept."""
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO_ROOT)])}


# --- reports ---------------------------------------------------------------------------------------


def format_cell(value, digits: int) -> str:
    """A table cell: `value` with `digits` decimals, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def environment() -> dict:
    """What ran the experiment: versions, devices, CPU and XLA flags."""
    import platform

    import jax

    return {
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def save_json(report: dict, path: str) -> None:
    """Writes `report` as indented JSON to `path` ('' skips): also what is measured so far, so a run cut
    short by a time limit still leaves its figures."""
    if path:
        pathlib.Path(path).write_text(json.dumps(report, indent=2) + "\n")


def print_and_save(report: dict, table: str, json_path: str, markdown_path: str) -> None:
    """Prints the markdown table and saves it and the JSON report where asked ('' skips)."""
    print(table, flush=True)
    save_json(report, json_path)
    if markdown_path:
        pathlib.Path(markdown_path).write_text(table)
