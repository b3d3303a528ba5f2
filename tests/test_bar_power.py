"""experiments.bar_power: draws of a recipe against its record, and the bar's power, against hand values."""

import pytest
from helpers import recipe_records

from experiments import bar_power

# Three slices on fold 0. Against the record (0.5, 0.7, 0.6): recipe draw 2 differs by (0, 0, 0.3), whose
# bootstrap means are 0, 0.1, 0.2 or 0.3 with chances 8/27, 12/27, 6/27 and 1/27, so its 2.5% bound is 0
# (not clear) and its 97.5% bound 0.3: a margin (mean minus lower bound) of 0.1, not 0.2 (upper bound minus
# mean); draw 3 by 0.2 on each slice, margin 0; the candidate by 0.3 on each.
DRAWS = {
    "record": {"a": 0.5, "b": 0.7, "c": 0.6},
    "recipe2": {"a": 0.5, "b": 0.7, "c": 0.9},
    "recipe3": {"a": 0.7, "b": 0.9, "c": 0.8},
    "candidate": {"a": 0.8, "b": 1.0, "c": 0.9},
    "candidate2": {"a": 0.8, "b": 0.8, "c": 0.8},
    "candidate3": {"a": 1.0, "b": 1.0, "c": 0.7},
}


def _runs(draws=DRAWS):
    return {name: {0: {"per_class": {}, "any lesion": dict(slices)}} for name, slices in draws.items()}


def _write_runs(root, draws=DRAWS):
    for name, slices in draws.items():
        metrics = root / f"{name}-cv0" / "metrics"
        metrics.mkdir(parents=True)
        rows = "".join(f"{slice_id},{dice}\n" for slice_id, dice in slices.items())
        (metrics / "validation_slices.csv").write_text("id,dice\n" + rows)
    return root


def test_the_chance_to_clear_is_a_normal_tail_past_the_margin():
    assert bar_power.chance_to_clear(0.01, 0.01, 0.005) == pytest.approx(0.5)
    assert bar_power.chance_to_clear(0.01 + 0.841621 * 0.005, 0.01, 0.005) == pytest.approx(0.8, abs=1e-6)
    assert bar_power.chance_to_clear(0.0, 0.01, 0.005) == pytest.approx(0.0227501, abs=1e-6)  # 2 sd short


def test_draws_margin_spread_and_chances_match_hand_values():
    families = {"cand": ["candidate"], "two": ["candidate2", "candidate3"]}
    lines = bar_power.bar_summary(_runs(), ["record", "recipe2", "recipe3"], families)
    assert lines[2] == "| record | recipe | 0.600 | (the record) | |"
    assert lines[3] == "| recipe2 | recipe | 0.700 | 0.100 [0.000, 0.300] | no |"
    assert lines[4] == "| recipe3 | recipe | 0.800 | 0.200 [0.200, 0.200] | yes |"
    assert lines[5] == "| candidate | cand | 0.900 | 0.300 [0.300, 0.300] | yes |"
    text = "\n".join(lines)
    # Margin (0.1 + 0) / 2; spread: the sd of 0.6, 0.7, 0.8; half: 0.05 - (0.7 - 0.6); four fifths:
    # -0.05 + 0.8416 * 0.1.
    assert "recipe's 2 other draws): 0.0500." in text
    assert "draws): 0.1000; the recipe's mean 0.7000, the record 0.6000." in text
    assert "half of the time: -0.0500; four times in five: +0.0342." in text
    # Chances: the recipe's Phi((0.1 - 0.05) / 0.1) = Phi(0.5); the candidate's Phi((0.3 - 0.05) / 0.1).
    assert lines[-3] == "| recipe | 3 | 0.7000 | 0.1000 | +0.0000 | 0.69 |"
    assert lines[-2] == "| cand | 1 | 0.9000 |  | +0.2000 | 0.99 |"
    # Its own sd: that of 0.8 and 0.9; its chance Phi((0.85 - 0.6 - 0.05) / 0.1) = Phi(2).
    assert lines[-1] == "| two | 2 | 0.8500 | 0.0707 | +0.1500 | 0.98 |"


def test_main_reads_workdirs_and_prints_the_table(tmp_path, capsys):
    _write_runs(tmp_path)
    argv = [str(tmp_path), "--recipe", "record,recipe2,recipe3", "--draws", "cand=candidate"]
    assert bar_power.main(argv) == 0
    assert "| candidate | cand | 0.900 | 0.300 [0.300, 0.300] | yes |" in capsys.readouterr().out


def test_the_recipe_study_record_is_the_record_and_unnamed_runs_are_left_alone(tmp_path, monkeypatch, capsys):
    draws = {name: slices for name, slices in DRAWS.items() if name != "record"}
    root = _write_runs(tmp_path / "runs", draws)
    recipe_records(tmp_path / "records", monkeypatch, {0: DRAWS["record"]})
    # A multi-class run the table does not name: cv_table refuses those against the binary record.
    (root / "multi-cv0" / "metrics").mkdir(parents=True)
    (root / "multi-cv0" / "metrics" / "validation_slices.csv").write_text("id,dice\na,0.5\n")
    (root / "multi-cv0" / "metrics" / "validation_classes.csv").write_text(
        "id,class,present,dice\na,ggo,1,0.5\n"
    )
    argv = [str(root), "--recipe", "recipe-record,recipe2,recipe3", "--draws", "cand=candidate"]
    assert bar_power.main(argv) == 0
    out = capsys.readouterr().out
    assert "| recipe-record | recipe | 0.600 | (the record) | |" in out
    assert "| recipe2 | recipe | 0.700 | 0.100 [0.000, 0.300] | no |" in out


def test_the_margin_is_the_mean_over_the_recipes_draws():
    # Margins 0.1, 0 and 0: mean 0.0333 (their median would be 0).
    lines = bar_power.bar_summary(_runs(), ["record", "recipe2", "recipe3", "candidate"], {})
    assert "recipe's 3 other draws): 0.0333." in "\n".join(lines)


def test_copies_of_one_run_and_a_recipe_that_does_not_vary_are_refused():
    copies = {**DRAWS, "copy": dict(DRAWS["recipe3"])}
    with pytest.raises(bar_power.UserError, match="recipe3 and copy: the same Dice on every slice"):
        bar_power.bar_summary(_runs(copies), ["record", "recipe2", "recipe3"], {"c": ["copy"]})
    with pytest.raises(bar_power.UserError, match="a candidate is named twice"):
        bar_power.bar_summary(_runs(), ["record", "recipe2", "recipe3"], {"c": ["recipe3"]})
    # Pooled 0.6 each, the record's too, slice by slice otherwise.
    level = {**DRAWS, "recipe2": {"a": 0.6, "b": 0.6, "c": 0.6}, "recipe3": {"a": 0.4, "b": 0.8, "c": 0.6}}
    with pytest.raises(bar_power.UserError, match="--recipe: its draws' pooled Dice do not vary"):
        bar_power.bar_summary(_runs(level), ["record", "recipe2", "recipe3"], {})


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--recipe", "record,recipe2"], "--recipe: name the record and at least two other draws"),
        (
            ["--recipe", "record,recipe-record,recipe2"],
            "--recipe: recipe-record is the record, so it comes first",
        ),
        (["--recipe", "record,recipe2,recipe3", "--draws", "=candidate"], "--draws =candidate: not NAME"),
        (["--recipe", "record,recipe2,missing"], "missing: no finished runs under "),
        (["--recipe", "record,recipe2,recipe3", "--draws", "recipe=candidate"], "--draws recipe=candidate: "),
        (["--recipe", "record,recipe2,recipe3", "--draws", "cand"], "--draws cand: not NAME=CANDIDATE"),
        (
            ["--recipe", "record,recipe2,recipe3", "--draws", "a=candidate", "--draws", "a=recipe2"],
            "--draws a=",
        ),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, arguments, message):
    _write_runs(tmp_path)
    assert bar_power.main([str(tmp_path), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1


def test_a_root_that_is_not_a_folder_is_refused_in_one_line(tmp_path, capsys):
    assert bar_power.main([str(tmp_path / "absent"), "--recipe", "a,b,c"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'absent'}: not a folder of <candidate>-cv<fold> workdirs\n"
    )


def test_a_draw_of_other_slices_is_refused():
    draws = {**DRAWS, "candidate": {"a": 0.7, "b": 0.8, "d": 0.9}}
    with pytest.raises(
        bar_power.UserError,
        match=r"candidate: 2 of its 3 slices and the record's 3 are not in both \(other folds",
    ):
        bar_power.bar_summary(_runs(draws), ["record", "recipe2", "recipe3"], {"cand": ["candidate"]})
