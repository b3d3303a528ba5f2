"""Runs a study: trains and evaluates each run not yet finished, and stores one small JSON per run.

A run is identified by its config without the keys that only name it or locate files on one machine.
Its workdir is `<runs_root>/<digest of that config>`, so a run interrupted in one study resumes in any
study that needs the same config, and a run another study already finished is copied, not trained again.
Configs are compared key by key: a key added to the schema after a run was recorded matches when the
new config keeps the key's default (which, by the schema's rule, reproduces the old behaviour).
"""

import csv
import functools
import hashlib
import json
import pathlib
import time

import jax

from rdunet_jax import config_lib, models
from rdunet_jax.errors import UserError
from rdunet_jax.files import write_json_atomic, write_text_atomic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Keys that name a run or locate files on this machine: with config_lib.BOOKKEEPING_KEYS (how often it logs
# and saves), not part of what a run computes. (`model.variant` is a label; the model.* keys it set are kept.)
NAMING_KEYS = ("name", "data.manual_dir", "data.data_dir", "model.variant")
# Metric keys copied from metrics/<split>.json into the run's record.
METRIC_KEYS = (
    "dice",
    "dice_std",
    "jaccard",
    "jaccard_std",
    "f_score",
    "precision",
    "recall",
    "specificity",
    "global_dice",
    "global_jaccard",
    "hd95",
    "hd95_unit",
    "loss",
    "num_slices",
    "step",
    "threshold",
)


def result_keys(config_values: dict) -> dict:
    """The flat keys of a config's JSON that change what a run computes."""
    computed = config_lib.computed_keys(config_values)
    return {key: value for key, value in computed.items() if key not in NAMING_KEYS}


@functools.cache
def _schema_defaults() -> dict:
    return result_keys(config_lib.to_json(config_lib.base_config()))


def config_digest(config) -> str:
    """A hash of everything in `config` that changes what the run computes."""
    return hashlib.sha256(
        json.dumps(result_keys(config_lib.to_json(config)), sort_keys=True).encode()
    ).hexdigest()[:16]


def same_run(recorded: dict, config) -> bool:
    """Whether a recorded config (JSON) computes what `config` computes: every key equal, and every key
    the record lacks (added to the schema later) at the value it stood for then: a speed option's old
    form (`config_lib.upgrade`, as `build_model` reads it), otherwise its default. Keys since removed are
    ignored."""
    recorded_keys, planned_keys = (
        result_keys(config_lib.upgrade(recorded)),
        result_keys(config_lib.to_json(config)),
    )
    defaults = _schema_defaults()
    for key, value in planned_keys.items():
        if key in recorded_keys:
            expected = recorded_keys[key]
        else:
            expected = defaults.get(key, value)
        if value != expected:
            return False
    return True


def workdir_for(runs_root, config) -> pathlib.Path:
    """The run folder of `config`: shared by every study that runs the same config, and found again
    after a schema change renamed its digest (by the config.json a run writes first)."""
    runs_root = pathlib.Path(runs_root)
    folder = runs_root / config_digest(config)
    if folder.exists():
        return folder
    for config_path in sorted(runs_root.glob("*/config.json")):
        if same_run(json.loads(config_path.read_text()), config):
            return config_path.parent
    return folder


def count_parameters(config) -> int:
    """Trainable parameters of the config's model, from shapes alone (nothing is initialised)."""
    variables = models.abstract_variables(models.build_model(config.model), config.data.image_size)
    return models.count_parameters(variables["params"])


def read_slices_csv(path) -> dict:
    """Per-slice ids, Dice and Jaccard from evaluate's metrics/<split>_slices.csv."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return {
        "id": [row["id"] for row in rows],
        "dice": [float(row["dice"]) for row in rows],
        "jaccard": [float(row["jaccard"]) for row in rows],
    }


def training_time(workdir) -> tuple[float, int]:
    """(seconds, epochs) of training from train_log.jsonl, across every session that resumed it."""
    path = pathlib.Path(workdir) / "train_log.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(sum(record["seconds"] for record in records)), len(records)


WALL_SECONDS_FILE = "study_wall_seconds.txt"


def add_wall_seconds(workdir, seconds: float) -> float:
    """Adds a session's wall time to the run's total in its workdir and returns the total, so a run
    resumed over several sessions (interrupted ones included) reports all of them, as its training time
    does."""
    path = pathlib.Path(workdir) / WALL_SECONDS_FILE
    try:
        total = float(path.read_text()) + seconds
    except (OSError, ValueError):
        total = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, f"{total}\n")
    return total


def build_record(spec, study: str, tag: str, summary: dict, workdir, wall_seconds: float) -> dict:
    """The JSON of one finished run: what was run, its metrics, per-slice values, cost and where."""
    workdir = pathlib.Path(workdir)
    seconds, epochs = training_time(workdir)
    device = jax.devices()[0]
    return {
        "study": study,
        "tag": tag,
        "run": spec.name,
        "arm": spec.arm,
        "fold": spec.replicate.fold,
        "seed": spec.replicate.seed,
        "config_digest": config_digest(spec.config),
        "config": config_lib.to_json(spec.config),
        "workdir": _relative_to_repo(workdir),
        "split": summary["split"],
        "metrics": {key: summary.get(key) for key in METRIC_KEYS},
        "lesion_size": summary.get("lesion_size"),
        # Published COVID-SemiSeg figures are scored at the stored masks' own size.
        "original_resolution": {
            key: summary["original_resolution"][key] for key in ("dice", "jaccard", "f_score", "global_dice")
        },
        "num_parameters": count_parameters(spec.config),
        "train_seconds": seconds,
        "epochs": epochs,
        "wall_seconds": wall_seconds,
        "device": f"{device.platform}:{device.device_kind}",
        "slices": read_slices_csv(workdir / "metrics" / f"{summary['split']}_slices.csv"),
    }


def _relative_to_repo(path) -> str:
    """`path` relative to the repository when inside it (records then read the same on every machine)."""
    path = pathlib.Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def load_record(path) -> dict | None:
    """The record at `path`, or None when there is none (or it was cut short)."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def find_reusable(results_root, config) -> dict | None:
    """A finished record of the same config in any study under `results_root`, if there is one."""
    for path in sorted(pathlib.Path(results_root).glob("*/*/*.json")):
        record = load_record(path)
        if record and "config" in record and same_run(record["config"], config):
            return record
    return None


def run_status(spec, results_dir, results_root) -> tuple[str, dict | None]:
    """('finished', record), ('reusable', record of another study) or ('pending', None)."""
    path = pathlib.Path(results_dir) / f"{spec.name}.json"
    record = load_record(path)
    if record is not None:
        if not same_run(record.get("config", {}), spec.config):
            changed = sorted(
                key
                for key, value in result_keys(config_lib.to_json(spec.config)).items()
                if result_keys(record.get("config", {})).get(key, _schema_defaults().get(key)) != value
            )
            raise UserError(
                f"{path}: made with another config (differs in {', '.join(changed[:5])}); delete it or "
                "choose another --tag"
            )
        return "finished", record
    reusable = find_reusable(results_root, spec.config)
    if reusable is not None:
        return "reusable", reusable
    return "pending", None


def execute(
    study, specs, tag: str, results_root, runs_root, train_fn, max_runs: int | None = None, after_each=None
) -> dict:
    """Brings every run of `specs` to a finished record (at most `max_runs` trained now), calling
    `after_each()` after each new record (the tables then show a long study's progress).

    Returns counts of runs skipped (finished), reused from another study, trained and left pending.
    """
    results_dir = pathlib.Path(results_root) / study.name / tag
    counts = {"finished": 0, "reused": 0, "trained": 0, "pending": 0}
    for spec in specs:
        status, record = run_status(spec, results_dir, results_root)
        path = results_dir / f"{spec.name}.json"
        if status == "finished":
            counts["finished"] += 1
            continue
        if status == "reusable":
            reused = {**record, "study": study.name, "tag": tag, "run": spec.name, "arm": spec.arm}
            reused["reused_from"] = f"{record['study']}/{record['tag']}/{record['run']}"
            write_json_atomic(path, reused)
            counts["reused"] += 1
            print(f"{spec.name}: reused {reused['reused_from']}", flush=True)
            if after_each:
                after_each()
            continue
        if max_runs is not None and counts["trained"] >= max_runs:
            counts["pending"] += 1
            continue
        workdir = workdir_for(runs_root, spec.config)
        print(f"{spec.name}: training in {workdir}", flush=True)
        started = time.perf_counter()
        try:
            summary = train_fn(spec.config, workdir)
        finally:
            wall_seconds = add_wall_seconds(workdir, time.perf_counter() - started)
        record = build_record(spec, study.name, tag, summary, workdir, wall_seconds)
        write_json_atomic(path, record)
        counts["trained"] += 1
        if after_each:
            after_each()
    return counts


def load_records(study, specs, tag: str, results_root) -> dict:
    """The finished records of `specs`, by run name (records of another config are left out)."""
    results_dir = pathlib.Path(results_root) / study.name / tag
    records = {}
    for spec in specs:
        record = load_record(results_dir / f"{spec.name}.json")
        if record is not None and same_run(record.get("config", {}), spec.config):
            records[spec.name] = record
    return records
