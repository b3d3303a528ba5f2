"""Prediction's inputs and outputs (rdunet_jax/prediction_files.py): the output folder's checks and the
clean-up after a failed run. What an --input names and where its outputs go is tested through the command
in test_predict.py."""

import os

import numpy as np
import pytest
from helpers import refusal
from PIL import Image

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


def test_an_output_folder_the_file_system_will_not_make_is_one_line(tmp_path, monkeypatch):
    # As root, /proc passes the permission check and its mkdir fails (FileNotFoundError, a traceback).
    def refuse(self, parents=False, exist_ok=False):
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(prediction_files.pathlib.Path, "mkdir", refuse)
    with pytest.raises(UserError) as error:
        prediction_files.make_output_folder(tmp_path / "out")
    assert str(error.value) == f"--output: cannot make {tmp_path / 'out'} (No such file or directory)"


def test_an_input_whose_outputs_names_are_too_long_is_refused_before_anything_is_written(tmp_path):
    # Its mask was written, its overlay's temporary name failed: a half set of outputs and a traceback.
    fits = tmp_path / ("s" * (241 - len("_overlay.png")) + ".png")
    prediction_files.check_outputs_free([fits], tmp_path / "out", overwrite=False)
    too_long = tmp_path / ("s" * (242 - len("_overlay.png")) + ".png")
    with pytest.raises(UserError) as error:
        prediction_files.check_outputs_free([too_long], tmp_path / "out", overwrite=False)
    assert str(error.value) == (
        f"--input: {too_long}: its output {'s' * 40}... would have a name of 242 bytes, over the 241 a file "
        "can have here; rename the input"
    )


def test_a_folders_hidden_files_are_not_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    # macOS's AppleDouble companion of a.png on a FAT drive or in a zip: resource data, no image.
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (folder / ".volume.nii.gz").write_bytes(b"")
    assert prediction_files.list_inputs(folder) == [folder / "a.png"]
    (folder / "a.png").unlink()
    assert refusal(prediction_files.list_inputs, folder) == (
        f"--input: {folder} holds no .nii, .nii.gz, .png, .jpg, .jpeg or DICOM file"
    )


def test_removing_a_failed_inputs_outputs_removes_what_will_go_and_raises_nothing(tmp_path, monkeypatch):
    overlays = tmp_path / "a_overlays"
    overlays.mkdir()
    for name in ("slice_000.png", "slice_001.png"):
        (overlays / name).write_bytes(b"png")
    outputs = {
        "mask": tmp_path / "a_mask.nii.gz",
        "summary": tmp_path / "a_summary.json",
        "overlays": overlays,
        "seg": tmp_path / "a_seg.dcm",
    }
    for key in ("mask", "summary", "seg"):
        outputs[key].write_bytes(b"x")
    unlink = os.unlink

    def refusing_unlink(path, *args, **kwargs):  # a busy file on a network drive, say
        if str(path).endswith(("slice_001.png", "a_summary.json")):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)
    prediction_files.remove_outputs(outputs)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert left == ["a_overlays", "a_overlays/slice_001.png", "a_summary.json"]


def test_a_link_to_nothing_where_an_output_goes_is_not_replaced_without_overwrite(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_mask.png").symlink_to(tmp_path / "gone.png")
    inputs = [tmp_path / "in" / "a.png"]
    assert refusal(prediction_files.check_outputs_free, inputs, tmp_path / "out", False) == (
        f"--output: {tmp_path / 'out' / 'a_mask.png'} exists; pass --overwrite to replace it"
    )
    prediction_files.check_outputs_free(inputs, tmp_path / "out", True)
