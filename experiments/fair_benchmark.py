"""JAX's train step against PyTorch's reference the way a user compares them: each framework alone in a
fresh process, alternating.

    python -m experiments.fair_benchmark --torch_python /work/torchenv/bin/python \\
        --image_size 256 --batch_size 8 --rounds 7 --json OUT.json --markdown OUT.md
    python -m experiments.fair_benchmark ... --set model.dtype=bfloat16 --torch_variants clbf16
    python -m experiments.fair_benchmark ... --what infer --batch_size 16 --set eval.runtime=onnxruntime
    python -m experiments.fair_benchmark ... --probe_living_parent   # what a living JAX process costs

Each round runs one fresh JAX process (compile, two untimed steps as the PyTorch script takes, then
`--steps` timed steps), then one fresh PyTorch process per variant: JAX, PyTorch, JAX, PyTorch, ...
With `--what infer` a step is one inference batch (sigmoid probabilities, evaluation's BatchNorm) in the
runtime `eval.runtime` names: XLA ('jax') or the ONNX export in ONNX Runtime ('onnxruntime').
This process only starts them, one at a time; it imports neither jax nor torch (benchmark.py imports jax
inside its functions), so nothing else of ours runs while a child is timed.

Per framework: the median over rounds of each child's median step. `ratio_vs_torch_<variant>`: the
median over rounds of each round's JAX/PyTorch ratio (paired: a round's children ran a minute apart, so
a shared machine's drifting load cancels better than in `ratio_of_medians_vs_torch_<variant>`).
The load average before each child is recorded: compare only figures taken on a quiet machine.

`--probe_living_parent` measures instead what a living JAX process costs a PyTorch child started from it
(benchmark.py's former method): per round, the PyTorch child started from this thin process, then from
a JAX process that has just trained, with an ONNX Runtime session open after inference, and after
closing it; with the JAX parent's CPU seconds and resident memory while each child ran.
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

from experiments import benchmark, common  # standard library only at import time

# The reference model beside the project: ../shared/peers from the main checkout.
DEFAULT_TORCH_SCRIPT = common.REPO_ROOT.parent / "shared" / "peers" / "torch_rdunet.py"

TORCH_VARIANTS = ("eager", "cl", "bf16", "clbf16")
# The PyTorch child's conditions in --probe_living_parent, in the order each round runs them.
PROBE_CONDITIONS = (
    "fresh",
    "child_of_living_jax",
    "child_of_living_jax_with_onnxruntime",
    "child_of_living_jax_onnxruntime_closed",
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`--set` overrides as in benchmark.py)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--what", choices=("train", "infer"), default="train", help="what a step is")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each child")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--variant", default="rdunet", help="one of the paper's model variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="JAX config override")
    parser.add_argument("--torch_python", required=True, help="interpreter of a PyTorch environment")
    parser.add_argument("--torch_script", default=str(DEFAULT_TORCH_SCRIPT))
    variants_help = "comma-separated: " + ", ".join(TORCH_VARIANTS)
    parser.add_argument("--torch_variants", default="cl", help=variants_help)
    parser.add_argument("--probe_living_parent", action="store_true", help="see the module docstring")
    parser.add_argument("--json", default="", help="where to save the JSON")
    parser.add_argument("--markdown", default="", help="where to save the markdown table")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.torch_variants = [name for name in args.torch_variants.split(",") if name]
    for name in args.torch_variants:
        if name not in TORCH_VARIANTS:
            parser.exit(2, f"--torch_variants: unknown variant {name!r} (one of {variants_help})\n")
    if shutil.which(args.torch_python) is None:
        parser.exit(2, f"--torch_python: no interpreter {args.torch_python}\n")
    if not pathlib.Path(args.torch_script).is_file():
        parser.exit(2, f"--torch_script: no file {args.torch_script}\n")
    if args.rounds < 1 or args.steps < 1:
        parser.exit(2, "--rounds and --steps must be at least 1\n")
    for option in ("json", "markdown"):
        folder = pathlib.Path(getattr(args, option) or ".").resolve().parent
        if not folder.is_dir():
            parser.exit(2, f"--{option}: no folder {folder}\n")
    return args


# --- children --------------------------------------------------------------------------------------


def run_result_child(command: list[str]) -> dict:
    """Runs `command` to its end; its last `RESULT {json}` line as a dict, with the load average at
    its start."""
    load_before = os.getloadavg()[0]
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=common.child_environment()
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        failure = f"{' '.join(command)} failed ({completed.returncode})"
        raise RuntimeError(f"{failure}:\n{completed.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "load_before": load_before}


def call_seconds(result: dict) -> float:
    """A child's median seconds per step: a train step, or an inference batch (`batch_median_s`, the
    PyTorch script's name)."""
    return result["step_median_s"] if "step_median_s" in result else result["batch_median_s"]


def jax_command(args, role: str) -> list[str]:
    """This script as a fresh JAX child in `role` ('jax' times steps, 'probe' is a living parent)."""
    command = [*common.module_command("fair_benchmark"), "--_child", role, "--what", args.what]
    command += ["--image_size", str(args.image_size), "--batch_size", str(args.batch_size)]
    command += ["--steps", str(args.steps), "--variant", args.variant]
    command += ["--torch_python", args.torch_python, "--torch_script", args.torch_script]
    command += ["--torch_variants", ",".join(args.torch_variants)]
    for item in args.set:
        command += ["--set", item]
    return command


def torch_command(args, variant: str) -> list[str]:
    """The PyTorch reference script training (or inferring) with `variant` (channels-last, autocast, ...)."""
    sizes = [str(args.image_size), str(args.batch_size)]
    return [args.torch_python, args.torch_script, args.what, *sizes, variant, str(args.steps)]


def contenders(args) -> list[tuple[str, list[str]]]:
    """(name, command) in the order each round runs them: JAX, then each PyTorch variant."""
    return [("jax", jax_command(args, "jax"))] + [
        (f"torch_{variant}", torch_command(args, variant)) for variant in args.torch_variants
    ]


def run_rounds(named_commands, rounds: int, run=run_result_child) -> dict[str, list[dict]]:
    """Each round runs every command once, in order, each to its end before the next starts."""
    results: dict[str, list[dict]] = {name: [] for name, _ in named_commands}
    for round_index in range(rounds):
        for name, command in named_commands:
            result = run(command)
            results[name].append(result)
            print(f"round {round_index + 1}/{rounds} {name}: {call_seconds(result):.3f} s", flush=True)
    return results


def jax_train_child(args) -> None:
    """Runs as a fresh process: compiles the benchmark's train step, times it, prints a RESULT line."""
    import jax

    from rdunet_jax import models

    timer, config = _trained_timer(args)
    timer.run(args.steps)
    result = {
        "step_median_s": statistics.median(timer.times),
        "steps_s": timer.times,
        "mode": common.mode_name(config.model),
        "jax": jax.__version__,
        "parameters": models.count_parameters(timer.state.params),
        "peak_rss_mb": common.peak_rss_mb(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def jax_infer_child(args) -> None:
    """Runs as a fresh process: times inference batches in the runtime `eval.runtime` names."""
    import jax

    from rdunet_jax import models

    config = benchmark.make_config(_benchmark_args(args), args.image_size)
    model = models.build_model(config.model)
    variables = models.initialize_variables(model, args.image_size, config.seed)
    host_images = common.random_batch(args.batch_size, args.image_size)["image"]
    if config.eval.runtime == "onnxruntime":
        session = benchmark.onnxruntime_model(config, model, variables, args.image_size)

        def infer():
            session.probabilities(host_images)

        runtime = "onnxruntime"
    else:
        images = jax.device_put(host_images)
        compiled, arguments = benchmark.compiled_inference(model, variables, images)

        def infer():
            jax.block_until_ready(compiled(*arguments))

        runtime = "xla"

    # Two untimed calls, as the PyTorch script's warm-up.
    seconds, times = common.median_seconds(infer, args.steps, warmup=2)
    result = {
        "batch_median_s": seconds,
        "batches_s": times,
        "mode": f"{common.mode_name(config.model)}+{runtime}",
        "jax": jax.__version__,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _trained_timer(args):
    """(TrainTimer past two untimed steps, config) of the benchmark's compiled train step."""
    from rdunet_jax import models

    config = benchmark.make_config(_benchmark_args(args), args.image_size)
    model = models.build_model(config.model)
    batch = common.random_batch(args.batch_size, args.image_size)
    compiled, state, _, _ = benchmark.compiled_train_step(config, model, batch)
    timer = benchmark.TrainTimer(compiled, state, batch)  # one untimed step
    timer.run(1, record=False)  # a second, as the PyTorch script's warm-up
    return timer, config


def _benchmark_args(args) -> argparse.Namespace:
    """benchmark.py's arguments for the same model (what its make_config reads)."""
    argv = ["--batch_size", str(args.batch_size), "--variant", args.variant]
    return benchmark.parse_args(argv + [part for item in args.set for part in ("--set", item)])


# --- what a living JAX parent costs its PyTorch child ----------------------------------------------


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads, not its children) has used."""
    times = os.times()
    return times.user + times.system


def timed_torch_child(args, variant: str) -> dict:
    """A PyTorch child's result, with this process's CPU seconds and resident memory while it ran."""
    cpu_before = own_cpu_seconds()
    result = run_result_child(torch_command(args, variant))
    result["parent_cpu_s_during_child"] = own_cpu_seconds() - cpu_before
    result["parent_rss_mb"] = current_rss_mb()
    return result


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (VmRSS)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def probe_child(args) -> None:
    """Runs as a JAX process that stays alive, as benchmark.py's process did while its PyTorch children
    ran: trains, then starts PyTorch children while idle, with an ONNX Runtime session open, and after
    closing it."""
    import jax

    from rdunet_jax import models

    timer, config = _trained_timer(args)
    variant = args.torch_variants[0]
    results = {}
    timer.run(args.steps, record=False)  # as the old round loop: JAX steps right before the child
    results["child_of_living_jax"] = timed_torch_child(args, variant)
    model = models.build_model(config.model)
    variables = models.initialize_variables(model, args.image_size, config.seed)
    session = benchmark.onnxruntime_model(config, model, variables, args.image_size)
    if session is not None:  # without the onnx extra: only the idle-JAX condition
        images = common.random_batch(args.batch_size, args.image_size)["image"]
        for _ in range(3):
            session.probabilities(images)
        results["child_of_living_jax_with_onnxruntime"] = timed_torch_child(args, variant)
        del session
        gc.collect()
        results["child_of_living_jax_onnxruntime_closed"] = timed_torch_child(args, variant)
    print("RESULT " + json.dumps({"conditions": results, "jax": jax.__version__}), flush=True)


def run_probe(args, run=run_result_child) -> tuple[dict[str, list[dict]], list[dict]]:
    """Rounds of: a PyTorch child of this thin process, then one living JAX parent's PyTorch children.
    Returns the PyTorch children's results by condition and the living parents' own results."""
    by_condition: dict[str, list[dict]] = {name: [] for name in PROBE_CONDITIONS}
    parents = []
    for round_index in range(args.rounds):
        by_condition["fresh"].append(run(torch_command(args, args.torch_variants[0])))
        parents.append(run(jax_command(args, "probe")))
        for name, result in parents[-1].pop("conditions").items():
            by_condition[name].append(result)
        steps = {name: call_seconds(runs[-1]) for name, runs in by_condition.items() if runs}
        print(f"round {round_index + 1}/{args.rounds}: {json.dumps(steps)}", flush=True)
    return {name: runs for name, runs in by_condition.items() if runs}, parents


# --- summary and report ----------------------------------------------------------------------------


def summarize(step_s: dict[str, list[float]]) -> dict:
    """Medians per contender and, for each PyTorch one, JAX's per-round ratios, their median (paired)
    and the ratio of the medians. `step_s` maps 'jax' and 'torch_<variant>' to seconds by round."""
    summary = {}
    for name, seconds in step_s.items():
        summary[f"{name}_step_s"] = statistics.median(seconds)
        summary[f"{name}_step_s_by_round"] = list(seconds)
    for name, seconds in step_s.items():
        if name == "jax":
            continue
        variant = name[len("torch_") :]
        ratios = [ours / theirs for ours, theirs in zip(step_s["jax"], seconds, strict=True)]
        summary[f"ratio_vs_torch_{variant}_by_round"] = ratios
        summary[f"ratio_vs_torch_{variant}"] = statistics.median(ratios)
        summary[f"ratio_of_medians_vs_torch_{variant}"] = summary["jax_step_s"] / summary[f"{name}_step_s"]
    return summary


def summarize_probe(by_condition: dict[str, list[dict]]) -> dict:
    """Per condition: the PyTorch child's median step, its ratio to the fresh child's (median over
    rounds of each round's ratio), and the living parent's CPU seconds and memory while it ran."""
    summary = {}
    fresh = [call_seconds(run) for run in by_condition["fresh"]]
    for name, runs in by_condition.items():
        seconds = [call_seconds(run) for run in runs]
        row = {
            "torch_step_s": statistics.median(seconds),
            "torch_step_s_by_round": seconds,
            "ratio_vs_fresh": statistics.median(s / f for s, f in zip(seconds, fresh, strict=True)),
            "load_before_by_round": [run["load_before"] for run in runs],
        }
        if name != "fresh":
            row["parent_cpu_s_during_child_by_round"] = [run["parent_cpu_s_during_child"] for run in runs]
            row["parent_rss_mb"] = max(run["parent_rss_mb"] for run in runs)
        summary[name] = row
    return summary


def markdown_table(report: dict) -> str:
    """One row per round and a row of medians (paired ratio) per PyTorch variant."""
    variants = report["torch_variants"]
    step = "step" if report["what"] == "train" else f"batch of {report['batch_size']}"
    header = f"| round | load | JAX {step} (s) | " + " | ".join(
        f"PyTorch {v} (s) | JAX/PyTorch {v}" for v in variants
    )
    lines = [header + " |", "|---" * (3 + 2 * len(variants)) + "|"]
    for index in range(report["rounds"]):
        cells = [str(index + 1), f"{report['load_before_by_round'][index]:.1f}"]
        cells.append(f"{report['jax_step_s_by_round'][index]:.3f}")
        for v in variants:
            cells.append(f"{report[f'torch_{v}_step_s_by_round'][index]:.3f}")
            cells.append(f"{report[f'ratio_vs_torch_{v}_by_round'][index]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["median", "", f"**{report['jax_step_s']:.3f}**"]
    for v in variants:
        cells += [f"**{report[f'torch_{v}_step_s']:.3f}**", f"**{report[f'ratio_vs_torch_{v}']:.3f}**"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def probe_markdown_table(report: dict) -> str:
    """One row per condition of --probe_living_parent."""
    lines = [
        "| PyTorch child started from | step (s), median | by round | ratio vs fresh "
        "| parent CPU s while it ran | parent RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["conditions"].items():
        cpu = row.get("parent_cpu_s_during_child_by_round")
        by_round = ", ".join(f"{seconds:.3f}" for seconds in row["torch_step_s_by_round"])
        lines.append(
            f"| {name} | {row['torch_step_s']:.3f} | {by_round} "
            f"| {row['ratio_vs_fresh']:.3f} | {'-' if cpu is None else ', '.join(f'{c:.2f}' for c in cpu)} "
            f"| {common.format_cell(row.get('parent_rss_mb'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def environment(results: list[dict]) -> dict:
    """What ran the benchmark, read from the children's results (this process has no jax or torch)."""
    versions = {key: run[key] for run in results for key in ("jax", "torch", "threads") if key in run}
    return {
        **versions,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._child == "jax":
        if args.what == "train":
            jax_train_child(args)
        else:
            jax_infer_child(args)
        return {}
    if args._child == "probe":
        probe_child(args)
        return {}
    started = time.time()
    settings = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "config_overrides": args.set,
        "torch_variants": args.torch_variants,
    }
    if args.probe_living_parent:
        by_condition, parents = run_probe(args)
        report = {**settings, "what": "probe_living_parent", "conditions": summarize_probe(by_condition)}
        report["children"], report["living_parents"] = by_condition, parents
        table = probe_markdown_table(report)
    else:
        children = run_rounds(contenders(args), args.rounds)
        report = {**settings, "what": args.what, "mode": children["jax"][0]["mode"]}
        step_s = {name: [call_seconds(run) for run in runs] for name, runs in children.items()}
        report.update(summarize(step_s))
        report["load_before_by_round"] = [run["load_before"] for run in children["jax"]]
        report["children"] = children
        table = markdown_table(report)
    results = [run for runs in report["children"].values() for run in runs]
    report["environment"] = environment(results + report.get("living_parents", []))
    report["wall_s"] = time.time() - started
    report["command"] = " ".join([pathlib.Path(sys.executable).name, *sys.argv])
    common.print_and_save(report, table, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
