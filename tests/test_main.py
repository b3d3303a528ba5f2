"""End to end through the command line: train, stop, resume, evaluate, and user errors."""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import onnx
import pytest
from helpers import REPO_ROOT, TEST_CACHE, TEST_DATA_DIR, make_tiny_config
from PIL import Image

from rdunet_jax import checkpoints, files, main, models, steps
from rdunet_jax.errors import UserError

TINY = [
    "--config",
    "configs/demo.py:tiny",
    f"--config.compilation_cache_dir={TEST_CACHE}",
    f"--config.data.data_dir={TEST_DATA_DIR}",
]


def _run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "rdunet_jax.main", *TINY, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _epochs(workdir: pathlib.Path):
    return [json.loads(line)["epoch"] for line in (workdir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_stop_resume_and_evaluate(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", "--config.num_epochs=3"]
    stopped = subprocess.run(
        [sys.executable, "-m", "tests.kill_at_step", "5", "--", *TINY, *args],  # SIGKILL during epoch 3
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert stopped.returncode == -signal.SIGKILL
    assert 1 <= len(_epochs(workdir)) < 3

    resumed = _run(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout
    assert "2,0" not in resumed.stdout  # printed parameter count of the tiny model is small
    assert "parameters" in resumed.stdout
    assert _epochs(workdir) == [1, 2, 3]
    metrics = json.loads((workdir / "metrics" / "test.json").read_text())
    for key in ("dice", "jaccard", "f_score", "precision", "recall", "global_dice"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_slices"] == 4

    os.remove(workdir / "metrics" / "test.json")
    evaluated = _run(f"--workdir={workdir}", "--mode=evaluate")
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((workdir / "metrics" / "test.json").read_text())
    assert again == metrics
    best_epoch = min(
        (json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()),
        key=lambda record: record["val_loss"],
    )
    assert again["step"] == best_epoch["step"]

    exported = _run(f"--workdir={workdir}", "--mode=export", f"--output={tmp_path / 'model.onnx'}")
    assert exported.returncode == 0, exported.stderr
    assert f"of checkpoint step {again['step']}" in exported.stdout
    model = onnx.load(tmp_path / "model.onnx")
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["checkpoint_step"] == str(again["step"]) and metadata["config_name"] == "demo_tiny"


def test_bad_config_value_is_one_line_error_and_exit_2(tmp_path):
    result = _run(f"--workdir={tmp_path / 'bad'}", "--config.data.image_size=30")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: data.image_size: 30 is not divisible by 2**model.depth = 4"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.eval.treshold=0.4",
            "--config.eval.treshold: the config has no key 'treshold' (did you mean 'threshold'?)",
        ),
        (
            "--config.batchsize=4",
            "--config.batchsize: the config has no key 'batchsize' (did you mean 'batch_size'?)",
        ),
        ("--config.data.zzz=1", "--config.data.zzz: the config has no key 'zzz'"),
        # A typo in a section's name, not the last part of the key.
        (
            "--config.modle.depth=3",
            "--config.modle.depth: the config has no key 'modle' (did you mean 'model'?)",
        ),
    ],
)
def test_a_config_key_that_does_not_exist_is_one_clean_line_naming_the_flag(tmp_path, override, message):
    result = _run(f"--workdir={tmp_path / 'bad'}", override)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "config_file, message",
    [
        (
            "def get_config():\n    return {'name': 'plain'}\n",
            "--config: get_config() must return an ml_collections.ConfigDict built on "
            "rdunet_jax.config_lib.base_config(), not dict",
        ),
        (
            "settings = 1\n",
            "--config: cannot load the config file: AttributeError: module 'config_config' has no attribute "
            "'get_config'",
        ),
        (
            "import ml_collections\n\ndef get_config():\n"
            "    return ml_collections.ConfigDict({'name': 'partial', 'num_epochs': 1})\n",
            "batch_size: missing from the config; build it on rdunet_jax.config_lib.base_config()",
        ),
        (
            'def get_config():\n    return int("x")\n',
            "--config: cannot load the config file: ValueError: invalid literal for int() with base 10: 'x'",
        ),
        (
            "def get_config():\n    return 1 / 0\n",
            "--config: cannot load the config file: ZeroDivisionError: division by zero",
        ),
    ],
    ids=["a dict", "no get_config", "not built on base_config", "a ValueError", "another error"],
)
def test_a_broken_config_file_is_one_line_naming_what_is_wrong(tmp_path, config_file, message):
    # These gave tracebacks (exit 1), or called a missing get_config an unknown key.
    (tmp_path / "broken.py").write_text(config_file)
    result = subprocess.run(
        [sys.executable, "-m", "rdunet_jax.main", f"--config={tmp_path / 'broken.py'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [f"error: {message}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.py"]  # no runs/ folder


def test_a_config_files_own_refusal_of_its_argument_is_its_line_alone():
    result = subprocess.run(
        [sys.executable, "-m", "rdunet_jax.main", "--config=configs/demo.py:huge"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip().splitlines()) == (
        2,
        ["error: configs/demo.py: unknown argument 'huge'; use 'full' or 'tiny'"],
    )


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
@pytest.mark.parametrize("overrides", [(), ("--config.num_epochs=3",)], ids=["alone", "with an override"])
def test_a_config_file_that_is_not_there_is_one_line_naming_it(tmp_path, relative, overrides):
    # It was called "not _ErrorConfig", as if get_config() had returned the wrong type, and with an
    # override the message named no file.
    missing = "configs/demo.py" if relative else str(tmp_path / "configs" / "demo.py")
    result = subprocess.run(
        [sys.executable, "-m", "rdunet_jax.main", f"--config={missing}:tiny", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip().splitlines()) == (
        2,
        [f"error: --config: cannot load the config file: [Errno 2] No such file or directory: {missing!r}"],
    )
    assert list(tmp_path.iterdir()) == []


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path):
    result = _run(f"--workdir={tmp_path / 'none'}", "--mode=evaluate")
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "none").exists()  # nothing created on the way


def test_predict_without_input_is_a_one_line_error(tmp_path):
    result = _run(f"--workdir={tmp_path / 'none'}", "--mode=predict", f"--output={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --mode=predict needs --input (a NIfTI/PNG/JPEG file or a folder) and --output"
    ]


def test_export_without_output_or_checkpoint_is_a_one_line_error(tmp_path):
    result = _run(f"--workdir={tmp_path / 'none'}", "--mode=export")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --mode=export needs --output, the .onnx file to write"
    ]
    result = _run(f"--workdir={tmp_path / 'none'}", "--mode=export", f"--output={tmp_path / 'model.onnx'}")
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mode, flag, message",
    [
        (
            "train",
            "--checkpoint_step=4",
            "--checkpoint_step: --mode=train does not use it (only --mode=evaluate "
            "or --mode=predict or --mode=export)",
        ),
        (
            "evaluate",
            "--output=out",
            "--output: --mode=evaluate does not use it (only --mode=predict or --mode=export)",
        ),
        (
            "export",
            "--input_units=display",
            "--input_units: --mode=export does not use it (only --mode=predict)",
        ),
        (
            "train",
            "--overwrite",
            "--overwrite: --mode=train does not use it (only --mode=predict or --mode=export)",
        ),
        *(
            ("train", f"--{name}={value}", f"--{name}: --mode=train does not use it (only --mode=predict)")
            for name, value in (
                ("input", "a.png"),
                ("ground_truth", "t.png"),
                ("input_window", "match"),
                ("series", "1.2"),
            )
        ),
    ],
)
def test_a_flag_the_mode_does_not_read_is_refused_not_ignored(tmp_path, mode, flag, message):
    from rdunet_jax import main

    main.parse_flags(
        ["prog", "--config", "configs/demo.py:tiny", f"--workdir={tmp_path / 'run'}", f"--mode={mode}", flag]
    )
    try:
        with pytest.raises(UserError) as refused:
            main.run(["prog"])
    finally:
        main.FLAGS.unparse_flags()
    assert str(refused.value) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given, passed", [((), None), (("--input_units=display",), "display")])
def test_predict_is_told_whether_input_units_was_given(tmp_path, monkeypatch, given, passed):
    # Given for slices alone it is refused (predict.py), so its default must not read as given.
    from rdunet_jax import predict

    calls = []
    monkeypatch.setattr(predict, "predict_path", lambda *args, **kwargs: calls.append(kwargs["input_units"]))
    main.parse_flags(
        [
            "prog",
            "--config",
            "configs/demo.py:tiny",
            "--mode=predict",
            "--input=a.png",
            "--output=out",
            *given,
        ]
    )
    try:
        main.run(["prog"])
    finally:
        main.FLAGS.unparse_flags()
    assert calls == [passed]


def test_a_path_the_file_system_refuses_is_one_line_naming_it(tmp_path):
    # A name over 255 bytes: the OSError of the first look at it ended in a traceback (exit 1).
    image = tmp_path / "slice.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    output = tmp_path / ("x" * 300)
    result = _run(
        f"--workdir={tmp_path / 'none'}", "--mode=predict", f"--input={image}", f"--output={output}"
    )
    assert (result.returncode, result.stderr.strip().splitlines()) == (
        2,
        [f"error: {output}: File name too long"],
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["slice.png"]


def test_only_a_file_system_refusal_is_one_line_and_another_os_error_keeps_its_traceback(monkeypatch, capsys):
    def failing(error):
        def run(argv):
            raise error

        return run

    monkeypatch.setattr(main, "run", failing(OSError(errno.ENOSPC, "No space left on device", "/runs/x/log")))
    with pytest.raises(SystemExit) as exited:
        main.main(["prog"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: /runs/x/log: No space left on device\n"
    # A missing file may be the code's own mistake (a misspelt internal path), as may an error naming none.
    for error in (FileNotFoundError(errno.ENOENT, "No such file", "/runs/x/chekpoint"), OSError("closed")):
        monkeypatch.setattr(main, "run", failing(error))
        with pytest.raises(OSError) as raised:
            main.main(["prog"])
        assert raised.value is error


@pytest.mark.parametrize(
    "refusal", [errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENOSPC, errno.ENAMETOOLONG]
)
def test_every_file_system_refusal_naming_a_path_is_one_line_and_one_naming_none_keeps_its_traceback(
    monkeypatch, capsys, refusal
):
    def failing(error):
        def run(argv):
            raise error

        return run

    monkeypatch.setattr(main, "run", failing(OSError(refusal, "Refused", "/out")))
    with pytest.raises(SystemExit) as exited:
        main.main(["prog"])
    assert (exited.value.code, capsys.readouterr().err) == (2, "error: /out: Refused\n")
    unnamed = OSError(refusal, "Refused")
    monkeypatch.setattr(main, "run", failing(unnamed))
    with pytest.raises(OSError) as raised:
        main.main(["prog"])
    assert raised.value is unnamed


def test_a_stop_or_interrupt_exits_128_plus_the_signal_with_one_line(monkeypatch, capsys):
    from rdunet_jax.train import TrainingStopped

    for error, code, line in (
        (KeyboardInterrupt(), 130, "interrupted"),
        (
            TrainingStopped(signal.SIGINT, 6, "d"),
            130,
            "stopped by SIGINT at step 6; checkpoint saved in d; run the same command to resume",
        ),
    ):

        def run(argv, error=error):
            raise error

        monkeypatch.setattr(main, "run", run)
        with pytest.raises(SystemExit) as exited:
            main.main(["prog"])
        assert (exited.value.code, capsys.readouterr().err) == (code, line + "\n")


def _recorded_call(monkeypatch, module, function: str, argv: list[str], config="configs/demo.py:tiny"):
    """The arguments `main.run` passes to `module.function` under the command line `argv`."""
    calls = []
    monkeypatch.setattr(module, function, lambda *args, **kwargs: calls.append((args, kwargs)))
    main.parse_flags(["prog", "--config", config, *argv])
    try:
        main.run(["prog"])
    finally:
        main.FLAGS.unparse_flags()
    (call,) = calls
    return call


def test_each_mode_is_given_the_flags_it_reads(monkeypatch, tmp_path):
    from rdunet_jax import evaluate, onnx_export, predict

    args, kwargs = _recorded_call(
        monkeypatch,
        predict,
        "predict_path",
        [
            "--mode=predict",
            "--input=a.dcm",
            "--output=out",
            "--overwrite",
            "--checkpoint_step=4",
            "--ground_truth=t.png",
            "--series=1.2.3",
            "--input_window=match",
        ],
    )
    assert (str(args[1]), args[2:]) == ("runs/demo_tiny", ("a.dcm", "out"))
    assert kwargs == {
        "overwrite": True,
        "checkpoint_step": 4,
        "ground_truth": "t.png",
        "input_units": None,
        "series": "1.2.3",
        "input_window": "match",
    }
    args, _ = _recorded_call(
        monkeypatch, evaluate, "evaluate_workdir", ["--mode=evaluate", "--checkpoint_step=4"]
    )
    assert (str(args[1]), args[2]) == ("runs/demo_tiny", 4)
    args, _ = _recorded_call(
        monkeypatch,
        onnx_export,
        "export_workdir",
        ["--mode=export", "--output=m.onnx", "--overwrite", "--checkpoint_step=4", "--workdir=w"],
    )
    assert (str(args[1]), args[2:]) == ("w", ("m.onnx", True, 4))
    # A self-training run is evaluated, exported and predicted with its last round's student.
    two_rounds = tmp_path / "two_rounds.py"
    two_rounds.write_text(
        "from rdunet_jax import config_lib\n\n\ndef get_config():\n"
        "    config = config_lib.base_config()\n    config.selftrain.rounds = 2\n    return config\n"
    )
    for module, function, mode in (
        (evaluate, "evaluate_workdir", "evaluate"),
        (onnx_export, "export_workdir", "export"),
        (predict, "predict_path", "predict --input=a.png"),
    ):
        args, _ = _recorded_call(
            monkeypatch, module, function, [*f"--mode={mode}".split(), "--workdir=w"], str(two_rounds)
        )
        assert str(args[1]) == "w/student2", mode


def test_unexpected_positional_arguments_are_refused():
    for extra in (["extra"], ["extra", "more"]):
        with pytest.raises(UserError, match=f"^unexpected arguments: {' '.join(extra)}$"):
            main.run(["prog", *extra])


def test_predict_without_checkpoint_is_a_clear_error(tmp_path):
    image = tmp_path / "slice.png"
    image.write_bytes(b"")  # never read: the checkpoint is looked for first
    result = _run(
        f"--workdir={tmp_path / 'none'}", "--mode=predict", f"--input={image}", f"--output={tmp_path}"
    )
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "slice_mask.png").exists()
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--workdir={file}", "--workdir: {file} exists and is not a folder"),
        ("--config.compilation_cache_dir={file}", "compilation_cache_dir: cannot use {file} as a folder"),
        ("--config.data.data_dir={file}", "data.data_dir: {file} is a file, not a folder"),
    ],
)
def test_a_file_where_a_folder_belongs_is_a_one_line_error(tmp_path, flag, message):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    args = [flag.format(file=file)]
    if not flag.startswith("--workdir"):
        args.append(f"--workdir={tmp_path / 'run'}")
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(file=file))
    assert file.read_text() == "not a folder"


def test_a_second_run_of_a_workdir_in_use_is_refused_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    with files.exclusive_workdir(workdir):  # as a first run would
        result = _run(f"--workdir={workdir}")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: --workdir: {workdir} is in use by another run (process {os.getpid()} on "
            f"{socket.gethostname()}); wait for it to end, stop it, or choose another --workdir"
        ]
        assert sorted(path.name for path in workdir.iterdir()) == [".lock"]  # nothing of its own written


def _checkpoint_bytes(workdir: pathlib.Path) -> dict:
    """Every checkpoint of a tiny run as {(kind, step, leaf path): array bytes}, plus each one's meta."""
    config = make_tiny_config()
    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints", create=False)
    contents = {}
    try:
        for kind in ("best", "latest"):
            for step in run_checkpoints.all_steps(kind):
                state, meta = run_checkpoints.restore(kind, target, step)
                contents[kind, step, "meta"] = json.dumps(meta, sort_keys=True).encode()
                for path, leaf in jax.tree_util.tree_leaves_with_path(state):
                    array = np.asarray(leaf)
                    contents[kind, step, jax.tree_util.keystr(path)] = (array.dtype.str, array.tobytes())
    finally:
        run_checkpoints.close()
    return contents


def _log_without_times(workdir: pathlib.Path) -> list:
    records = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


@pytest.mark.slow
def test_two_runs_with_the_same_settings_write_the_same_bytes(tmp_path):
    """The README's promise: same machine, thread count, versions, seed and config give the same digits.
    Two fresh processes (different hash seeds, run at once so their threads interleave differently)."""
    runs = [tmp_path / "first", tmp_path / "second"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "rdunet_jax.main", *TINY, f"--workdir={workdir}", "--config.num_epochs=2"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        )
        for hash_seed, workdir in enumerate(runs, start=1)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stdout + stderr
    first, second = runs
    for name in ("config.json", "metrics/test.json", "metrics/test_slices.csv", "metrics/test.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert _log_without_times(first) == _log_without_times(second)
    first_checkpoints, second_checkpoints = _checkpoint_bytes(first), _checkpoint_bytes(second)
    # Both epochs' `latest`, and `best`: parameters, BatchNorm statistics, Adam moments, step, dropout key.
    assert len(first_checkpoints) > 50
    assert first_checkpoints.keys() == second_checkpoints.keys()
    for key, value in first_checkpoints.items():
        assert second_checkpoints[key] == value, key


def test_sigterm_outside_training_unwinds_so_a_file_being_written_leaves_no_temporary(tmp_path, capsys):
    # The default action killed the process mid-write: `--mode predict` left `.case_mask.nii.gz.*.tmp`.
    def run_writing(argv):
        with files.atomic_path(tmp_path / "case_mask.nii.gz") as temporary:
            temporary.write_bytes(b"half a mask")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # delivered at the next bytecode
            pytest.fail("SIGTERM was not acted on")

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(main, "run", run_writing)
            with pytest.raises(SystemExit) as exited:
                main.main(["main"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exited.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "terminated\n"
    assert list(tmp_path.iterdir()) == []
