"""Mutation testing with mutmut 3: the staged copy it mutates, and the score table of its results.

`prepare MODULE` copies the package, the tests and the mutmut config into a work folder (`.mutation/MODULE`)
that mutates that module alone under the tests that exercise it (TESTS below), with every decorated function
of the module rewritten as a plain `def` followed by `name = decorator(name)`: mutmut 3 never mutates a
decorated function, and nearly all the model's arithmetic lives in `@nn.compact` methods (and in
`@jax.custom_vjp` / `@jax.jit` functions). Same program, other spelling.

`report` reads mutmut's verdicts from the work folders and prints, per module, the mutants, killed,
equivalent (listed with a reason in experiments/results/mutation/equivalent.txt), survivors and the score
killed / (mutants - equivalent), then every survivor with its diff.
"""

import argparse
import ast
import collections
import json
import pathlib
import random
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EQUIVALENT_LIST = REPO_ROOT / "experiments" / "results" / "mutation" / "equivalent.txt"
# What the mutants' tests need besides the package: the tests, the tiny configs the fixtures load, the README
# (whose figures test_reference_forward checks), the docs (test_config_lib checks that reference.md names
# every key), the mutmut config, the fork server's preload list, and the experiments' code that some tests
# run (test_selftrain's pool-intensity report), without their results.
STAGED_PATHS = (
    "rdunet_jax",
    "tests",
    "configs",
    "README.md",
    "docs",
    "pyproject.toml",
    "experiments",
)
NOT_STAGED = ("__pycache__", "results", "runs")  # runs: study workdirs (gitignored), written as we copy
TEST_CACHE = REPO_ROOT / ".pytest_cache" / "xla"  # tests/conftest.py's persistent compilation cache
# The fast test files that exercise each mutated module; a mutant runs those of their tests that call its
# function (mutmut's own per-function selection), stopping at the first failure.
TESTS = {
    "losses": ["tests/test_losses.py"],
    "metrics": ["tests/test_metrics.py"],
    "models": ["tests/test_models.py", "tests/test_reference_forward.py"],
    "layers": ["tests/test_layers.py", "tests/test_models.py", "tests/test_reference_forward.py"],
    # Issue #27's semi-supervised code: pseudo-label thresholding, the stages, the parameters' moving average.
    "selftrain": ["tests/test_selftrain.py"],
    # mean_teacher.settings maps FixMatch's settings too; their tests are FixMatch's.
    "mean_teacher": ["tests/test_mean_teacher.py", "tests/test_fixmatch.py"],
    "fixmatch": ["tests/test_fixmatch.py"],
    # GGO vs consolidation, lungs and involvement: the heads' probabilities, masks and label maps.
    "heads": ["tests/test_heads.py", "tests/test_evaluate_classes.py", "tests/test_predict_classes.py"],
    # A split's per-class sections (HD95 and lesion sizes in mm with a spacing) and lung involvement.
    "evaluate_classes": ["tests/test_evaluate_classes.py", "tests/test_involvement.py"],
    # A volume's predicted classes: label maps, per-class voxel counts and involvement.
    "predict_classes": ["tests/test_predict_classes.py"],
    # Prediction: the command's checks and refusals, slices (window-matched or not), volumes streamed (in
    # any voxel order: volumes not stored axially are turned whole, the only path writing by slice index).
    "predict": [
        "tests/test_predict.py",
        "tests/test_dicom.py",
        "tests/test_predict_classes.py",
        "tests/test_orientation.py",
    ],
    # Which files an --input names, their outputs' names, the output folder's checks.
    "prediction_files": ["tests/test_prediction_files.py", "tests/test_predict.py", "tests/test_dicom.py"],
    # The data users bring: volumes in any voxel order, DICOM series in Hounsfield units, lung involvement.
    "orientation": ["tests/test_orientation.py", "tests/test_dicom.py"],
    "dicom": ["tests/test_dicom.py"],
    "involvement": ["tests/test_involvement.py", "tests/test_evaluate_classes.py"],
    # A subpackage's module is named with dots, as Python imports it (its mutants' names start the same way).
    # The class label maps and channels the multi-class heads train on, from each dataset's features.
    "datasets.labels": [
        "tests/test_datasets.py",
        "tests/test_input_pipeline.py",
        "tests/test_evaluate_classes.py",
    ],
    # Pseudo-label folders (#27), unlabelled slices without labels, the lesion filter, the labelled mix.
    "datasets.pseudo_labels": [
        "tests/test_input_pipeline.py",
        "tests/test_datasets.py",
        "tests/test_selftrain.py",
        "tests/test_mean_teacher.py",
    ],
    # The unlabelled pool's intensities mapped onto the labelled slices' ('window', 'histogram'), and
    # prediction's slices with --input_window=match.
    "datasets.intensity_matching": [
        "tests/test_intensity_matching.py",
        "tests/test_datasets.py",
        "tests/test_selftrain.py",
        "tests/test_predict.py",
    ],
    # Reading and checking a manual directory's files: slices, masks, NIfTI volumes, split lists.
    "datasets.readers": [
        "tests/test_readers.py",
        "tests/test_datasets.py",
        "tests/test_pack_ma2020.py",
        "tests/test_predict.py",
    ],
    # Which files make up each public dataset's examples and splits; the missing-data error.
    "datasets.layouts": [
        "tests/test_dataset_layouts.py",
        "tests/test_datasets.py",
        "tests/test_pack_ma2020.py",
    ],
    # Atomic writes and the workdir lock.
    "files": ["tests/test_files.py"],
    # Checkpoints: the round trip, the architecture/orientation/mean-teacher checks, `model_init`'s weights,
    # a damaged step moved aside (the training loop's resume tests exercise the rest).
    "checkpoints": [
        "tests/test_checkpoints.py",
        "tests/test_orientation.py",
        "tests/test_resume.py",
        "tests/test_mean_teacher.py",
    ],
    # The train step (loss, gradient norm, dropout key), the staircase schedule, both consistency terms,
    # the eval step and restoring a run's state. test_evaluate holds restore_state's own tests, but with it
    # mutmut's first (stats) run fails ("runner returned 1") where plain pytest passes; not found why.
    "steps": [
        "tests/test_steps.py",
        "tests/test_mean_teacher.py",
        "tests/test_fixmatch.py",
        "tests/test_resume.py",
    ],
    # Scoring a split: slices at their stored size, per-volume Dice and HD95, the summary, ranked overlays.
    "evaluate": ["tests/test_evaluate.py", "tests/test_evaluate_classes.py", "tests/test_onnx_export.py"],
    # The written reports: number formats, the per-slice CSV, the paper's tables, the per-class and
    # involvement sections.
    "reports": ["tests/test_reports.py", "tests/test_evaluate.py", "tests/test_evaluate_classes.py"],
    # The inference layer: test-time flips, padded batches, the batches in flight.
    "inference": ["tests/test_inference.py", "tests/test_evaluate_classes.py"],
    # The training input: resizing, HU windowing, the paper's augmentation, the labelled/pseudo-labelled mix.
    "input_pipeline": ["tests/test_input_pipeline.py", "tests/test_datasets.py"],
    # Volumes for prediction: the NIfTI mask file, a volume's refusals, the Hounsfield-unit check, slices
    # turned to the model and back.
    "volumes": ["tests/test_volumes.py", "tests/test_predict.py", "tests/test_dicom.py"],
    # The TFDS builder: examples from each layout, the cache key, the prepared-data folder.
    "datasets.builder": [
        "tests/test_builder.py",
        "tests/test_datasets.py",
        "tests/test_input_pipeline.py",
        "tests/test_pack_ma2020.py",
    ],
    # What makes a recorded run another one (resume, the self-training stages), the model variants, the
    # speed options' old forms, the config files. base_config's defaults are every test's: mutate the other
    # functions by glob (experiments/results/mutation/README.md gives the command).
    "config_lib": [
        "tests/test_config_lib.py",
        "tests/test_resume.py",
        "tests/test_selftrain.py",
        "tests/test_main.py",
    ],
    # Hosts and devices: the multi-host start-up and its environment variables, the batch over the devices,
    # the host's share of a batch. Not test_compile_cache.py: the staged compile_cache always jits (below),
    # so its stored-step test fails there and mutmut's stats run with it.
    "devices": ["tests/test_devices.py", "tests/test_distributed.py"],
    # The ONNX export: the jaxpr translator (every primitive the model uses, BatchNorm and ReLU folded into
    # the convolutions), the exported file's metadata and outputs, and ONNX Runtime as a predictor; the tests
    # compare ONNX Runtime's outputs with JAX's.
    "onnx_graph": ["tests/test_onnx_export.py", "tests/test_onnx_int8.py"],
    "onnx_export": ["tests/test_onnx_export.py", "tests/test_onnx_int8.py"],
    "onnx_runtime": ["tests/test_onnx_export.py", "tests/test_onnx_int8.py"],
    # What a user looks at: slice overlays (outlines, class colours, the legend), label PNGs, the curves.
    "visualize": ["tests/test_visualize.py", "tests/test_predict.py", "tests/test_predict_classes.py"],
    # A config's checks before anything is built: nearly every test validates a config (make_tiny_config),
    # so the selection is the schema's own tests and, by pytest node id (file::test), each other file's
    # tests of the keys it owns; whole files would run every training test against each surviving mutant.
    "config_validation": [
        "tests/test_config_lib.py",
        "tests/test_datasets.py::test_config_validation_of_data_keys",
        "tests/test_datasets.py::test_config_validation_of_cross_validation_keys",
        "tests/test_datasets.py::test_cross_validation_keys_accept_valid_values",
        "tests/test_datasets.py::test_a_lesion_filter_with_nothing_to_filter_is_refused",
        "tests/test_datasets.py::test_mixed_training_needs_a_weighted_loss_and_one_extra_source",
        "tests/test_selftrain.py::test_invalid_selftrain_keys_are_one_line_naming_the_key",
        "tests/test_selftrain.py::test_a_mixed_in_source_that_rounds_to_no_row_is_refused",
        "tests/test_mean_teacher.py::test_bad_consistency_settings_are_refused_naming_the_key",
        "tests/test_fixmatch.py::test_bad_fixmatch_settings_are_refused_naming_the_key",
        "tests/test_orientation.py::test_the_orientation_key_defaults_to_the_datasets_and_is_validated",
        "tests/test_onnx_export.py::test_a_bad_runtime_is_a_config_error",
        "tests/test_onnx_export.py::test_onnxruntime_without_the_extra_is_refused_before_training",
        "tests/test_intensity_matching.py::test_matching_a_pool_that_nothing_reads_is_refused_in_one_line",
    ],
}
KEPT_DECORATORS = ("staticmethod", "classmethod")  # mutmut handles these itself

# mutmut's exit-code verdicts (mutmut/stats.py), folded into the table's columns.
KILLED_CODES = {1, 3}
TIMEOUT_CODES = {-24, 24, 152, 255, 36}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
DETECTED_CODES = KILLED_CODES | TIMEOUT_CODES


def undecorate(source: str) -> str:
    """`source` with each decorated function's decorators applied by assignment after its body."""
    lines = source.splitlines(keepends=True)
    functions = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.decorator_list
        and not any(ast.unparse(d) in KEPT_DECORATORS for d in node.decorator_list)
    ]
    # Bottom-up, so that earlier line numbers stay valid while lines are added and removed below them.
    for function in sorted(functions, key=lambda node: node.lineno, reverse=True):
        indent = " " * function.col_offset
        wrapped = function.name
        for decorator in reversed(function.decorator_list):  # the innermost decorator applies first
            wrapped = f"{ast.unparse(decorator)}({wrapped})"
        lines.insert(function.end_lineno, f"{indent}{function.name} = {wrapped}\n")
        first, last = function.decorator_list[0].lineno, function.decorator_list[-1].end_lineno
        del lines[first - 1 : last]
    return "".join(lines)


def _write_if_changed(path: pathlib.Path, text: str):
    # An unchanged mtime tells mutmut that a module's mutants (and their verdicts) are still current.
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def module_path(module: str) -> str:
    """The file of `module` (`datasets.labels`: rdunet_jax/datasets/labels.py), relative to the checkout."""
    return "rdunet_jax/" + module.replace(".", "/") + ".py"


def staged_config(pyproject: str, module: str) -> str:
    """The project's pyproject.toml with the [tool.mutmut] section mutating `module` under its tests."""
    if "[tool.mutmut]\n" not in pyproject:
        raise SystemExit("pyproject.toml: no [tool.mutmut] section")
    settings = f"only_mutate = {json.dumps([module_path(module)])}\n"
    settings += f"pytest_add_cli_args_test_selection = {json.dumps(TESTS[module])}\n"
    return pyproject.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + settings)


# The stored train-step executable (rdunet_jax/compile_cache.py) is keyed by the package's sources, which are
# the same file for every mutant of a module (mutmut picks one by MUTANT_UNDER_TEST when it runs): a loop test
# of every mutant loaded the step that mutmut's clean run stored, and saw no mutant traced into it. Staged,
# the step is always jit's, whose persistent cache keys the traced program (a mutant's own).
_STORED_STEP_CHECK = "    if not config.compilation_cache_dir or mesh.size > 1 or jax.process_count() > 1:\n"
_NO_STORED_STEP = "    if True:  # staged for mutation testing: always jit (experiments/mutation.py)\n"


def without_stored_steps(compile_cache_source: str) -> str:
    """The staged compile_cache.py, whose `cached_train_step` is always `train_step` (jit)."""
    if compile_cache_source.count(_STORED_STEP_CHECK) != 1:
        raise SystemExit(
            "experiments/mutation.py: compile_cache.py's cache check changed; update _STORED_STEP_CHECK"
        )
    return compile_cache_source.replace(_STORED_STEP_CHECK, _NO_STORED_STEP)


# mutmut runs each mutant only against the tests its first (stats) run saw call the mutated function, and a
# jitted function is called (traced) only by the first test of a process that uses its shapes: the staged
# tests clear JAX's caches before each test, so every test that uses one traces it and is recorded.
_TRACE_EVERY_TEST = """

@pytest.fixture(autouse=True)
def _trace_in_every_test():
    \"\"\"Staged for mutation testing (experiments/mutation.py): each test traces what it jits.\"\"\"
    jax.clear_caches()
"""


def prepare(work: pathlib.Path, module: str):
    """Stages the package (decorators undone in `module`), tests and config in `work`."""
    mutated = module_path(module)
    # The tests' persistent compilation cache (tests/conftest.py), seeded from the checkout's: the unmutated
    # programs of mutmut's first full test run are then read, not compiled.
    if TEST_CACHE.is_dir():
        shutil.copytree(TEST_CACHE, work / "mutants" / ".pytest_cache" / "xla", dirs_exist_ok=True)
    for name in STAGED_PATHS:
        source = REPO_ROOT / name
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(REPO_ROOT)
            if any(part in NOT_STAGED for part in relative.parts):
                continue
            if relative.suffix == ".py" or relative.suffix in (".toml", ".txt"):
                text = file.read_text()
                if str(relative) == mutated:
                    text = undecorate(text)
                elif str(relative) == "pyproject.toml":
                    text = staged_config(text, module)
                if str(relative) == "rdunet_jax/compile_cache.py":
                    text = without_stored_steps(text)
                if str(relative) == "tests/conftest.py":
                    text += _TRACE_EVERY_TEST
                _write_if_changed(work / relative, text)
            else:
                target = work / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)


def read_equivalent() -> dict[str, str]:
    """Mutant name -> why it is equivalent, from the committed list (`name  reason` per line)."""
    if not EQUIVALENT_LIST.exists():
        return {}
    equivalent = {}
    for line in EQUIVALENT_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.strip().partition(" ")
            equivalent[name] = reason.strip()
    return equivalent


def report(work_root: pathlib.Path, mutmut: str, show_diffs: bool):
    """Prints the score table and every surviving (survived, or covered by no test) mutant."""
    equivalent = read_equivalent()
    rows, survivors, staged, all_verdicts = [], [], [], {}
    metas = sorted(work_root.glob("*/mutants/rdunet_jax/**/*.py.meta"))
    for meta in metas:
        work = work_root / meta.relative_to(work_root).parts[0]  # .mutation/MODULE
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        all_verdicts.update(verdicts)
        counts = collections.Counter()
        for name, code in verdicts.items():
            if code is None:
                counts["untested"] += 1
            elif name in equivalent and code not in DETECTED_CODES:
                counts["equivalent"] += 1
            elif code in KILLED_CODES:
                counts["killed"] += 1
            elif code in TIMEOUT_CODES:
                counts["timeout"] += 1
            else:
                survivors.append((work, name, _status(code)))
                counts["survivors"] += 1
        tested = len(verdicts) - counts["untested"]
        detected = counts["killed"] + counts["timeout"]
        relevant = tested - counts["equivalent"]
        score = f"{100 * detected / relevant:.1f}%" if relevant else "-"
        module = ".".join(meta.relative_to(work / "mutants" / "rdunet_jax").parts).removesuffix(".py.meta")
        staged.append(f"rdunet_jax.{module}.")
        rows.append(
            f"| {module} | {len(verdicts)} | {tested} | {counts['killed']} | {counts['timeout']} "
            f"| {counts['equivalent']} | {counts['survivors']} | {score} |"
        )
    print("| module | mutants | tested | killed | timeout | equivalent | survivors | score |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nscore = (killed + timeout) / (tested - equivalent)\n")
    for work, name, status in survivors:
        print(f"- {name} ({status})")
        if show_diffs:
            diff = subprocess.run([mutmut, "show", name], cwd=work, capture_output=True, text=True).stdout
            print("```diff\n" + diff.strip() + "\n```")
    # Only the modules staged here can tell a name that no longer exists from one not run.
    for name in sorted(
        name for name in set(equivalent) - set(all_verdicts) if name.startswith(tuple(staged))
    ):
        print(f"warning: {EQUIVALENT_LIST.name} names {name}, which is no longer a mutant", file=sys.stderr)
    # mutmut numbers a function's mutants in order, so a changed function renumbers them: a listed name may
    # now be another mutant. One the tests detect is counted as detected, and its entry must go.
    for name in sorted(name for name in equivalent if all_verdicts.get(name) in DETECTED_CODES):
        print(
            f"warning: {EQUIVALENT_LIST.name} names {name}, which the tests detect: renumbered, or not "
            "equivalent; check it with mutmut show",
            file=sys.stderr,
        )


def _status(code) -> str:
    if code in SURVIVED_CODES:
        return "survived"
    if code in NO_TESTS_CODES:
        return "no tests"
    return f"exit {code}"


def _names(meta: pathlib.Path):
    return json.loads(meta.read_text())["exit_code_by_key"]


def sample(work: pathlib.Path, module: str, count: int, seed: int):
    """Prints `count` of the module's mutant names drawn at random (for a run too long to test them all)."""
    meta = work / module / "mutants" / f"{module_path(module)}.meta"
    if not meta.exists():
        raise SystemExit(f"{meta}: no mutants yet: start experiments/mutation.sh {module} once")
    names = sorted(_names(meta))
    print("\n".join(random.Random(seed).sample(names, min(count, len(names)))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "report", "sample", "modules"))
    parser.add_argument("module", nargs="?", choices=sorted(TESTS), help="the module to stage (prepare)")
    parser.add_argument("--work", type=pathlib.Path, default=REPO_ROOT / ".mutation")
    parser.add_argument("--mutmut", default="mutmut", help="the mutmut executable (for `mutmut show`)")
    parser.add_argument("--no_diffs", action="store_true", help="list survivors without their diffs")
    parser.add_argument("--count", type=int, default=100, help="mutants to draw (sample)")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed (sample)")
    args = parser.parse_args()
    if args.command in ("prepare", "sample") and args.module is None:
        parser.error(f"{args.command} needs a module")
    if args.command == "modules":  # for experiments/mutation.sh, which checks its arguments against them
        print(" ".join(TESTS))
    elif args.command == "prepare":
        prepare(args.work / args.module, args.module)
    elif args.command == "sample":
        sample(args.work, args.module, args.count, args.seed)
    else:
        report(args.work, args.mutmut, show_diffs=not args.no_diffs)


if __name__ == "__main__":
    main()
