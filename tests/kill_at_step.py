"""The command line with the process SIGKILLed right after a given train step (the resume tests' fault).

    python -m tests.kill_at_step STEP -- <rdunet_jax.main arguments>

Wraps the train step the loop compiles (`train.compiled_train_step`), so the kill comes after step STEP
has run and before anything the loop does with its result (a log line, a checkpoint); a run resumed from
an earlier checkpoint counts its steps from there, as the loop does.
"""

import os
import signal
import sys

from absl import app

from rdunet_jax import main, train


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


def run(argv: list[str]) -> None:
    if len(argv) < 3 or argv[2] != "--" or not argv[1].isdigit():
        sys.exit(f"usage: python -m tests.kill_at_step STEP -- <rdunet_jax.main arguments>, not {argv[1:]}")
    train.compiled_train_step = _killing_after(int(argv[1]), train.compiled_train_step)
    sys.argv = ["rdunet_jax.main", *argv[3:]]
    app.run(main.main, flags_parser=main.parse_flags)


if __name__ == "__main__":
    run(sys.argv)
