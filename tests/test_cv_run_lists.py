"""The cross-validation run lists of experiments/*_cv_runs.txt (gpu_session.sh's cv phase): every line names a
candidate, a fold, a shipped config and overrides that make a valid config; a GPU session is too short to find
a typo there."""

import json
import pathlib

import pytest
from helpers import make_ma2020, make_semiseg

from experiments import prepare_cv
from rdunet_jax import config_lib, config_validation, selftrain

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
RUN_LISTS = sorted(EXPERIMENTS.glob("*_cv_runs.txt"))


@pytest.mark.parametrize("run_list", RUN_LISTS, ids=[path.name for path in RUN_LISTS])
def test_every_line_is_a_valid_config_of_a_fold(run_list):
    runs = prepare_cv.run_list_configs(run_list, "/data")
    assert runs
    for candidate, fold, config in runs:
        assert 0 <= fold < 5 and candidate and config.data.cv_fold == fold
        config_validation.validate(config)


def test_data_root_stands_for_the_sessions_data_folder_and_bad_lines_are_refused(tmp_path):
    run_list = tmp_path / "joint_cv_runs.txt"
    run_list.write_text(
        "# comment\n\njoint 3 configs/semiseg.py --config.loss=dice_weighted "
        "--config.data.extra_labelled_dir={data_root}/covid19-ct-seg-2d\n"
    )
    [(candidate, fold, config)] = prepare_cv.run_list_configs(run_list, "/gpu/data", "/tmp/tfds")
    assert (candidate, fold, config.loss) == ("joint", 3, "dice_weighted")
    assert config.data.extra_labelled_dir == "/gpu/data/covid19-ct-seg-2d"
    assert (config.data.data_dir, config.data.cv_folds) == ("/tmp/tfds", 5)
    for bad in ("joint 5 configs/semiseg.py", "joint 0 configs/semiseg.py loss=dice"):
        run_list.write_text(bad + "\n")
        with pytest.raises(ValueError, match="not 'candidate fold"):
            prepare_cv.run_list_configs(run_list, "/gpu/data")


def test_prepare_builds_every_dataset_the_runs_read_before_they_start(tmp_path, capsys):
    make_semiseg(tmp_path / "data" / "covid-semiseg")
    make_ma2020(tmp_path / "data" / "covid19-ct-seg-2d")
    run_list = tmp_path / "joint_cv_runs.txt"
    overrides = "--config.loss=dice_weighted --config.data.extra_labelled_dir={data_root}/covid19-ct-seg-2d"
    run_list.write_text(
        "".join(
            f"{name} {fold} configs/semiseg.py {extra}\n"
            for name, extra in (("recipe", ""), ("joint", overrides))
            for fold in (0, 1)
        )
    )
    prepare_cv.main([str(run_list), str(tmp_path / "data"), str(tmp_path / "tfds")])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prepared the data")]
    assert printed == ["prepared the data of recipe", "prepared the data of joint"]  # once each
    prepared = sorted(
        path.name.split("-")[0] for path in (tmp_path / "tfds" / "covid_ct_slices").glob("[!.]*")
    )
    assert prepared == ["ma2020_2d", "semiseg"]


RECORDS = EXPERIMENTS / "results" / "recipe" / "selftrain-cv"


def _student_settings(config: dict, keys: dict) -> dict:
    """What a self-training student learns from: its schedule, its `selftrain` keys (those in `keys`: a record
    predates the keys added after it, which default to what it ran) and the data keys only students read
    (the pseudo-label folder aside: it names the workdir)."""
    schedule = {key: config[key] for key in ("num_epochs", "lr_decay_epochs", "batch_size")}
    selftrain_settings = {key: config["selftrain"][key] for key in keys if key != "rounds"}
    data = {key: config["data"][key] for key in selftrain.STUDENT_DATA_KEYS if key != "pseudo_label_dir"}
    # A record that predates a model key ran its default.
    defaults = config_lib.base_config().model
    model = {key: config["model"].get(key, defaults[key]) for key in selftrain.STUDENT_MODEL_KEYS}
    return {"schedule": schedule, "selftrain": selftrain_settings, "data": data, "model": model}


@pytest.mark.parametrize("run_list", RUN_LISTS, ids=[path.name for path in RUN_LISTS])
def test_a_run_list_still_gives_the_students_its_stored_records_were_trained_as(run_list):
    # A change of the shipped config must not quietly change what a run list reproduces: each line's last
    # student is compared with the config.json stored with that run's record, where the command line ran it
    # (a selftrain.json beside it; a one-off script's record has none).
    for candidate, fold, config in prepare_cv.run_list_configs(run_list, "/data"):
        rounds = config.selftrain.rounds
        run = RECORDS / f"{candidate}-cv{fold}"
        if not rounds or not (run / "selftrain.json").is_file():
            continue
        stored = json.loads((run / f"student{rounds}" / "config.json").read_text())
        student = selftrain.student_config(config, pathlib.Path("labels"), pathlib.Path("teacher")).to_dict()
        keys = stored["selftrain"]
        assert _student_settings(student, keys) == _student_settings(stored, keys), f"{candidate} fold {fold}"
