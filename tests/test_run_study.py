"""The study runner: plans, configs, skipping and reusing finished runs, statistics and tables.

Runs train the tiny config of helpers.py; the two arms differ in augmentation only, which runs outside
the compiled steps, so the runner compiles nothing the rest of the suite has not compiled.
"""

import copy
import dataclasses
import json
import math
import time

import numpy as np
import pytest
from helpers import ONE_LEVEL, make_tiny_config

from experiments import run_study
from experiments.studies import design, runner, stats, tables
from rdunet_jax import config_lib, datasets, train
from rdunet_jax.errors import UserError

# --- statistics against hand-computed values -------------------------------------------------------------


def test_t_interval_matches_the_hand_computed_interval():
    # mean 3, sample sd sqrt(2.5), se sqrt(2.5/5) = 0.7071068, t(0.975, 4) = 2.7764451: half-width 1.9632432.
    mean, low, high = stats.t_interval([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert low == pytest.approx(3 - 1.9632432, abs=1e-6) and high == pytest.approx(3 + 1.9632432, abs=1e-6)
    # Two values 0.2 and 0.4: se 0.1, t(0.975, 1) = 12.7062047.
    assert stats.t_interval([0.2, 0.4])[1:] == pytest.approx((0.3 - 1.27062047, 0.3 + 1.27062047))
    mean, low, high = stats.t_interval([0.7, None])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(value) for value in stats.t_interval([]))


def test_bootstrap_interval_matches_the_resampling_distribution():
    # Means of 2 draws from {0, 1} are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: 2.5% -> 0, 97.5% -> 1.
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # Means of 4 draws from {0, 0, 0, 1}: P(mean <= 0.5) = 0.949, P(mean <= 0.75) = 0.996: 97.5% -> 0.75.
    assert stats.bootstrap_interval([0.0, 0.0, 0.0, 1.0]) == (0.25, 0.0, 0.75)
    assert stats.bootstrap_interval([0.1] * 7) == pytest.approx((0.1, 0.1, 0.1))
    assert stats.bootstrap_interval([0.3, -0.1, 0.2], seed=5) == stats.bootstrap_interval(
        [0.3, -0.1, 0.2], seed=5
    )


def test_a_bootstrap_interval_of_many_values_is_the_normal_one_whatever_the_seed():
    """40 values, symmetric about their mean: the percentile bootstrap of the mean is then close to
    mean +- 1.96 sd / sqrt(n) (sd with ddof 0, the resampling distribution's). With 10,000 resamples every
    seed's bounds are within 3% of that half-width (measured: 2.1% at most over seeds 0-4); a 99% interval
    is 27-34% wider, a 90% one 14-17% narrower, and 100 or 1,000 resamples miss by up to 24% and 6%."""
    draws = np.random.default_rng(7).normal(0.01, 0.05, 20)
    values = np.concatenate([draws, 2 * draws.mean() - draws])
    half_width = 1.959964 * np.std(values) / np.sqrt(values.size)
    intervals = [stats.bootstrap_interval(values, seed=seed) for seed in range(5)]
    for mean, low, high in intervals:
        assert mean == pytest.approx(np.mean(values), abs=1e-15)
        assert low == pytest.approx(mean - half_width, abs=0.03 * half_width)
        assert high == pytest.approx(mean + half_width, abs=0.03 * half_width)
    assert len(set(intervals)) == 5  # each seed its own draws
    assert stats.bootstrap_interval(values, seed=3) == intervals[3]  # and reproducible


def test_paired_slice_differences_average_each_slice_over_runs_first():
    reference = {"a": [0.5, 0.7, 0.0], "b": [0.2]}  # a's mean 0.4 (its median 0.5)
    alternative = {"a": [0.8], "b": [0.1, 0.3], "c": [1.0]}  # c: not evaluated by the reference
    np.testing.assert_allclose(stats.paired_slice_differences(reference, alternative), [0.4, 0.0], atol=1e-12)
    # Paired by slice id, not by order: the two records list their slices in other orders (in id order
    # out: "10" < "2" < "3").
    reference = {"3": [0.5], "10": [0.9], "2": [0.1]}
    alternative = {"2": [0.4], "3": [0.6], "10": [0.7]}
    np.testing.assert_allclose(stats.paired_slice_differences(reference, alternative), [-0.2, 0.3, 0.1])


def test_train_time_per_run_is_split_by_device_only_when_runs_ran_on_several():
    cpu = [{"device": "cpu:cpu", "train_seconds": seconds} for seconds in (100.0, 140.0)]
    gpu = [{"device": "gpu:NVIDIA H200", "train_seconds": 30.0}]
    assert tables._time_per_run(cpu) == "2m00s"
    assert tables._time_per_run(cpu + gpu) == "2m00s cpu:cpu (2); 30s gpu:NVIDIA H200 (1)"


def test_formatting():
    assert tables.format_interval((0.61234, 0.5, 0.7)) == "0.612 [0.500, 0.700]"
    assert tables.format_interval((0.6, math.nan, math.nan)) == "0.600 (n=1)"
    assert tables.format_interval((math.nan,) * 3) == "n/a"
    assert [tables.format_seconds(s) for s in (12.4, 185, 3720)] == ["12s", "3m05s", "1h02m"]


# --- design: what each study runs -------------------------------------------------------------------------


def _differing_keys(first: dict, second: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key in first.keys() | second.keys():
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys |= _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.add(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("budget", design.BUDGET_NAMES)
@pytest.mark.parametrize("study_name", sorted(design.STUDIES))
def test_every_plan_is_valid_and_arms_differ_only_in_the_compared_thing(study_name, budget):
    study = design.STUDIES[study_name]
    for dataset in study.datasets:
        settings = design.BUDGETS[(budget, dataset)]
        specs = design.plan(study, design.base_config(dataset, settings, "/data"), settings.seeds)
        assert len(specs) == len(study.arms) * max(settings.cv_folds, 1) * len(settings.seeds)
        allowed = {"name", "model.variant", "model.block", "model.use_se", "model.skip_dilation_rates"}
        allowed |= {"model.encoder_dilation_rates", "data.split_scheme"}
        if study_name == "recipe":  # candidates change the schedule, resolution and augmentation too
            recipes = design.semiseg_recipes().RECIPE_CANDIDATES.values()
            allowed |= {key for recipe in recipes for key in recipe} | {"eval.small_lesion_area"}
        by_replicate = {}
        for spec in specs:
            by_replicate.setdefault(spec.replicate, []).append(config_lib.to_json(spec.config))
        for configs in by_replicate.values():
            for other in configs[1:]:
                assert _differing_keys(configs[0], other) <= allowed


def test_dilation_schedules_keep_the_papers_depth_and_shared_runs_share_a_digest():
    paper = design.DILATION_SCHEDULES["paper"]
    for name, schedule in design.DILATION_SCHEDULES.items():
        assert [len(rates) for rates in schedule] == [len(rates) for rates in paper], name
    assert design.DILATION_SCHEDULES["decreasing"][0] == (3, 3, 2, 2, 1, 1)
    assert design.DILATION_SCHEDULES["increasing"][2] == (1, 1, 2, 2)
    budget = design.BUDGETS[("small", "semiseg")]
    base = design.base_config("semiseg", budget, "/data")
    digests = {
        study: {
            spec.name: runner.config_digest(spec.config)
            for spec in design.plan(design.STUDIES[study], base, (0,))
        }
        for study in ("ablation", "dilation", "lesion_size")
    }
    assert digests["dilation"]["paper-fold3-seed0"] == digests["ablation"]["rdunet-fold3-seed0"]
    assert digests["dilation"]["residual_se-fold0-seed0"] == digests["ablation"]["residual_se-fold0-seed0"]
    assert digests["lesion_size"]["unet-fold1-seed0"] == digests["ablation"]["unet-fold1-seed0"]
    assert len(set(digests["ablation"].values())) == 25
    assert base.eval.small_lesion_area == 25.0 and base.eval.split == "validation"


def test_the_digest_ignores_names_paths_and_bookkeeping_but_not_what_a_run_computes():
    config = make_tiny_config()
    digest = runner.config_digest(config)
    config.name, config.data.data_dir, config.data.manual_dir = "other", "/elsewhere", "/elsewhere/raw"
    config.checkpoint_every_epochs, config.log_every_steps, config.eval.overlay_every_epochs = 7, 3, 5
    config.compilation_cache_dir = "/elsewhere/xla"
    assert runner.config_digest(config) == digest
    config.learning_rate *= 2
    assert runner.config_digest(config) != digest


def test_how_often_a_run_validates_changes_its_digest_only_when_it_is_scored_with_its_best_checkpoint():
    for checkpoint, same in [("last", True), ("best", False)]:
        config = make_tiny_config()
        config.eval.checkpoint = checkpoint
        digest = runner.config_digest(config)
        config.eval.validate_every_epochs = 5
        assert (runner.config_digest(config) == digest) is same, checkpoint


def test_smoke_budget_fits_schedules_to_the_shallow_model():
    settings = design.BUDGETS[("smoke", "semiseg")]
    specs = design.plan(design.STUDIES["ablation"], design.base_config("semiseg", settings, "/d"), (0,))
    resdunet = next(spec for spec in specs if spec.arm == "resdunet")
    rdunet = next(spec for spec in specs if spec.arm == "rdunet")
    assert tuple(resdunet.config.model.encoder_dilation_rates) == (4, 3, 2)
    assert len(rdunet.config.model.skip_dilation_rates) == 2


# --- the runner on the tiny config ------------------------------------------------------------------------


def _flip_arm(flip: bool):
    def apply(config):
        config.data.flip = flip

    return design.Arm("flip" if flip else "no_flip", f"flips {'on' if flip else 'off'}", apply)


TINY_STUDY = design.Study(
    "tiny", "Tiny study", (_flip_arm(True), _flip_arm(False)), reference="flip",
    tables=("per_replicate", "summary", "paired_slices", "lesions"),
)  # fmt: skip


def _tiny_base():
    config = make_tiny_config()
    config.model.update(ONE_LEVEL)
    config.num_epochs = 1
    config.data.cv_folds = 2
    config.eval.split = "validation"
    config.eval.num_overlays = 1
    return config


def _refuse_training(config, workdir):
    raise AssertionError(f"{config.name} was trained again")


@pytest.fixture(scope="session")  # once a worker: see conftest.py
def finished_tiny_study(tmp_path_factory):
    """The tiny study run once: 2 arms x 2 folds (about 15 s)."""
    root = tmp_path_factory.mktemp("study")
    base = _tiny_base()
    specs = design.plan(TINY_STUDY, base, (0,))
    calls = []
    counts = runner.execute(
        TINY_STUDY, specs, "synthetic-tiny", root / "results", root / "runs", train.train_and_evaluate,
        after_each=lambda: calls.append(1),
    )  # fmt: skip
    return root, base, specs, counts, len(calls)


def test_runner_trains_every_run_and_stores_config_metrics_and_slices(finished_tiny_study):
    root, base, specs, counts, callbacks = finished_tiny_study
    assert counts == {"finished": 0, "reused": 0, "trained": 4, "pending": 0} and callbacks == 4
    results = root / "results" / "tiny" / "synthetic-tiny"
    assert sorted(path.name for path in results.glob("*.json")) == sorted(
        f"{spec.name}.json" for spec in specs
    )
    validation_ids = []
    for spec in specs:
        record = json.loads((results / f"{spec.name}.json").read_text())
        assert record["config_digest"] == runner.config_digest(spec.config)
        assert record["config"]["data"]["flip"] == (spec.arm == "flip")
        assert record["split"] == "validation" and record["metrics"]["num_slices"] == 6
        assert 0 <= record["metrics"]["dice"] <= 1 and record["num_parameters"] > 0 and record["epochs"] == 1
        assert len(record["slices"]["id"]) == len(record["slices"]["dice"]) == 6
        assert record["slices"]["dice"] == pytest.approx(record["slices"]["dice"], abs=0)
        assert np.mean(record["slices"]["dice"]) == pytest.approx(record["metrics"]["dice"], abs=1e-5)
        # Phantom slices are stored at the model's size: their original-resolution Dice is the same.
        assert record["original_resolution"]["dice"] == pytest.approx(record["metrics"]["dice"], abs=1e-12)
        assert set(record["original_resolution"]) == {"dice", "jaccard", "f_score", "global_dice"}
        if spec.arm == "flip":
            validation_ids += record["slices"]["id"]
    # The two folds' held-out slices are the whole pool (train + validation of the phantom), once each.
    pool = datasets.load_source(make_tiny_config().data, "train")
    assert len(validation_ids) == len(set(validation_ids)) == 12
    assert {pool[index]["id"] for index in range(len(pool))} < set(validation_ids)


def test_runner_skips_finished_runs_and_reuses_another_studys_runs(finished_tiny_study):
    root, base, specs, _, _ = finished_tiny_study
    again = runner.execute(
        TINY_STUDY, specs, "synthetic-tiny", root / "results", root / "runs", _refuse_training
    )
    assert again == {"finished": 4, "reused": 0, "trained": 0, "pending": 0}
    # Another study with one identical arm copies its records instead of training.
    other = design.Study("other", "Other", (_flip_arm(False),), reference="no_flip", tables=("summary",))
    other_specs = design.plan(other, base, (0,))
    reused = runner.execute(
        other, other_specs, "synthetic-tiny", root / "results", root / "runs", _refuse_training
    )
    assert reused["reused"] == 2
    record = json.loads((root / "results/other/synthetic-tiny/no_flip-fold1-seed0.json").read_text())
    assert record["reused_from"] == "tiny/synthetic-tiny/no_flip-fold1-seed0" and record["study"] == "other"


def test_runner_stops_at_max_runs_and_refuses_a_record_of_another_config(finished_tiny_study, tmp_path):
    root, base, specs, _, _ = finished_tiny_study
    counts = runner.execute(
        TINY_STUDY, specs, "fresh", tmp_path / "results", tmp_path / "runs", _refuse_training, max_runs=0
    )
    assert counts == {"finished": 0, "reused": 0, "trained": 0, "pending": 4}
    changed = base.copy_and_resolve_references()
    changed.num_epochs = 2
    changed_specs = design.plan(TINY_STUDY, changed, (0,))
    with pytest.raises(UserError, match="another config"):
        runner.execute(
            TINY_STUDY, changed_specs, "synthetic-tiny", root / "results", root / "runs", _refuse_training
        )


def test_a_resumed_run_reports_the_wall_time_of_every_session(tmp_path):
    specs = design.plan(TINY_STUDY, _tiny_base(), (0,))[:1]
    sessions = []

    def interrupted_then_trained(config, workdir):
        sessions.append(workdir)
        if len(sessions) == 1:
            time.sleep(0.3)
            raise KeyboardInterrupt  # e.g. the session ended mid-run
        return train.train_and_evaluate(config, workdir)

    arguments = (TINY_STUDY, specs, "t", tmp_path / "results", tmp_path / "runs", interrupted_then_trained)
    with pytest.raises(KeyboardInterrupt):
        runner.execute(*arguments)
    first = float((sessions[0] / runner.WALL_SECONDS_FILE).read_text())
    assert 0.3 <= first < 5
    runner.execute(*arguments)
    record = json.loads((tmp_path / "results" / "tiny" / "t" / f"{specs[0].name}.json").read_text())
    total = float((sessions[1] / runner.WALL_SECONDS_FILE).read_text())
    assert record["wall_seconds"] == total and total > first


def test_tables_of_the_tiny_study(finished_tiny_study):
    root, base, specs, _, _ = finished_tiny_study
    records = runner.load_records(TINY_STUDY, specs, "synthetic-tiny", root / "results")
    budget = design.Budget(32, 1, 4, 1e-2, 20, cv_folds=2, seeds=(0,), model_features=4, model_depth=2)
    markdown = tables.study_markdown(TINY_STUDY, base, "tiny", budget, specs, records, "python run tiny")
    assert "```\npython run tiny\n```" in markdown
    assert "| Model | fold0-seed0 | fold1-seed0 | mean [95% CI] |" in markdown
    assert "Runs finished: 4 of 4" in markdown and "2-fold cross-validation" in markdown
    assert "32x32 px, 1 epochs" in markdown and "model shrunk to 4 feature maps and 2 levels" in markdown
    # The paired row: 12 slices, the mean of per-slice differences computed here from the records.
    differences = []
    for fold in (0, 1):
        flip, no_flip = (records[f"{arm}-fold{fold}-seed0"]["slices"] for arm in ("flip", "no_flip"))
        assert flip["id"] == no_flip["id"]
        differences += list(np.subtract(no_flip["dice"], flip["dice"]))
    paired_section = markdown.split("## Paired difference")[1]
    row = next(line for line in paired_section.splitlines() if line.startswith("| flips off"))
    assert row.endswith("| 12 |") and row.split("|")[2].strip().startswith(f"{np.mean(differences):.4f}")
    # Paired with a second arm too (the recipe study's chosen candidate): the differences negated. The tiny
    # arms may score alike, so the second arm's slices are raised by 0.1 on average to give the pairing a
    # sign, and by 0.05, 0.1 or 0.15 by slice to give its interval a width.
    raised = copy.deepcopy(records)
    raised_differences = []
    for fold in (0, 1):
        slices = raised[f"no_flip-fold{fold}-seed0"]["slices"]
        slices["dice"] = [value + 0.1 + 0.05 * (index % 3 - 1) for index, value in enumerate(slices["dice"])]
        flip = records[f"flip-fold{fold}-seed0"]["slices"]["dice"]
        raised_differences += list(np.subtract(flip, slices["dice"]))
    twice = dataclasses.replace(TINY_STUDY, also_paired_with="no_flip")
    markdown_twice = tables.study_markdown(twice, base, "tiny", budget, specs, raised, "cmd")
    second_section = markdown_twice.split("## Paired difference to `no_flip`, per slice")[1]
    row = next(line for line in second_section.splitlines() if line.startswith("| flips on"))
    expected = -np.mean(differences) - 0.1
    assert row.endswith("| 12 |") and float(row.split("|")[2].split()[0]) == pytest.approx(expected, abs=1e-4)
    # Its 95% interval against an independent percentile bootstrap of the same differences (another
    # generator, 100,000 resamples): within a tenth of the interval's width.
    low, high = (float(value) for value in row.split("[")[1].split("]")[0].split(","))
    draws = np.random.default_rng(123).integers(0, 12, (100_000, 12))
    expected_low, expected_high = np.percentile(
        np.asarray(raised_differences)[draws].mean(axis=1), [2.5, 97.5]
    )
    tolerance = 0.1 * (expected_high - expected_low)
    assert low == pytest.approx(expected_low, abs=tolerance) and high == pytest.approx(
        expected_high, abs=tolerance
    )
    assert "## Paired difference to `no_flip`" not in markdown
    # A missing run shows as '…' and is left out of the means.
    partial = {name: record for name, record in records.items() if name != "no_flip-fold1-seed0"}
    markdown = tables.study_markdown(TINY_STUDY, base, "tiny", budget, specs, partial, "cmd")
    assert "Runs finished: 3 of 4" in markdown and " | … | " in markdown and "(n=1)" in markdown


# --- the command line ---------------------------------------------------------------------------------


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    status = run_study.main(
        ["dilation", "--budget", "smoke", "--dry_run", "--results_root", str(tmp_path / "r"),
         "--runs_root", str(tmp_path / "w")]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and len(lines) == 13 and lines[0].startswith("paper-fold0-seed0")
    assert all(" pending " in line for line in lines[:-1]) and not (tmp_path / "r").exists()


def test_cli_folds_and_arms_select_their_runs(tmp_path, capsys):
    roots = ["--results_root", str(tmp_path / "r"), "--runs_root", str(tmp_path / "w")]
    assert run_study.main(["ablation", "--budget", "smoke", "--dry_run", "--folds", "1", *roots]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        f"{arm}-fold1-seed0" for arm in ("unet", "residual", "residual_se", "rdunet", "resdunet")
    ]
    assert run_study.main(["ablation", "--budget", "smoke", "--dry_run", "--folds", "2", *roots]) == 2
    assert capsys.readouterr().err == "error: --folds 2: folds run from 0 to 1\n"
    assert run_study.main(["split_leakage", "--budget", "smoke", "--dry_run", "--folds", "0", *roots]) == 2
    assert "no cross-validation folds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_study.parse_args(["ablation", "--folds", "one"])
    arms = ["--arms", "unet,rdunet", "--folds", "0"]
    assert run_study.main(["ablation", "--budget", "smoke", "--dry_run", *arms, *roots]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["unet-fold0-seed0", "rdunet-fold0-seed0"]
    assert run_study.main(["ablation", "--budget", "smoke", "--dry_run", "--arms", "unet,vnet", *roots]) == 2
    assert capsys.readouterr().err.startswith("error: --arms: vnet not in the ablation study's arms ['unet',")


def test_the_semiseg_config_is_the_chosen_recipe_arm_without_its_fold():
    recipes = design.semiseg_recipes()
    budget = design.BUDGETS[("small", "semiseg")]
    specs = design.plan(design.STUDIES["recipe"], design.base_config("semiseg", budget, "/d"), (0,))
    arm = next(spec for spec in specs if spec.arm == recipes.CHOSEN_RECIPE).config
    config = recipes.get_config()
    differing = _differing_keys(config_lib.to_json(arm), config_lib.to_json(config))
    # Only what locates the data, names the run and makes it a CV fold differs, and the speed forms the
    # study's records were made with (design.base_config): the same function, and no dropout to draw.
    assert differing == {"name", "data.manual_dir", "data.cv_folds", "eval.split"} | {
        "model.dropout_impl",
        "model.pool_impl",
        "model.batch_norm_impl",
    }
    assert config.model.dropout_rate == 0.0
    chosen = recipes.RECIPE_CANDIDATES[recipes.CHOSEN_RECIPE]
    assert config.data.image_size == chosen["data.image_size"] and config.eval.checkpoint == "last"
    assert config.eval.small_lesion_area == 100.0 * (config.data.image_size / 256) ** 2
    assert recipes.get_config("unet").model.block == "plain"


def test_cli_budget_overrides_tag_and_command(capsys):
    args = run_study.parse_args(
        ["ablation", "--budget", "small", "--set", "num_epochs=5", "--set", "seeds=0,1"]
    )
    study, dataset, budget, base, specs, tag = run_study.prepare_study(args)
    assert (budget.num_epochs, budget.seeds, base.num_epochs) == (5, (0, 1), 5)
    assert len(specs) == 5 * 5 * 2 and tag == "semiseg-small-num_epochs5-seeds0_1"
    assert run_study.canonical_command(args, dataset) == (
        "python -m experiments.run_study ablation --budget small --data_root ../shared/data "
        "--set num_epochs=5 --set seeds=0,1"
    )
    assert run_study.main(["ablation", "--set", "epochs=3", "--dry_run"]) == 2
    assert "KEY one of" in capsys.readouterr().err
    assert run_study.main(["split_leakage", "--dataset", "semiseg", "--dry_run"]) == 2


def test_a_key_added_to_the_schema_later_matches_at_its_default(finished_tiny_study, tmp_path):
    root, base, specs, _, _ = finished_tiny_study
    source = root / "results" / "tiny" / "synthetic-tiny" / f"{specs[0].name}.json"
    results = tmp_path / "results" / "tiny" / "synthetic-tiny"
    record = json.loads(source.read_text())
    del record["config"]["eval"]["test_time_flips"]  # as if recorded before the key existed
    results.mkdir(parents=True)
    (results / source.name).write_text(json.dumps(record))
    assert runner.run_status(specs[0], results, tmp_path / "results")[0] == "finished"
    changed = specs[0].config.copy_and_resolve_references()
    changed.eval.test_time_flips = True  # not the default: not what the old run computed
    assert not runner.same_run(record["config"], changed)
    # A speed option the record lacks stood for its old form, not for today's default.
    older = json.loads(json.dumps(record["config"]))
    del older["model"]["batch_norm_impl"]
    old_form = specs[0].config.copy_and_resolve_references()
    old_form.model.batch_norm_impl = "flax"
    assert old_form.model.batch_norm_impl != specs[0].config.model.batch_norm_impl
    assert runner.same_run(older, old_form)
    assert not runner.same_run(older, specs[0].config)
    # The run's workdir is found by its config.json even when the digest names another folder.
    runs = tmp_path / "runs"
    (runs / "renamed").mkdir(parents=True)
    (runs / "renamed" / "config.json").write_text(json.dumps(record["config"]))
    assert runner.workdir_for(runs, specs[0].config) == runs / "renamed"
    assert runner.workdir_for(runs, changed) == runs / runner.config_digest(changed)


def test_cli_seeds_select_runs_and_dtype_changes_the_model_and_tag(tmp_path, capsys):
    roots = ["--results_root", str(tmp_path / "r"), "--runs_root", str(tmp_path / "w")]
    common = ["ablation", "--budget", "paper", "--dataset", "ma2020_2d", "--dry_run", *roots]
    assert run_study.main([*common, "--seeds", "2", "--arms", "unet,rdunet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["unet-seed2", "rdunet-seed2"]
    assert run_study.main([*common, "--seeds", "0,3"]) == 2
    assert capsys.readouterr().err == "error: --seeds 0,3: this budget's seeds are 0,1,2\n"

    args = run_study.parse_args([*common, "--set", "dtype=bfloat16", "--set", "num_epochs=100"])
    study, dataset, budget, base, specs, tag = run_study.prepare_study(args)
    assert tag == "ma2020_2d-paper-dtypebfloat16-num_epochs100" and budget.batch_size == 8
    assert {spec.config.model.dtype for spec in specs} == {"bfloat16"} and base.num_epochs == 100
    assert "bfloat16 compute" in budget.describe()
    float32 = run_study.prepare_study(run_study.parse_args(common))[4]
    # Same runs otherwise, so the digests differ by the compute type alone.
    assert _differing_keys(config_lib.to_json(specs[0].config), config_lib.to_json(float32[0].config)) == {
        "model.dtype",
        "num_epochs",
    }
    assert run_study.main([*common, "--set", "dtype=float16"]) == 2
    assert "not a valid dtype" in capsys.readouterr().err


def test_checkpoint_last_scores_the_last_epoch_and_says_how_every_table_was_scored(tmp_path):
    roots = ["--results_root", str(tmp_path / "r"), "--runs_root", str(tmp_path / "w")]
    common = ["ablation", "--budget", "small", "--dry_run", *roots]
    _, _, best, _, best_specs, best_tag = run_study.prepare_study(run_study.parse_args(common))
    _, _, last, _, last_specs, last_tag = run_study.prepare_study(
        run_study.parse_args([*common, "--set", "checkpoint=last"])
    )
    # The stored records' selection stays the default, so they reproduce; 'last' is its own tag and runs.
    assert (best_tag, last_tag) == ("semiseg-small", "semiseg-small-checkpointlast")
    assert {spec.config.eval.checkpoint for spec in best_specs} == {"best"}
    assert {spec.config.eval.checkpoint for spec in last_specs} == {"last"}
    assert _differing_keys(
        config_lib.to_json(best_specs[0].config), config_lib.to_json(last_specs[0].config)
    ) == {"eval.checkpoint"}
    assert tables.scoring_line(best_specs[0].config, best_specs) == (
        "Every run is scored at the epoch of lowest loss on the held-out fold it is scored on (chosen on the "
        "scored slices: optimistic)."
    )
    assert tables.scoring_line(last_specs[0].config, last_specs) == (
        "Every run is scored at its last epoch (the held-out fold unseen)."
    )
    # The recipe study's reference arm kept the default while its candidates score the last epoch.
    recipe = run_study.prepare_study(
        run_study.parse_args(["recipe", "--budget", "small", "--dry_run", *roots])
    )
    line = tables.scoring_line(recipe[3], recipe[4])
    assert line.startswith("Runs are scored: `rdunet` at the epoch of lowest loss on the held-out fold")
    assert "(chosen on the scored slices: optimistic); `r128" in line
    assert run_study.main([*common, "--set", "checkpoint=first"]) == 2


@pytest.mark.parametrize(
    ("study", "folder", "settings"),
    [
        ("ablation", "semiseg-small", []),
        ("ablation", "semiseg-small-checkpointlast", ["--set", "checkpoint=last"]),
        ("lesion_size", "semiseg-small", []),
        ("lesion_size", "semiseg-small-checkpointlast", ["--set", "checkpoint=last"]),
        ("dilation", "semiseg-small", []),
        ("dilation", "semiseg-small-checkpointlast", ["--set", "checkpoint=last"]),
        ("split_leakage", "ma2020_2d-small", []),
        ("recipe", "semiseg-small", []),
    ],
)
def test_every_committed_study_record_is_still_the_run_its_plan_describes(
    study, folder, settings, tmp_path, capsys
):
    # A plan whose config no longer matches a record refuses it ("made with another config"), and a rerun
    # would not reproduce it: a change to the schema's defaults must leave every record finished.
    results = run_study.EXPERIMENTS / "results" / study / folder
    records = sorted(path.stem for path in results.glob("*.json"))
    status = run_study.main(
        [study, "--budget", "small", *settings, "--dry_run", "--runs_root", str(tmp_path / "w")]
    )
    lines = capsys.readouterr().out.splitlines()
    finished = sorted(line.split()[0] for line in lines if " finished " in line)
    assert status == 0 and len(records) >= 6
    assert finished == records
