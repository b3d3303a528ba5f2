"""A study's markdown: per-fold (or per-seed) Dice, means with 95% intervals, paired differences."""

import math

import numpy as np

from experiments.studies import stats

BOOTSTRAP_RESAMPLES = 10_000


def format_interval(interval, digits: int = 3) -> str:
    """'mean [low, high]', or 'mean (n=1)' when there is no interval, or 'n/a'."""
    mean, low, high = interval
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_seconds(seconds: float) -> str:
    """'1h02m', '3m05s' or '12s'."""
    if math.isnan(seconds):
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _arm_label(arm) -> str:
    return f"{arm.description} (`{arm.name}`)"


def _records_of(arm_name: str, specs, records) -> list:
    """(spec, record or None) of an arm's runs, in replicate order."""
    return [(spec, records.get(spec.name)) for spec in specs if spec.arm == arm_name]


def _replicate_labels(specs) -> list:
    labels = []
    for spec in specs:
        if spec.replicate.label not in labels:
            labels.append(spec.replicate.label)
    return labels


def _metric_values(runs, key: str) -> list:
    return [record["metrics"][key] for _, record in runs if record is not None]


def per_replicate_table(study, specs, records) -> list[str]:
    """Dice of every run: one row per arm, one column per fold (or seed), then mean [95% t-interval]."""
    labels = _replicate_labels(specs)
    lines = [
        "| Model | " + " | ".join(labels) + " | mean [95% CI] |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for arm in study.arms:
        runs = _records_of(arm.name, specs, records)
        cells = [f"{record['metrics']['dice']:.3f}" if record else "…" for _, record in runs]
        interval = stats.t_interval(_metric_values(runs, "dice"))
        lines.append(f"| {_arm_label(arm)} | " + " | ".join(cells) + f" | {format_interval(interval)} |")
    return lines


def summary_table(study, specs, records) -> list[str]:
    """Per arm: parameters, DSC, JC and F-score as mean [95% t-interval] over runs, train time per run."""
    lines = [
        "| Model | Parameters | DSC | JC | F-score | Runs | Train time per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in study.arms:
        runs = _records_of(arm.name, specs, records)
        done = [record for _, record in runs if record is not None]
        parameters = f"{done[0]['num_parameters']:,}" if done else "n/a"
        cells = [format_interval(stats.t_interval(_metric_values(runs, key))) for key in ("dice", "jaccard")]
        cells.append(format_interval(stats.t_interval(_metric_values(runs, "f_score"))))
        lines.append(
            f"| {_arm_label(arm)} | {parameters} | " + " | ".join(cells) + f" | {len(done)}/{len(runs)} | "
            f"{_time_per_run(done)} |"
        )
    return lines


def _time_per_run(done) -> str:
    """Mean train time per run, per device when runs ran on several ('4m35s cpu; 1m30s gpu:H200')."""
    if not done:
        return format_seconds(math.nan)
    by_device = {}
    for record in done:
        by_device.setdefault(record["device"], []).append(record["train_seconds"])
    if len(by_device) == 1:
        return format_seconds(float(np.mean(next(iter(by_device.values())))))
    return "; ".join(
        f"{format_seconds(float(np.mean(seconds)))} {device} ({len(seconds)})"
        for device, seconds in sorted(by_device.items())
    )


def slice_values(runs, key: str = "dice") -> dict:
    """slice id -> the values of every finished run that evaluated it."""
    values = {}
    for _, record in runs:
        if record is None:
            continue
        for slice_id, value in zip(record["slices"]["id"], record["slices"][key], strict=True):
            values.setdefault(slice_id, []).append(value)
    return values


def paired_slices_table(study, specs, records, reference_arm: str = "") -> list[str]:
    """Per alternative: mean over slices of its Dice minus the reference's (`reference_arm`, by default the
    study's), with a 95% bootstrap interval."""
    reference_arm = reference_arm or study.reference
    reference = slice_values(_records_of(reference_arm, specs, records))
    lines = [
        f"| Model | ΔDSC vs `{reference_arm}` [95% bootstrap CI] | Slices paired |",
        "|---|---|---|",
    ]
    for arm in study.arms:
        if arm.name == reference_arm:
            continue
        differences = stats.paired_slice_differences(
            reference, slice_values(_records_of(arm.name, specs, records))
        )
        interval = stats.bootstrap_interval(differences, num_resamples=BOOTSTRAP_RESAMPLES)
        lines.append(f"| {_arm_label(arm)} | {format_interval(interval, 4)} | {differences.size} |")
    return lines


def paired_replicates_table(study, specs, records) -> list[str]:
    """Per alternative: its Dice minus the reference's on the same fold/seed, mean [95% t-interval]."""
    reference = {
        spec.replicate.label: record for spec, record in _records_of(study.reference, specs, records)
    }
    lines = [
        f"| Model | ΔDSC vs `{study.reference}`, same seed [95% CI] | Pairs |",
        "|---|---|---|",
    ]
    for arm in study.arms:
        if arm.name == study.reference:
            continue
        differences = [
            record["metrics"]["dice"] - reference[spec.replicate.label]["metrics"]["dice"]
            for spec, record in _records_of(arm.name, specs, records)
            if record is not None and reference.get(spec.replicate.label) is not None
        ]
        interval = format_interval(stats.t_interval(differences), 4)
        lines.append(f"| {_arm_label(arm)} | {interval} | {len(differences)} |")
    return lines


def _lesion_values(runs, group: str, key: str) -> list:
    return [
        record["lesion_size"][group][key]
        for _, record in runs
        if record is not None and record.get("lesion_size") and record["lesion_size"][group][key] is not None
    ]


def lesion_table(study, specs, records) -> list[str]:
    """Per arm: Dice and detection rate of small and large lesions, mean [95% t-interval] over runs."""
    lines = [
        "| Model | Small-lesion DSC | Large-lesion DSC | Small detected | Large detected | Lesions per run "
        "(small/large) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in study.arms:
        runs = _records_of(arm.name, specs, records)
        cells = [
            format_interval(stats.t_interval(_lesion_values(runs, group, key)))
            for key in ("dice", "detection_rate")
            for group in ("small", "large")
        ]
        counts = [
            np.mean(_lesion_values(runs, group, "num_lesions") or [math.nan]) for group in ("small", "large")
        ]
        lines.append(f"| {_arm_label(arm)} | " + " | ".join(cells) + f" | {counts[0]:.1f}/{counts[1]:.1f} |")
    return lines


def _protocol(base, budget_name: str, budget, specs, records) -> list[str]:
    """The paragraph that says what was run: data, split, budget, evaluation, runs and compute."""
    data = base.data
    if data.cv_folds:
        split = (
            f"{data.cv_folds}-fold cross-validation (folds fixed by `data.cv_seed`={data.cv_seed}, identical "
            "for every run); each run is evaluated on its held-out fold"
        )
    else:
        schemes = sorted({spec.config.data.split_scheme for spec in specs}, reverse=True)
        named = "the split of each row" if len(schemes) > 1 else "the split"
        split = (
            f"{named} ({' / '.join(f'`{scheme}`' for scheme in schemes)}, fractions "
            f"{list(data.split_fractions)}, seed {data.split_seed}); "
            f"each run is evaluated on `{base.eval.split}`"
        )
    done = list(records.values())
    compute = []
    for device in sorted({record["device"] for record in done}) or ["none yet"]:
        on_device = [record for record in done if record["device"] == device]
        seconds = sum(record["train_seconds"] for record in on_device)
        wall = sum(record["wall_seconds"] for record in on_device)
        compute.append(
            f"{format_seconds(seconds)} (wall time with compilation and evaluation: {format_seconds(wall)}) "
            f"on {device} ({len(on_device)} runs)"
        )
    small_area = base.eval.small_lesion_area
    return [
        f"Data: `{data.name}`, {split}.",
        f"Budget `{budget_name}`: {budget.describe()}.",
        scoring_line(base, specs),
        f"Runs finished: {len(done)} of {len(specs)}. Training time: {'; '.join(compute)}.",
        f"DSC, JC: mean over slices per run; F-score: harmonic mean of mean precision and mean recall. "
        f"Intervals: 95% Student-t over runs (folds or seeds). Small lesions: below {small_area:g} px at "
        f"{data.image_size}x{data.image_size} (100 px at 256x256).",
    ]


# How a run's checkpoint was chosen, under cross-validation (where the validation split is the scored fold).
_CV_SCORING = {
    "best": "at the epoch of lowest loss on the held-out fold it is scored on (chosen on the scored slices: "
    "optimistic)",
    "last": "at its last epoch (the held-out fold unseen)",
}


def scoring_line(base, specs) -> str:
    """Which checkpoint each arm's runs were scored at."""
    arms_by_kind = {}
    for spec in specs:
        arms = arms_by_kind.setdefault(spec.config.eval.checkpoint, [])
        if spec.arm not in arms:
            arms.append(spec.arm)
    describe = (
        _CV_SCORING.get
        if base.data.cv_folds
        else {"best": "at the epoch of lowest validation loss", "last": "at its last epoch"}.get
    )
    if len(arms_by_kind) == 1:
        return f"Every run is scored {describe(next(iter(arms_by_kind)))}."
    parts = [
        f"{', '.join(f'`{arm}`' for arm in arms)} {describe(kind)}" for kind, arms in arms_by_kind.items()
    ]
    return f"Runs are scored: {'; '.join(parts)}."


def study_markdown(study, base, budget_name: str, budget, specs, records, command: str) -> str:
    """The whole markdown file of a study."""
    replicate_kind = "fold" if base.data.cv_folds else "seed"
    lines = [f"# {study.title}", "", *_protocol(base, budget_name, budget, specs, records), ""]
    lines += ["Produced by:", "", "```", command, "```"]
    sections = {
        "per_replicate": (f"## Dice per {replicate_kind}", per_replicate_table),
        "summary": ("## Summary", summary_table),
        "paired_slices": (
            f"## Paired difference to `{study.reference}`, per slice",
            paired_slices_table,
        ),
        "paired_replicates": (
            f"## Paired difference to `{study.reference}`, per {replicate_kind}",
            paired_replicates_table,
        ),
        "lesions": ("## Dice by lesion size", lesion_table),
    }
    notes = {
        "paired_slices": (
            "Per slice: the model's Dice minus the reference's, each averaged over the runs that evaluated "
            f"the slice; mean over slices with a 95% percentile bootstrap interval ({BOOTSTRAP_RESAMPLES:,} "
            "resamples of slices, seed 0). Negative: worse than the reference."
        ),
        "paired_replicates": (
            "The two arms evaluate different test slices, so they are paired by seed, not by slice: "
            "mean difference with a 95% Student-t interval over seeds."
        ),
    }
    for table in study.tables:
        heading, make = sections[table]
        lines += ["", heading, "", *make(study, specs, records)]
        if table in notes:
            lines += ["", notes[table]]
        if table == "paired_slices" and study.also_paired_with:
            lines += ["", f"## Paired difference to `{study.also_paired_with}`, per slice", ""]
            lines += paired_slices_table(study, specs, records, study.also_paired_with)
    return "\n".join(lines) + "\n"
