"""One training command under config variants, timed the way a user runs it: each variant in its own
fresh process, alternating rounds (A B, B A, A B, ...: each round starts with the next variant), nothing
of ours running beside it. Checks too that the variants ended on the same result (their final
evaluations' metrics, to every digit), for variants meant to change only the time:

    python -m experiments.config_variants_ab --config configs/semiseg.py --epochs 20 --rounds 3 \\
        --set data.manual_dir=../shared/data/covid-semiseg --set checkpoint_every_epochs=10 \\
        --variant validate1=eval.validate_every_epochs=1 --variant validate10=eval.validate_every_epochs=10 \\
        --json OUT.json --markdown OUT.md

An override `env.NAME=VALUE` (in `--set` or a variant) sets an environment variable of the children
instead of a config key, e.g. XLA's flags:
`--variant ynn_off=env.XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`.

An untimed one-epoch child of each variant prepares the dataset and fills the compilation cache first,
so every timed child finds both. Per child: its wall time, and the sum of its train log's epoch
times (the epochs alone: no start-up or final evaluation; the first epoch holds the compilation or its
load from the cache, and each epoch its validation and saves). Per variant: the medians over
rounds; `ratio`: the median over rounds of each round's ratio to the first variant (a round's children
ran minutes apart, so a shared machine's drifting load cancels better). The 1-minute load average before
each child is recorded; it still holds the previous child's load, so it shows other work only above ~2 on
2 cores: compare only figures taken on a quiet machine.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import common  # standard library only at import time

# The final evaluation's figures compared across variants.
RESULT_KEYS = ("dice", "loss", "precision", "recall", "step")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=KEY=VALUE[,KEY=VALUE]' as (NAME, ['KEY=VALUE', ...])."""
    return common.parse_named_overrides(text, "--variant")


def parse_args(argv=None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--scratch", default="", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args(argv)
    args.variants = [parse_variant(text) for text in args.variant]
    if len(args.variants) < 2 or len({name for name, _ in args.variants}) != len(args.variants):
        raise SystemExit("--variant: give at least two, with different names")
    if args.epochs < 1 or args.rounds < 1:
        raise SystemExit("--epochs and --rounds: must be positive")
    return args


ENV_PREFIX = "env."


def environment_overrides(args, overrides: list[str]) -> dict:
    """The `env.NAME=VALUE` items of the shared settings, then the variant's, as {NAME: VALUE}."""
    items = [*args.set, *overrides]
    return dict(item.removeprefix(ENV_PREFIX).split("=", 1) for item in items if item.startswith(ENV_PREFIX))


def child_command(args, overrides: list[str], workdir: pathlib.Path, data_dir: pathlib.Path, epochs: int):
    """The main command line of one child: the config, the shared settings, then the variant's config
    keys (its `env.` items set the child's environment instead)."""
    config_items = [item for item in [*args.set, *overrides] if not item.startswith(ENV_PREFIX)]
    flags = [f"--config.{item}" for item in config_items]
    flags += [f"--config.num_epochs={epochs}", f"--config.data.data_dir={data_dir}"]
    return [
        sys.executable,
        "-m",
        "rdunet_jax.main",
        f"--config={args.config}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_child(command: list[str], workdir: pathlib.Path, environment: dict | None = None) -> dict:
    """Runs one child to its end (`environment` added to ours): wall seconds, the train log's epoch
    seconds, the final metrics."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child_environment = {**common.child_environment(), **(environment or {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=child_environment)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    records = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines() if line]
    # The split training ended by evaluating: test when the data has one, else validation.
    found = [workdir / "metrics" / f"{split}.json" for split in ("test", "validation")]
    metrics = json.loads(next(path for path in found if path.is_file()).read_text())
    return {
        "wall_s": wall,
        "epochs_s": sum(record["seconds"] for record in records),
        "load_before": load_before,
        "result": {key: metrics.get(key) for key in RESULT_KEYS},
    }


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """Per variant: median wall and epoch seconds over rounds, the median per-round ratio to the first
    variant, and whether every child's result equals the first variant's first child's."""
    reference = names[0]
    first_result = rounds[0][reference]["result"]
    summary = {}
    for name in names:
        children = [one_round[name] for one_round in rounds]
        summary[name] = {
            "wall_s": statistics.median(child["wall_s"] for child in children),
            "epochs_s": statistics.median(child["epochs_s"] for child in children),
            "ratio_wall": statistics.median(
                one_round[name]["wall_s"] / one_round[reference]["wall_s"] for one_round in rounds
            ),
            "ratio_epochs": statistics.median(
                one_round[name]["epochs_s"] / one_round[reference]["epochs_s"] for one_round in rounds
            ),
            "same_result": all(child["result"] == first_result for child in children),
        }
    return summary


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['config']}, {report['epochs']} epochs, {report['rounds']} rounds (medians; ratios per "
        f"round against {report['variants'][0]['name']})",
        "",
        "| variant | overrides | wall s | epochs s | ratio (wall) | ratio (epochs) | same result |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in report["variants"]:
        row = report["summary"][variant["name"]]
        lines.append(
            f"| {variant['name']} | `{','.join(variant['overrides'])}` | {row['wall_s']:.1f} | "
            f"{row['epochs_s']:.1f} | {row['ratio_wall']:.3f} | {row['ratio_epochs']:.3f} | "
            f"{'yes' if row['same_result'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="config_ab_"))
    data_dir = scratch / "data"
    names = [name for name, _ in args.variants]
    report = {
        "config": args.config,
        "set": args.set,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "variants": [{"name": name, "overrides": overrides} for name, overrides in args.variants],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "children": [],
    }
    # Each variant's compiled programs are cached apart (XLA flags are part of the cache's key).
    for name, overrides in args.variants:
        warmup = scratch / f"warmup-{name}"
        run_child(
            child_command(args, overrides, warmup, data_dir, 1),
            warmup,
            environment_overrides(args, overrides),
        )
        shutil.rmtree(warmup)
    rounds = []
    for round_index in range(args.rounds):
        # Each round starts with the next variant, so no variant always runs first.
        order = args.variants[round_index % len(names) :] + args.variants[: round_index % len(names)]
        one_round = {}
        for name, overrides in order:
            workdir = scratch / f"{name}-{round_index}"
            command = child_command(args, overrides, workdir, data_dir, args.epochs)
            child = run_child(command, workdir, environment_overrides(args, overrides))
            shutil.rmtree(workdir)
            one_round[name] = child
            report["children"].append({"round": round_index, "variant": name, **child})
            print(
                f"round {round_index} {name}: {child['wall_s']:.1f} s ({child['epochs_s']:.1f} s of epochs)"
            )
            common.save_json(report, args.json)
        rounds.append(one_round)
    report["summary"] = summarize(rounds, names)
    common.print_and_save(report, markdown_table(report), args.json, args.markdown)
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
