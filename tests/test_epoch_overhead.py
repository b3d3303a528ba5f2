"""experiments.epoch_overhead: timing after a warm-up call, and a workdir without checkpoints refused."""

from helpers import REPO_ROOT

from experiments import epoch_overhead


def test_the_warm_up_call_is_not_timed():
    calls = []
    times = epoch_overhead.seconds_of(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and len(times) == 3 and all(time >= 0 for time in times)


def test_a_workdir_without_checkpoints_is_refused_in_one_line(tmp_path, capsys):
    config = str(REPO_ROOT / "configs" / "semiseg.py")
    code = epoch_overhead.main(["--config", config, "--workdir", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: --workdir: no checkpoint in ") and error.count("\n") == 1
