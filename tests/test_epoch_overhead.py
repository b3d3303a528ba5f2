"""experiments.epoch_overhead: common.median_seconds leaves the warm-up (compiling) call untimed; a workdir
without checkpoints is refused in one line."""

from helpers import REPO_ROOT

from experiments import common, epoch_overhead


def test_the_warm_up_call_is_not_timed():
    calls = []
    median, times = common.median_seconds(lambda: calls.append(1), repeats=3, warmup=1)
    assert len(calls) == 4 and len(times) == 3 and all(time >= 0 for time in times)
    assert median == sorted(times)[1]


def test_a_workdir_without_checkpoints_is_refused_in_one_line(tmp_path, capsys):
    config = str(REPO_ROOT / "configs" / "semiseg.py")
    code = epoch_overhead.main(["--config", config, "--workdir", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: --workdir: no checkpoint in ") and error.count("\n") == 1
