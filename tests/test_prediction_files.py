"""Prediction's inputs and outputs (rdunet_jax/prediction_files.py): the output folder's checks and the
clean-up after a failed run. What an --input names and where its outputs go is tested through the command
in test_predict.py."""

import pytest

from rdunet_jax import prediction_files
from rdunet_jax.errors import UserError


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    # As root every folder is writable, so the permission is asked of a stand-in: no writing anywhere.
    monkeypatch.setattr(prediction_files.os, "access", lambda path, mode: not mode & prediction_files.os.W_OK)
    with pytest.raises(UserError) as error:
        prediction_files.check_output_folder(tmp_path / "new" / "out")
    assert str(error.value) == f"--output: cannot write in {tmp_path}"


def test_the_empty_folders_a_failed_run_created_are_removed_up_to_the_first_that_is_not(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "kept" / "x").mkdir(parents=True)
    (tmp_path / "kept" / "file").write_text("x")
    # Deepest first; "c" was never created (a run that failed before it): the others still go.
    prediction_files.remove_empty_folders([tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"])
    assert not (tmp_path / "a").exists()
    prediction_files.remove_empty_folders([tmp_path / "kept" / "x", tmp_path / "kept", tmp_path])
    assert sorted(path.name for path in (tmp_path / "kept").iterdir()) == ["file"]
