"""experiments.cv_table: per-class cross-validation Dice read from workdirs, against hand values."""

import json

import numpy as np
import pytest
from helpers import recipe_records

from experiments import cv_table


def _workdir(root, name: str, class_rows: list[tuple], slice_dice: dict, epoch_seconds=(1.5, 2.5)):
    """A finished run's files: class_rows are (id, class, present, dice)."""
    metrics = root / name / "metrics"
    metrics.mkdir(parents=True)
    lines = ["id,class,present,dice,jaccard,precision,recall,expert_pixels,predicted_pixels"]
    lines += [f"{slice_id},{cls},{present},{dice},0,0,0,0,0" for slice_id, cls, present, dice in class_rows]
    (metrics / "validation_classes.csv").write_text("\n".join(lines) + "\n")
    (metrics / "validation_slices.csv").write_text(
        "id,dice\n" + "".join(f"{slice_id},{dice}\n" for slice_id, dice in slice_dice.items())
    )
    log = [
        json.dumps({"epoch": epoch + 1, "seconds": seconds}) for epoch, seconds in enumerate(epoch_seconds)
    ]
    (root / name / "train_log.jsonl").write_text("\n".join(log) + "\n")


@pytest.fixture
def root(tmp_path):
    # Reference: fold 0 slices a, b; fold 1 slice c. 'ggo' absent from b (its Dice 1 there is not counted).
    _workdir(tmp_path, "ref-cv0", [("a", "ggo", 1, 0.5), ("b", "ggo", 0, 1.0), ("b", "cons", 1, 0.2)],
             {"a": 0.6, "b": 0.4})  # fmt: skip
    _workdir(tmp_path, "ref-cv1", [("c", "ggo", 1, 0.7), ("c", "cons", 0, 0.0)], {"c": 0.8})
    _workdir(tmp_path, "alt-cv0", [("a", "ggo", 1, 0.6), ("b", "ggo", 0, 0.0), ("b", "cons", 1, 0.4)],
             {"a": 0.7, "b": 0.5})  # fmt: skip
    _workdir(tmp_path, "alt-cv1", [("c", "ggo", 1, 0.9), ("c", "cons", 0, 1.0)], {"c": 0.8})
    (tmp_path / "unfinished-cv0").mkdir()  # no metrics: left out
    (tmp_path / "queued-cv2").symlink_to(tmp_path / "not-yet-started")  # a link to a run not begun: left out
    (tmp_path / "notes-cv3").write_text("a file, not a run")
    return tmp_path


def test_only_slices_holding_a_class_count_and_folds_are_pooled(root):
    runs = cv_table.collect(root)
    assert sorted(runs) == ["alt", "ref"] and sorted(runs["ref"]) == [0, 1]
    by_slice, fold_means = cv_table.class_values(runs["ref"], "ggo")
    assert by_slice == {"a": 0.5, "c": 0.7}
    assert fold_means == [0.5, 0.7]
    assert cv_table.class_values(runs["ref"], "cons") == ({"b": 0.2}, [0.2])
    assert cv_table.class_values(runs["alt"], "any lesion")[1] == pytest.approx([0.6, 0.8])
    assert runs["ref"][0]["seconds"] == 4.0 and runs["ref"][0]["epochs"] == 2


def test_the_table_pairs_each_candidate_with_the_reference_per_slice(root):
    table = cv_table.markdown(cv_table.collect(root), "ref")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in table.splitlines()}
    # ggo: alt - ref on slices a and c: +0.1 and +0.2; mean 0.15, and a bootstrap over two values stays
    # between them.
    ggo = rows["alt", "2", "ggo"].split("|")
    assert ggo[4].strip() == "2" and ggo[5].startswith(" 0.750 ")  # (0.6 + 0.9) / 2
    assert ggo[7].strip() == "0.150 [0.100, 0.200] (n=2)"
    # Over folds: t-interval of the fold means 0.6 and 0.9.
    half_width = 12.706 * np.std([0.6, 0.9], ddof=1) / np.sqrt(2)
    assert ggo[6].strip() == f"0.750 [{0.75 - half_width:.3f}, {0.75 + half_width:.3f}]"
    assert rows["alt", "2", "cons"].split("|")[7].strip() == "0.200 [0.200, 0.200] (n=1)"
    assert rows["ref", "2", "ggo"].split("|")[7].strip() == ""  # the reference is not paired with itself
    assert "| ref | 1 | 2 | 4 |" in table


def test_without_train_logs_the_table_has_no_timing(root):
    for log in root.glob("*/train_log.jsonl"):
        log.unlink()
    table = cv_table.markdown(cv_table.collect(root), "ref")
    assert "| alt | 2 | ggo | 2 | 0.750 " in table and "training seconds" not in table


def test_binary_runs_have_only_the_lesion_row(tmp_path):
    for name, dice in (("recipe-cv0", {"a": 0.5, "b": 0.7}), ("mt-cv0", {"a": 0.6, "b": 0.9})):
        _workdir(tmp_path, name, [], dice)
        (tmp_path / name / "metrics" / "validation_classes.csv").unlink()
    table = cv_table.markdown(cv_table.collect(tmp_path), "recipe")
    body = [line for line in table.splitlines() if line.startswith("| mt |") or line.startswith("| recipe |")]
    assert [line.split("|")[3].strip() for line in body[:2]] == ["any lesion", "any lesion"]
    assert "0.150 [0.100, 0.200] (n=2)" in body[0]  # mt - recipe: +0.1 and +0.2


def test_a_runs_stages_are_candidates_paired_with_each_other(tmp_path):
    # Self-training keeps its teacher and student in folders of the fold's workdir, with no metrics of its
    # own at the top; another candidate's top-level run sits beside them.
    for fold, teacher, student in (
        (0, {"a": 0.5, "b": 0.7}, {"a": 0.6, "b": 0.6}),
        (1, {"c": 0.4}, {"c": 0.7}),
    ):
        _workdir(tmp_path / f"st-cv{fold}", "teacher", [], teacher)
        _workdir(tmp_path / f"st-cv{fold}", "student1", [], student)
        (tmp_path / f"st-cv{fold}" / "checkpoints").mkdir()  # a folder without metrics is no stage
    _workdir(tmp_path, "joint-cv0", [], {"a": 0.9, "b": 0.9})
    runs = cv_table.collect(tmp_path)
    assert sorted(runs) == ["joint", "st/student1", "st/teacher"]
    assert sorted(runs["st/teacher"]) == [0, 1] and sorted(runs["joint"]) == [0]
    table = cv_table.markdown(runs, "st/teacher")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in table.splitlines()}
    # student - teacher per slice: +0.1, -0.1, +0.3; joint - teacher: +0.4, +0.2 (fold 0 only).
    assert rows["st/student1", "2", "any lesion"].split("|")[7].strip().startswith("0.100 [")
    assert rows["st/student1", "2", "any lesion"].split("|")[7].strip().endswith("(n=3)")
    assert rows["joint", "1", "any lesion"].split("|")[7].strip() == "0.300 [0.200, 0.400] (n=2)"


@pytest.fixture
def records(tmp_path, monkeypatch):
    """The recipe's records of folds 0 and 1 (and 2, which no candidate holds), apart from the runs."""
    recipe_records(tmp_path / "records", monkeypatch, {0: {"a": 0.4, "b": 0.5}, 1: {"c": 0.6}, 2: {"d": 0.0}})


def test_candidates_pair_with_the_recipe_record_of_their_folds(root, records):
    runs = cv_table.collect(root)
    del runs["ref"]  # the record pairs binary candidates only: alt's class rows go too
    for run in runs["alt"].values():
        run["per_class"] = {}
    runs = cv_table.with_recipe_record(runs)
    assert sorted(runs["recipe-record"]) == [0, 1]  # fold 2: no candidate holds it
    table = cv_table.markdown(runs, "recipe-record")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in table.splitlines()}
    # alt's any-lesion Dice a 0.7, b 0.5, c 0.8 against the record's 0.4, 0.5, 0.6: +0.3, 0, +0.2.
    assert rows["alt", "2", "any lesion"].split("|")[7].strip().startswith("0.167 [")
    assert rows["recipe-record", "2", "any lesion"].split("|")[5].startswith(" 0.500 ")
    assert "| recipe-record | 0 |" not in table  # a record has no training time of its own


def test_the_command_pairs_binary_runs_with_the_record(tmp_path, records, capsys):
    runs = tmp_path / "runs"
    _workdir(runs, "mt-cv0", [], {"a": 0.6, "b": 0.9})
    (runs / "mt-cv0" / "metrics" / "validation_classes.csv").unlink()
    assert cv_table.main([str(runs), "--reference", "recipe-record"]) == 0
    assert "| mt | 1 | any lesion | 2 | 0.750 " in capsys.readouterr().out
    assert "0.300 [0.200, 0.400] (n=2)" in cv_table.markdown(
        cv_table.with_recipe_record(cv_table.collect(runs)), "recipe-record"
    )


def test_the_record_refuses_what_it_cannot_pair(tmp_path, root, records, capsys):
    # Multi-class runs: the record has the lesion mask only.
    assert cv_table.main([str(root), "--reference", "recipe-record"]) == 2
    assert capsys.readouterr().err.startswith("error: alt: multi-class; the recipe's record scores")
    # Slices that are not the record's fold (another cv_seed), and a fold the study never ran.
    for name, dice, message in (
        ("mt-cv0", {"a": 0.6, "x": 0.9}, "mt-cv0, fold 0: scored 2 slices, the recipe's record 2, 2 not in"),
        ("mt-cv7", {"a": 0.6}, "no record of the recipe for fold 7"),
    ):
        runs = tmp_path / name / "runs"
        _workdir(runs, name, [], dice)
        (runs / name / "metrics" / "validation_classes.csv").unlink()
        assert cv_table.main([str(runs), "--reference", "recipe-record"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
    # The record's slices scored otherwise (its config.json says so): at another resolution, with the best
    # checkpoint rather than the last.
    runs = tmp_path / "other-scoring" / "runs"
    _workdir(runs, "mt-cv0", [], {"a": 0.6, "b": 0.9})
    (runs / "mt-cv0" / "metrics" / "validation_classes.csv").unlink()
    scoring = {"test_time_flips": True, "checkpoint": "best", "threshold": 0.5}
    config = {**_config(image_size=512), "eval": scoring}
    (runs / "mt-cv0" / "config.json").write_text(json.dumps(config))
    assert cv_table.main([str(runs), "--reference", "recipe-record"]) == 2
    assert capsys.readouterr().err == (
        "error: mt-cv0, fold 0: scored otherwise than the recipe's record: data.image_size=512 (the record's "
        "128), eval.checkpoint='best' (the record's 'last')\n"
    )
    config["data"]["image_size"], scoring["checkpoint"] = 128, "last"
    (runs / "mt-cv0" / "config.json").write_text(json.dumps(config))
    assert cv_table.main([str(runs), "--reference", "recipe-record"]) == 0


def _config(**data):
    """A run's config.json contents: the data settings given, the rest as configs/semiseg.py's teacher."""
    defaults = {"name": "semiseg", "extra_labelled_dir": "", "extra_fraction": 0.5, "pseudo_label_dir": "",
                "pseudo_fraction": 0.5, "unlabelled_fraction": 0.0}  # fmt: skip
    return {"data": {**defaults, **data}, "consistency": {"weight": 0.0}, "model_init": ""}


def test_each_candidate_is_labelled_with_what_it_learned_from(tmp_path):
    root = tmp_path / "runs"
    # Restoration pretraining on the pool, kept under root/pretraining/ (its own workdir gone); supervised
    # pretraining on Ma et al.'s slices, still where it ran.
    (root / "pretraining" / "restore-pool").mkdir(parents=True)
    (root / "pretraining" / "restore-pool" / "pretraining.json").write_text("{}")
    (tmp_path / "pretrain-ma").mkdir()
    (tmp_path / "pretrain-ma" / "config.json").write_text(json.dumps(_config(name="ma2020_2d")))
    (tmp_path / "pretrain-own").mkdir()  # a start trained on the same labelled slices adds nothing
    (tmp_path / "pretrain-own" / "config.json").write_text(json.dumps(_config()))
    mean_teacher = {**_config(unlabelled_fraction=0.5), "consistency": {"weight": 1.0}}
    cases = {
        # Fractions alone (the defaults) bring in nothing without a source.
        "recipe": (_config(), "labelled only"),
        "student": (_config(pseudo_label_dir="/p/round1", pseudo_fraction=0.2), "plus unlabelled"),
        "no-pseudo": (_config(pseudo_label_dir="/p/round1", pseudo_fraction=0.0), "labelled only"),
        "meanteacher": (mean_teacher, "plus unlabelled"),
        "weightless": ({**mean_teacher, "consistency": {"weight": 0.0}}, "labelled only"),
        "joint": (_config(extra_labelled_dir="/ma", extra_fraction=0.2), "plus other labelled data"),
        "both": (
            _config(extra_labelled_dir="/ma", pseudo_label_dir="/p"),
            "plus other labelled data and plus unlabelled",
        ),
        "restoreinit": (
            {**_config(), "model_init": str(tmp_path / "gone" / "restore-pool")},
            "plus unlabelled",
        ),
        "mainit": ({**_config(), "model_init": str(tmp_path / "pretrain-ma")}, "plus other labelled data"),
        "joint-owninit": (
            {**_config(extra_labelled_dir="/ma"), "model_init": str(tmp_path / "pretrain-own")},
            "plus other labelled data",
        ),
        "lostinit": ({**_config(), "model_init": "/nowhere/pre"}, "pretrained (pre: its data unknown)"),
        # Fine-tuned from another candidate's run, kept beside it (its own workdir gone).
        "jointft": (
            {**_config(), "model_init": str(tmp_path / "gone" / "joint-cv0")},
            "plus other labelled data",
        ),
    }
    for name, (config, _) in cases.items():
        _workdir(root, f"{name}-cv0", [], {"a": 0.5})
        (root / f"{name}-cv0" / "config.json").write_text(json.dumps(config))
    _workdir(root, "noconfig-cv0", [], {"a": 0.5})
    # A self-training run kept with its stages: the student started from its own teacher, which ran in a
    # workdir of another name.
    _workdir(root / "st-cv0", "teacher", [], {"a": 0.5})
    (root / "st-cv0" / "teacher" / "config.json").write_text(json.dumps(_config()))
    _workdir(root / "st-cv0", "student1", [], {"a": 0.5})
    student = {
        **_config(pseudo_label_dir="/p/round1"),
        "model_init": str(tmp_path / "gone" / "st0" / "teacher"),
    }
    (root / "st-cv0" / "student1" / "config.json").write_text(json.dumps(student))
    # Its second round started from student1, which started from the teacher, both kept beside it.
    _workdir(root / "st-cv0", "student2", [], {"a": 0.5})
    student2 = {**student, "model_init": str(tmp_path / "gone" / "st0" / "student1")}
    (root / "st-cv0" / "student2" / "config.json").write_text(json.dumps(student2))
    # Where the start still is at its recorded path, the copy kept beside the student is read first: here
    # the recorded path now holds another dataset's run.
    (tmp_path / "elsewhere" / "teacher").mkdir(parents=True)
    (tmp_path / "elsewhere" / "teacher" / "config.json").write_text(json.dumps(_config(name="ma2020_2d")))
    _workdir(root / "st-cv1", "teacher", [], {"a": 0.5})
    (root / "st-cv1" / "teacher" / "config.json").write_text(json.dumps(_config()))
    _workdir(root / "st-cv1", "student1", [], {"a": 0.5})
    moved = {**student, "model_init": str(tmp_path / "elsewhere" / "teacher")}
    (root / "st-cv1" / "student1" / "config.json").write_text(json.dumps(moved))
    # A top-level run's start is read where it was recorded before any copy under root of that name.
    (tmp_path / "other" / "start").mkdir(parents=True)
    (tmp_path / "other" / "start" / "config.json").write_text(json.dumps(_config(name="ma2020_2d")))
    (root / "start").mkdir()
    (root / "start" / "config.json").write_text(json.dumps(_config()))
    _workdir(root, "ft-cv0", [], {"a": 0.5})
    (root / "ft-cv0" / "config.json").write_text(
        json.dumps({**student, "model_init": str(tmp_path / "other" / "start")})
    )
    # Started from that run (kept under root): its categories and this run's own are named once each.
    _workdir(root, "ft2-cv0", [], {"a": 0.5})
    (root / "ft2-cv0" / "config.json").write_text(json.dumps({**student, "model_init": "/gone/ft-cv0"}))
    runs = cv_table.collect(root)
    assert runs["st/student1"][0]["category"] == "plus unlabelled"
    assert runs["st/student2"][0]["category"] == "plus unlabelled"
    assert runs["st/teacher"][0]["category"] == "labelled only"
    assert runs["st/student1"][1]["category"] == "plus unlabelled"
    assert runs["ft"][0]["category"] == "plus other labelled data and plus unlabelled"
    assert runs["ft2"][0]["category"] == "plus other labelled data and plus unlabelled"
    assert {name: runs[name][0]["category"] for name in cases} == {name: c for name, (_, c) in cases.items()}
    assert runs["noconfig"][0]["category"] == "unknown"
    table = cv_table.markdown(runs, "recipe")
    assert table.splitlines()[0].endswith("| category |")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if "| any lesion |" in line}
    assert rows["joint"].endswith("| plus other labelled data |")
    assert rows["recipe"].endswith("|  | labelled only |")  # the reference: no pairing, its category


def _second_draw(root):
    """alt's recipe drawn again: any-lesion a 0.5, b 0.7, c 0.6 (alt's 0.7, 0.5, 0.8)."""
    _workdir(root, "alt2-cv0", [("a", "ggo", 1, 0.8), ("b", "ggo", 0, 0.0), ("b", "cons", 1, 0.2)],
             {"a": 0.5, "b": 0.7})  # fmt: skip
    _workdir(root, "alt2-cv1", [("c", "ggo", 1, 0.7), ("c", "cons", 0, 1.0)], {"c": 0.6})


def test_draws_are_averaged_per_slice_and_paired_as_one_candidate(root, capsys):
    _second_draw(root)
    averaged = cv_table.averaged_draws(cv_table.collect(root), "alt-both", ["alt", "alt2"])
    assert sorted(averaged) == [0, 1]
    assert averaged[0]["any lesion"] == pytest.approx({"a": 0.6, "b": 0.6})
    assert averaged[1]["any lesion"] == pytest.approx({"c": 0.7})
    # Per class, the slices holding it: ggo a (0.6, 0.8), c (0.9, 0.7); cons b (0.4, 0.2).
    assert sorted(averaged[0]["per_class"]) == ["cons", "ggo"] and list(averaged[1]["per_class"]) == ["ggo"]
    assert averaged[0]["per_class"]["ggo"] == pytest.approx({"a": 0.7})
    assert averaged[0]["per_class"]["cons"] == pytest.approx({"b": 0.3})
    assert averaged[1]["per_class"]["ggo"] == pytest.approx({"c": 0.8})
    assert cv_table.main([str(root), "--reference", "ref", "--draws", "alt-both=alt,alt2"]) == 0
    table = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in table.splitlines()}
    # Against ref's a 0.6, b 0.4, c 0.8: 0, +0.2, -0.1.
    assert rows["alt-both", "2", "any lesion"].split("|")[5].startswith(" 0.633 [")
    assert rows["alt-both", "2", "any lesion"].split("|")[7].strip().startswith("0.033 [")
    assert rows["alt-both", "2", "any lesion"].split("|")[7].strip().endswith("(n=3)")
    assert "| alt-both | 0 |" not in table  # no training time of its own
    # It can be the reference: alt's own draw against the average, +0.1, -0.1, +0.1.
    assert cv_table.main([str(root), "--reference", "alt-both", "--draws", "alt-both=alt,alt2"]) == 0
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:4]): line
        for line in capsys.readouterr().out.splitlines()
    }
    assert rows["alt", "2", "any lesion"].split("|")[7].strip().startswith("0.033 [")


def test_draws_are_the_mean_of_every_draw_and_name_each_category():
    def run(dice, category):
        return {"per_class": {}, "any lesion": {"a": dice}, "category": category}

    runs = {
        "x": {0: run(0.1, "plus unlabelled")},
        "y": {0: run(0.2, "labelled only")},
        "z": {0: run(0.6, "plus unlabelled")},
    }
    averaged = cv_table.averaged_draws(runs, "xyz", ["x", "y", "z"])[0]
    assert averaged["any lesion"] == pytest.approx({"a": 0.3})  # the mean, not the median 0.2
    assert averaged["category"] == "labelled only / plus unlabelled"


def test_draws_of_other_folds_slices_or_classes_are_refused(root, capsys):
    _second_draw(root)
    for draws, message in (
        ("alt=alt,alt2", "--draws alt: a candidate of that name exists; name the draws otherwise"),
        ("alt-both=alt", "--draws alt-both=alt: not NAME=CANDIDATE,CANDIDATE[,...]"),
        ("=alt,alt2", "--draws =alt,alt2: not NAME=CANDIDATE,CANDIDATE[,...]"),
        ("alt-both=alt,alt3", "--draws alt-both: no finished runs of alt3"),
    ):
        assert cv_table.main([str(root), "--reference", "ref", "--draws", draws]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    (root / "alt2-cv1" / "metrics" / "validation_slices.csv").unlink()  # fold 1 of alt2 not finished
    assert cv_table.main([str(root), "--reference", "ref", "--draws", "both=alt,alt2"]) == 2
    assert capsys.readouterr().err == "error: --draws both: alt, alt2 ran other folds ([[0, 1], [0]])\n"
    runs = cv_table.collect(root)
    runs["alt2"][1] = {**runs["alt"][1], "any lesion": {"d": 0.5}}
    with pytest.raises(cv_table.UserError, match=r"^--draws both: alt, alt2 scored other slices on fold 1$"):
        cv_table.averaged_draws(runs, "both", ["alt", "alt2"])
    runs["alt2"][1] = {**runs["alt"][1], "per_class": {"cons": {"c": 0.5}}}  # alt's: ggo only
    with pytest.raises(cv_table.UserError, match=r"^--draws both: alt, alt2 scored other classes on fold 1$"):
        cv_table.averaged_draws(runs, "both", ["alt", "alt2"])
    runs["alt2"][1] = {**runs["alt"][1], "per_class": {"ggo": {"d": 0.5}}}
    with pytest.raises(cv_table.UserError, match=r"^--draws both: alt, alt2 scored other slices on fold 1$"):
        cv_table.averaged_draws(runs, "both", ["alt", "alt2"])
