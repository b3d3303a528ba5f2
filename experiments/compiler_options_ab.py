"""XLA compiler options side by side in one process: the train step (or the inference forward pass)
compiled once per variant, then run round-robin, one call of each per round (each round starting with the
next variant).

    python -m experiments.compiler_options_ab --image_size 256 --rounds 5 \\
        --option xla_default='{"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}' \\
        --option ynn_off='{"xla_cpu_experimental_ynn_fusion_type": ""}' --json OUT.json
    python -m experiments.compiler_options_ab --what infer --batch_size 16 --option ...

The reference is the project's own compilation (`steps.COMPILER_OPTIONS` for the train step,
`steps.EVAL_COMPILER_OPTIONS` for inference); each `--option NAME=JSON` adds those XLA debug options on
top. Per variant it reports XLA's temporary memory, the compile time, the median seconds per call, the
median over rounds of each round's time ratio to the reference (below 1 is faster) and the largest
difference of its output from the reference's (loss for `train`, probabilities for `infer`). Unlike
XLA_FLAGS, which a process reads once, options given per compilation share one process, one load and one
set of inputs, so the ratios hold up on a busy machine. Any `--set` config override
applies to every variant; `--model_option NAME=KEY=VALUE,...` adds a variant with its own config
overrides (the speed options of `config_lib.SPEED_OPTIONS`, which keep the parameters), e.g.
`--model_option pool_reshape=model.pool_impl=reshape`.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

from experiments import benchmark, common


def parse_args(argv=None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--what", choices=("train", "infer"), default="train")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", default="rdunet", help="one of the paper's model variants")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=JSON", help="repeatable")
    parser.add_argument(
        "--model_option",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="a variant with these config overrides (speed options: same parameters), repeatable",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    return parser.parse_args(argv)


def parse_option(text: str) -> tuple[str, dict]:
    """'NAME={"xla_...": value}' as (NAME, options)."""
    name, separator, body = text.partition("=")
    try:
        options = json.loads(body) if separator else None
    except json.JSONDecodeError as error:
        raise SystemExit(f"--option {text}: not NAME=JSON ({error.msg})") from None
    if not name or not isinstance(options, dict):
        raise SystemExit(f"--option {text}: expected NAME={{...}}, a JSON object of XLA options")
    return name, options


def parse_model_option(text: str) -> tuple[str, list[str]]:
    """'NAME=model.pool_impl=reshape,model.dropout_impl=bits' as (NAME, ['model.pool_impl=reshape', ...])."""
    return common.parse_named_overrides(text, "--model_option")


def build_function(args, config):
    """(function to compile, its arguments, the output to compare) for `--what`."""
    import jax

    from rdunet_jax import inference, models, steps

    model = models.build_model(config.model)
    if args.what == "train":
        state = steps.create_train_state(config, model, steps_per_epoch=20)
        batch = jax.device_put(common.random_batch(args.batch_size, args.image_size))
        return steps.train_step.__wrapped__, (state, batch), lambda output: output[1]["loss"]
    variables = models.initialize_variables(model, args.image_size, config.seed)
    state = inference.JaxPredictor.from_variables(model, variables).state
    batch = jax.device_put(common.random_batch(args.batch_size, args.image_size))
    return steps.eval_step.__wrapped__, (state, batch), lambda output: output["probabilities"]


def run(args) -> dict:
    import jax
    import numpy as np

    from rdunet_jax import steps

    project = steps.COMPILER_OPTIONS if args.what == "train" else steps.EVAL_COMPILER_OPTIONS
    variants = {"project": (dict(project), [])}
    for text in args.option:
        name, options = parse_option(text)
        variants[name] = ({**project, **options}, [])
    for text in args.model_option:
        name, overrides = parse_model_option(text)
        variants[name] = (dict(project), overrides)
    jax.config.update("jax_enable_compilation_cache", False)  # compile every variant for real
    compiled, inputs, rows, built = {}, {}, {}, {}
    for name, (options, overrides) in variants.items():
        if tuple(overrides) not in built:  # compiler options alone share the project's model and inputs
            benchmark_args = benchmark.parse_args(
                ["--batch_size", str(args.batch_size), "--variant", args.variant]
            )
            benchmark_args.set = args.set + overrides
            # Speed options leave the parameters as they are: every variant starts from the same values.
            built[tuple(overrides)] = build_function(
                args, benchmark.make_config(benchmark_args, args.image_size)
            )
        function, inputs[name], output_of = built[tuple(overrides)]
        started = time.perf_counter()
        compiled[name] = jax.jit(function, compiler_options=options).lower(*inputs[name]).compile()
        rows[name] = {
            "options": options,
            "config_overrides": overrides,
            "compile_s": time.perf_counter() - started,
            "temp_mb": compiled[name].memory_analysis().temp_size_in_bytes / 2**20,
        }
    reference = np.asarray(output_of(compiled["project"](*inputs["project"])))
    for name, executable in compiled.items():  # also the warm-up call
        difference = np.max(np.abs(np.asarray(output_of(executable(*inputs[name]))) - reference))
        rows[name]["max_difference_vs_project"] = float(difference)
    times = {name: [] for name in compiled}
    names = list(compiled)
    for round_index in range(args.rounds):
        # Each round starts one variant later, so no variant always runs first (after the others' caches).
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs[name]))
            times[name].append(time.perf_counter() - started)
    for name, row in rows.items():
        row["median_s"] = statistics.median(times[name])
        row["times_s"] = times[name]
        ratios = [ours / theirs for ours, theirs in zip(times[name], times["project"], strict=True)]
        row["ratio_vs_project"] = statistics.median(ratios)
    return {
        "what": args.what,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "config_overrides": args.set,
        "variants": rows,
        "environment": common.environment(),
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
    }


def markdown_table(report: dict) -> str:
    per = "call" if report["what"] == "train" else "slice"
    divisor = 1 if report["what"] == "train" else report["batch_size"]
    lines = [
        f"| variant ({report['what']}, {report['image_size']} px, batch {report['batch_size']}) "
        f"| ms per {per} | ratio vs project | XLA temp (MB) | max difference | compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        lines.append(
            f"| {name} | {1e3 * row['median_s'] / divisor:.1f} | {row['ratio_vs_project']:.3f} "
            f"| {row['temp_mb']:.0f} | {row['max_difference_vs_project']:.1e} | {row['compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    common.print_and_save(report, markdown_table(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
