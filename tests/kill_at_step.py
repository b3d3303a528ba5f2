"""The command line with the process SIGKILLed right after a given train step, or after a given number of
pseudo-labels written (the resume tests' faults).

    python -m tests.kill_at_step STEP -- <rdunet_jax.main arguments>
    python -m tests.kill_at_step pseudo_labels:SLICES -- <rdunet_jax.main arguments>

Wraps the train step the loop compiles (`train.compiled_train_step`), so the kill comes after step STEP
has run and before anything the loop does with its result (a log line, a checkpoint); a run resumed from
an earlier checkpoint counts its steps from there, as the loop does. With `pseudo_labels:SLICES` it wraps
self-training's PNG writer and kills once SLICES slices have their mask and weight map written.
"""

import os
import signal
import sys

from absl import app

from rdunet_jax import main, selftrain, train


def _killing_after(kill_at_step: int, compile_step):
    def compile_killing_step(*args, **kwargs):
        step_function = compile_step(*args, **kwargs)

        def step_then_maybe_kill(state, batch):
            state, step_metrics = step_function(state, batch)
            if int(state.step) == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return state, step_metrics

        return step_then_maybe_kill

    return compile_killing_step


def _killing_after_files(count: int, write_png):
    written = []

    def write_then_maybe_kill(path, array):
        write_png(path, array)
        written.append(path)
        if len(written) == count:
            os.kill(os.getpid(), signal.SIGKILL)

    return write_then_maybe_kill


def run(argv: list[str]) -> None:
    fault = argv[1] if len(argv) > 1 else ""
    slices = fault.removeprefix("pseudo_labels:")
    if len(argv) < 3 or argv[2] != "--" or not (fault.isdigit() or (slices != fault and slices.isdigit())):
        sys.exit(
            "usage: python -m tests.kill_at_step STEP|pseudo_labels:SLICES -- <rdunet_jax.main arguments>, "
            f"not {argv[1:]}"
        )
    if fault.isdigit():
        train.compiled_train_step = _killing_after(int(fault), train.compiled_train_step)
    else:  # each slice writes two PNGs, its mask and its weight map
        selftrain._write_png = _killing_after_files(2 * int(slices), selftrain._write_png)
    sys.argv = ["rdunet_jax.main", *argv[3:]]
    app.run(main.main, flags_parser=main.parse_flags)


if __name__ == "__main__":
    run(sys.argv)
