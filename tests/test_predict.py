"""Prediction: NIfTI round trip (shape, affine, orientation), image folders, overwrite refusal, atomicity.

The real model runs at the tiny config's shapes (32 px, batch 16); the orientation test replaces the
model by a threshold on the preprocessed image, so where the mask lands is known exactly."""

import json
import re

import jax.numpy as jnp
import nibabel
import numpy as np
import pytest
from helpers import ROTATED_AFFINE, ImagePredictor, make_tiny_config, real_data_root, refusal, save_nifti
from PIL import Image

from rdunet_jax import checkpoints, inference, predict, predictors, steps, volumes
from rdunet_jax.errors import UserError


def _volume(shape=(45, 37, 5)):
    """HU volume: air-like lungs with a bright box whose position moves with the slice index."""
    volume = np.full(shape, -900, np.int16)
    boxes = []
    for index in range(shape[2]):
        box = (slice(5 + 2 * index, 20 + 2 * index), slice(3, 15 + index))
        volume[box + (index,)] = 100
        boxes.append(box)
    return volume, boxes


def test_nifti_round_trip_keeps_shape_affine_and_orientation(tmp_path, monkeypatch):
    volume, boxes = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    config = make_tiny_config()
    config.eval.batch_size = 2  # three batches for five slices: the last one padded
    # The windowed intensity as probability: bright box -> 1, air -> ~0.3.
    (summary,) = predict.predict_path(config, None, source, tmp_path / "out", predictor=ImagePredictor(7))

    written = nibabel.load(tmp_path / "out" / "case_mask.nii.gz")
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, nibabel.load(source).affine, atol=1e-6)
    assert written.header.get_zooms() == pytest.approx((0.7, 0.9, 2.5))
    mask = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(mask)) <= {0, 1}
    for index, box in enumerate(boxes):  # each slice's mask sits on its own box, not transposed
        expected = np.zeros(volume.shape[:2], bool)
        expected[box] = True
        overlap = np.sum(expected & (mask[..., index] > 0))
        assert 2 * overlap / (expected.sum() + mask[..., index].sum()) > 0.85

    assert summary["lesion_voxels"] == int(mask.sum())
    assert summary["lesion_volume_ml"] == pytest.approx(mask.sum() * 0.7 * 0.9 * 2.5 / 1000, rel=1e-6)
    assert summary["fraction_slices_with_lesion"] == 1.0 and summary["checkpoint_step"] == 7
    assert json.loads((tmp_path / "out" / "case_summary.json").read_text()) == summary
    overlays = sorted((tmp_path / "out" / "case_overlays").glob("*.png"))
    assert [path.name for path in overlays] == [f"slice_{i:04d}.png" for i in (1, 2, 3, 4)]  # largest 4
    with Image.open(overlays[0]) as picture:
        # Radiological display: ROTATED_AFFINE's voxel axis 0 (45) runs anterior-posterior: the rows.
        assert picture.mode == "RGB" and picture.size == (37, 45)


def test_nifti_prediction_with_the_model_and_a_4d_single_frame_volume(tiny_state, tmp_path):
    volume, _ = _volume((30, 34, 3))
    source = save_nifti(tmp_path / "frame.nii", volume[..., None])
    ground_truth = save_nifti(tmp_path / "truth.nii", (volume[..., None] > 0).astype(np.uint8))
    (summary,) = predict.predict_path(
        make_tiny_config(),
        None,
        source,
        tmp_path / "out",
        predictor=inference.JaxPredictor(tiny_state),
        ground_truth=ground_truth,
    )
    written = nibabel.load(tmp_path / "out" / "frame_mask.nii")
    assert written.shape == (30, 34, 3, 1)
    np.testing.assert_allclose(written.affine, ROTATED_AFFINE, atol=1e-6)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert 0.0 <= summary["dice_with_ground_truth"] <= 1.0
    assert summary["voxel_spacing_mm"] == pytest.approx([0.7, 0.9, 2.5])  # not the frames' time step


def _write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(1)
    sizes = {"a.png": (40, 60), "b.jpg": (64, 64), "c.jpeg": (31, 17)}
    for name, size in sizes.items():
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return sizes


def test_predict_on_a_folder_of_images_writes_masks_of_the_input_size(tiny_state, tmp_path):
    sizes = _write_images(tmp_path / "in")
    predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "in",
        tmp_path / "out",
        predictor=inference.JaxPredictor(tiny_state),
    )
    for name, size in sizes.items():
        stem = name.split(".")[0]
        with Image.open(tmp_path / "out" / f"{stem}_mask.png") as mask:
            assert mask.mode == "L" and mask.size == size[::-1]
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        with Image.open(tmp_path / "out" / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == size[::-1]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(
        f"{name.split('.')[0]}_{kind}.png" for name in sizes for kind in ("mask", "overlay")
    )


def test_existing_outputs_are_refused_without_overwrite(tiny_state, tmp_path):
    _write_images(tmp_path / "in")
    config = make_tiny_config()
    predict.predict_path(
        config, None, tmp_path / "in", tmp_path / "out", predictor=inference.JaxPredictor(tiny_state)
    )
    mask = tmp_path / "out" / "b_mask.png"
    mask.write_bytes(b"kept")
    with pytest.raises(UserError, match="_mask.png exists; pass --overwrite"):
        predict.predict_path(
            config, None, tmp_path / "in", tmp_path / "out", predictor=inference.JaxPredictor(tiny_state)
        )
    assert mask.read_bytes() == b"kept"
    predict.predict_path(
        config,
        None,
        tmp_path / "in",
        tmp_path / "out",
        overwrite=True,
        predictor=inference.JaxPredictor(tiny_state),
    )
    assert mask.read_bytes() != b"kept"


def test_an_interrupted_volume_leaves_no_mask_file(tmp_path):
    volume, _ = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)

    class InterruptedPredictor(ImagePredictor):
        calls = 0

        def _probabilities(self, images):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return images

    config = make_tiny_config()
    config.eval.batch_size = 2
    with pytest.raises(KeyboardInterrupt):
        predict.predict_path(config, None, source, tmp_path / "out", predictor=InterruptedPredictor())
    assert not (tmp_path / "out").exists()  # no temporary left, and the folder it made is gone


def test_a_volume_whose_last_output_fails_leaves_none_of_its_outputs(tmp_path, monkeypatch):
    volume, _ = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")

    def full_disk(path, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict, "write_json_atomic", full_disk)  # the summary, written last
    with pytest.raises(OSError, match="No space left"):
        predict.predict_path(make_tiny_config(), None, source, tmp_path / "out", predictor=ImagePredictor())
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]  # no mask, no overlays


def _no_model(monkeypatch):
    def no_restore(*args, **kwargs):
        raise AssertionError("the checkpoint was restored")

    monkeypatch.setattr(steps, "restore_state", no_restore)


def test_an_output_that_is_a_file_is_refused_before_restoring(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    _write_images(tmp_path / "in")
    output = tmp_path / "out"
    output.write_text("a file")
    with pytest.raises(UserError, match=f"^--output: {output} exists and is not a folder$"):
        predict.predict_path(make_tiny_config(), tmp_path / "run", tmp_path / "in", output)
    with pytest.raises(UserError, match=f"^--output: {output} exists and is not a folder$"):
        predict.predict_path(make_tiny_config(), tmp_path / "run", tmp_path / "in", output / "below")
    assert output.read_text() == "a file"


@pytest.mark.parametrize("taken, kind", [("case_overlays", "a file"), ("case_mask.nii.gz", "a folder")])
def test_overwrite_refuses_an_output_name_taken_by_the_other_kind_of_entry(
    tmp_path, monkeypatch, taken, kind
):
    _no_model(monkeypatch)
    volume, _ = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    (tmp_path / "out").mkdir()
    if kind == "a file":
        (tmp_path / "out" / taken).write_text("notes")
    else:
        (tmp_path / "out" / taken).mkdir()
    with pytest.raises(UserError) as error:
        predict.predict_path(make_tiny_config(), tmp_path / "run", source, tmp_path / "out", overwrite=True)
    assert str(error.value) == (
        f"--output: {tmp_path / 'out' / taken} is {kind}, not the output prediction writes there; move it"
    )
    assert [path.name for path in (tmp_path / "out").iterdir()] == [taken]


def test_a_truncated_nifti_gz_is_a_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    rng = np.random.default_rng(0)  # noise: the compressed data are long enough to cut mid-stream
    volume = rng.integers(-1000, 400, (45, 37, 5)).astype(np.int16)
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) * 3 // 5])
    config = make_tiny_config()
    config.eval.batch_size = 2
    with pytest.raises(UserError, match="case.nii.gz: corrupt or truncated NIfTI file, slice \\d unreadable"):
        predict.predict_path(config, None, source, tmp_path / "new" / "out", predictor=ImagePredictor())
    assert not (tmp_path / "new").exists()  # the folders it created, left empty, are removed

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("x")
    with pytest.raises(UserError, match="corrupt or truncated"):
        predict.predict_path(config, None, source, tmp_path / "kept", predictor=ImagePredictor())
    assert [path.name for path in (tmp_path / "kept").iterdir()] == ["other.txt"]


@pytest.mark.parametrize("bad_slice", [0, 5])  # a slice the units check samples, and one it does not
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_volume_with_nan_or_infinite_values_is_one_line_naming_the_slice_and_leaves_nothing(
    tmp_path, bad_slice, value
):
    volume = _volume((45, 37, 12))[0].astype(np.float32)
    volume[3:8, 4:6, bad_slice] = value  # 10 voxels
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    assert (bad_slice in volumes.sampled_slice_indices(12)) == (bad_slice == 0)
    with pytest.raises(UserError) as error:
        predict.predict_path(make_tiny_config(), None, source, tmp_path / "out", predictor=ImagePredictor())
    assert (
        str(error.value)
        == f"{source}: slice {bad_slice} holds 10 NaN or infinite values; a volume must be finite"
    )
    assert not (tmp_path / "out").exists()


def _truncated_nifti(path):
    save_nifti(path, _volume((20, 20, 4))[0])
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "bad_name, write_bad, message",
    [
        ("z.png", lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n cut"), "corrupt or truncated image"),
        ("z.nii", _truncated_nifti, "truncated NIfTI file"),
    ],
)
def test_a_bad_input_in_a_folder_fails_before_any_output(tmp_path, monkeypatch, bad_name, write_bad, message):
    _no_model(monkeypatch)
    _write_images(tmp_path / "in")
    save_nifti(tmp_path / "in" / "a_volume.nii", _volume((20, 20, 4))[0])
    write_bad(tmp_path / "in" / bad_name)
    config = make_tiny_config()
    config.eval.batch_size = 1  # the bad file comes batches after the first
    with pytest.raises(UserError, match=f"{bad_name}: {message}"):
        predict.predict_path(config, None, tmp_path / "in", tmp_path / "out", predictor=ImagePredictor())
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_the_input_folder_is_refused_but_one_beside_or_below_it_is_not(tmp_path):
    # A rerun segmented its own outputs: 6 "images" for 2 slices, 10_mask_mask.png and so on.
    _write_images(tmp_path / "in")
    message = refusal(
        predict.predict_path,
        make_tiny_config(),
        None,
        tmp_path / "in",
        tmp_path / "in" / ".",
        predictor=ImagePredictor(),
    )
    assert message == (
        f"--output: {tmp_path / 'in' / '.'} is the input folder {tmp_path / 'in'}; a rerun would read the "
        "outputs as inputs: give another folder"
    )
    assert sorted(path.name for path in (tmp_path / "in").iterdir()) == [
        "a.png",
        "b.jpg",
        "c.jpeg",
        "notes.txt",
    ]
    # A folder of slices is read one level deep: outputs in a folder below it are never read as inputs.
    predict.predict_path(
        make_tiny_config(), None, tmp_path / "in", tmp_path / "in" / "out", predictor=ImagePredictor()
    )
    assert (tmp_path / "in" / "out" / "a_mask.png").is_file()


def test_a_ground_truth_of_another_size_is_refused_before_the_mask_is_written(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    _write_images(tmp_path / "in")
    truth = tmp_path / "truth.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(truth)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="truth.png: size \\(30, 30\\) differs from its image"):
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "in" / "a.png",
            tmp_path / "out",
            ground_truth=truth,
            predictor=ImagePredictor(),
        )
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "input_name, message",
    [("missing.nii", "does not exist"), ("notes.txt", "is not a .nii"), ("empty", "holds no .nii")],
)
def test_bad_inputs_are_user_errors(tmp_path, input_name, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=message):
        predict.predict_path(
            make_tiny_config(), None, tmp_path / input_name, tmp_path / "out", predictor=ImagePredictor()
        )


# --- Units: CT in Hounsfield units, or display-windowed images --------------------------------------------


def _stand_in_model(monkeypatch):
    """The model's probability is the preprocessed image itself, and no checkpoint is restored."""
    monkeypatch.setattr(steps, "restore_state", lambda *args, **kwargs: None)
    monkeypatch.setattr(predictors, "for_config", lambda *args: ImagePredictor())


def _display_volume(shape=(32, 32, 4)):
    """Display intensities in [0, 255] (a windowed export), at the tiny model's size so no resize blurs."""
    rng = np.random.default_rng(4)
    return rng.integers(0, 256, shape).astype(np.float32)


def _predict_command_exit_code(*arguments) -> int:
    """Runs `--mode=predict` of the tiny config with `arguments` through the command line; its exit code."""
    from rdunet_jax import main

    main.parse_flags(["prog", "--config", "configs/demo.py:tiny", "--mode=predict", *arguments])
    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main(["prog"])
    finally:
        main.FLAGS.unparse_flags()
    return exit_info.value.code


def test_a_volume_not_in_hounsfield_units_is_refused_by_the_command(tmp_path, monkeypatch, capsys):
    _stand_in_model(monkeypatch)
    source = save_nifti(tmp_path / "windowed.nii.gz", _display_volume() / 255.0)
    assert _predict_command_exit_code(f"--input={source}", f"--output={tmp_path / 'out'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {source}: values do not look like CT in Hounsfield units")
    assert "--input_units display" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_display_units_read_a_volume_as_the_png_datasets_are(tmp_path, monkeypatch, scale):
    _stand_in_model(monkeypatch)
    display = _display_volume()
    source = save_nifti(tmp_path / "windowed.nii", display / 255.0 * scale)
    config = make_tiny_config()
    with pytest.raises(UserError, match="windowed.nii: values do not look like CT"):
        predict.predict_path(config, None, source, tmp_path / "out")
    (summary,) = predict.predict_path(config, None, source, tmp_path / "out", input_units="display")
    mask = np.asarray(nibabel.load(tmp_path / "out" / "windowed_mask.nii").dataobj)
    # The stand-in model's probability is the intensity over 255, as for a PNG slice.
    np.testing.assert_array_equal(mask, (display / 255.0 >= config.eval.threshold).astype(np.uint8))
    assert summary["input_units"] == "display"


def test_display_units_refuse_values_outside_the_display_range(tmp_path, monkeypatch):
    _stand_in_model(monkeypatch)
    volume, _ = _volume((32, 32, 3))
    source = save_nifti(tmp_path / "ct.nii", volume)
    with pytest.raises(UserError, match=r"^--input_units display: .*ct.nii holds values in \[-900, 100\]"):
        predict.predict_path(make_tiny_config(), None, source, tmp_path / "out", input_units="display")
    assert not (tmp_path / "out").exists()


def test_units_check_samples_few_slices_spanning_the_volume():
    for num_slices in (1, 2, 9, 300):
        indices = volumes.sampled_slice_indices(num_slices)
        assert indices[0] == 0 and indices[-1] == num_slices - 1
        assert len(indices) == min(num_slices, volumes.UNITS_SAMPLE_SLICES)


@pytest.mark.real_data
def test_a_real_slice_in_hounsfield_units_passes_and_its_display_export_is_refused(tmp_path, monkeypatch):
    _stand_in_model(monkeypatch)
    png = real_data_root() / "covid19-ct-seg-2d" / "ct" / "0700.png"
    display = np.asarray(Image.open(png).convert("L"), np.float32)
    lower, upper = make_tiny_config().data.hu_window
    hounsfield = display / 255.0 * (upper - lower) + lower  # back through the lung window
    save_nifti(tmp_path / "hu.nii", hounsfield[:, :, None])
    save_nifti(tmp_path / "display.nii", display[:, :, None])
    config = make_tiny_config()
    predict.predict_path(config, None, tmp_path / "hu.nii", tmp_path / "out")
    with pytest.raises(UserError, match="display.nii: values do not look like CT"):
        predict.predict_path(config, None, tmp_path / "display.nii", tmp_path / "out")
    predict.predict_path(config, None, tmp_path / "display.nii", tmp_path / "out", input_units="display")
    hu_mask = np.asarray(nibabel.load(tmp_path / "out" / "hu_mask.nii").dataobj)[:, :, 0]
    display_mask = np.asarray(nibabel.load(tmp_path / "out" / "display_mask.nii").dataobj)[:, :, 0]
    assert 0 < hu_mask.sum() < hu_mask.size
    assert np.mean(hu_mask == display_mask) > 0.999  # the same image either way, up to float rounding


def test_the_same_mask_written_twice_has_the_same_gzip_bytes(tmp_path):
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((4, 3, 2))
    written = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "case_mask.nii.gz"
        with volumes.nifti_mask_writer(path, header, (4, 3, 2)) as write:
            for index in range(2):
                write(np.full((4, 3), index, np.uint8))
        written.append(path.read_bytes())
    assert written[0] == written[1]
    assert nibabel.load(tmp_path / "first" / "case_mask.nii.gz").get_fdata()[..., 1].min() == 1


# --- Slices exported in another display window ------------------------------------------------------------


def _reference_counts():
    """A training-slice histogram whose 5th and 95th percentiles are 40 and 240 (half the pixels at each)."""
    counts = np.zeros(256, np.int64)
    counts[40] = counts[240] = 50
    return counts


def test_window_matching_maps_a_slice_onto_the_training_window_before_the_model(
    tmp_path, monkeypatch, capsys
):
    _stand_in_model(monkeypatch)
    monkeypatch.setattr(predict.datasets, "training_intensity_counts", lambda data: _reference_counts())
    # A slice stored in a dark window: 448 pixels at 10, 64 at 50, 64 at 55, 448 at 110, so its 5th and
    # 95th percentiles are 10 and 110. Matched, v -> 40 + (v - 10) * 2: 10 -> 40, 50 -> 120, 55 -> 130,
    # 110 -> 240; the stand-in model's probability is that over 255, lesion from 0.5: rows 16-31.
    image = np.full((32, 32), 10, np.uint8)
    image[14:16], image[16:18], image[18:] = 50, 55, 110
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "dark.png")
    config = make_tiny_config()
    predict.predict_path(config, None, tmp_path / "in", tmp_path / "as_is")
    with Image.open(tmp_path / "as_is" / "dark_mask.png") as mask:
        assert not np.asarray(mask).any()  # 110 / 255 < 0.5: nothing, as the slice is
    predict.predict_path(config, None, tmp_path / "in", tmp_path / "matched", input_window="match")
    expected = np.zeros((32, 32), np.uint8)
    expected[16:] = 255
    with Image.open(tmp_path / "matched" / "dark_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), expected)
    notice = (
        "--input_window=match: each slice's 5th and 95th intensity percentiles mapped onto the training "
        "slices' (40.0, 240.0 of 255; data.name='synthetic')"
    )
    assert capsys.readouterr().out.splitlines()[-2:] == [notice, f"1 image(s) -> {tmp_path / 'matched'}"]
    with Image.open(tmp_path / "matched" / "dark_overlay.png") as overlay:  # drawn on the slice as given
        assert np.asarray(overlay)[0, 0].tolist() == [10, 10, 10]


def test_window_matching_refuses_a_volume_and_an_unknown_window(tmp_path, monkeypatch):
    _stand_in_model(monkeypatch)
    volume, _ = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    message = (
        f"^--input_window=match: {source} is a volume; it applies to PNG/JPEG slices only "
        r"\(a volume in Hounsfield units is windowed by data.hu_window\)$"
    )
    with pytest.raises(UserError, match=message):
        predict.predict_path(make_tiny_config(), None, source, tmp_path / "out", input_window="match")
    with pytest.raises(UserError, match=r"^--input_window: 'histogram' is not one of \['as_is', 'match'\]$"):
        predict.predict_path(make_tiny_config(), None, source, tmp_path / "out", input_window="histogram")
    assert not (tmp_path / "out").exists()


def test_the_command_passes_input_window_on(tmp_path, monkeypatch, capsys):
    _stand_in_model(monkeypatch)
    volume, _ = _volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    arguments = (f"--input={source}", f"--output={tmp_path / 'out'}", "--input_window=match")
    assert _predict_command_exit_code(*arguments) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --input_window=match: {source} is a volume; it applies to PNG/JPEG slices only "
        "(a volume in Hounsfield units is windowed by data.hu_window)"
    ]


def test_the_matched_window_is_the_training_slices_pooled_histogram(capsys):
    from rdunet_jax import datasets

    config = make_tiny_config()
    training = datasets.load_source(config.data, "train")
    pixels = np.concatenate([np.asarray(training[index]["image"]).ravel() for index in range(len(training))])
    reference = predict._training_window(config)
    np.testing.assert_array_equal(reference, np.bincount(pixels, minlength=256))
    low, high = np.percentile(pixels, [5, 95])
    assert f"slices' ({low:.1f}, {high:.1f} of 255; data.name='synthetic')" in capsys.readouterr().out


def test_the_command_restores_the_asked_checkpoint_and_says_what_it_wrote(tiny_state, tmp_path, capsys):
    import jax

    # Best at step 1 (the trained tiny state), latest at step 2 (its parameters halved: other masks).
    halved = tiny_state.replace(
        step=tiny_state.step + 5, params=jax.tree.map(lambda x: x / 2, tiny_state.params)
    )
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "run" / "checkpoints")
    meta = {"epoch": 1, "model": checkpoints.architecture(make_tiny_config().model)}
    run_checkpoints.save("best", 1, tiny_state, meta)
    run_checkpoints.save("latest", 2, halved, meta)
    run_checkpoints.close()
    volume, _ = _volume((32, 32, 3))
    source = save_nifti(tmp_path / "case.nii", volume)
    config = make_tiny_config()
    for name, step, state in (("restored", 2, halved), ("direct", None, halved), ("best", None, tiny_state)):
        predictor = inference.JaxPredictor(state) if name == "direct" else None
        (summary,) = predict.predict_path(
            config, tmp_path / "run", source, tmp_path / name, checkpoint_step=step, predictor=predictor
        )
        assert summary["checkpoint_step"] == int(state.step)
        mask = tmp_path / name / "case_mask.nii"
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"{source}: lesion {summary['lesion_volume_ml']:.1f} mL in "
            f"{summary['slices_with_lesion']}/{summary['num_slices']} slices -> {mask}"
        )
    masks = {
        name: np.asarray(nibabel.load(tmp_path / name / "case_mask.nii").dataobj)
        for name in ("restored", "direct", "best")
    }
    np.testing.assert_array_equal(masks["restored"], masks["direct"])
    assert not np.array_equal(masks["restored"], masks["best"])  # the two checkpoints do differ
    # ONNX Runtime (`eval.runtime`) runs the export of the same restored checkpoint: the same mask but for
    # voxels within float tolerance of the threshold.
    pytest.importorskip("onnxruntime")
    config.eval.runtime = "onnxruntime"
    (summary,) = predict.predict_path(config, tmp_path / "run", source, tmp_path / "onnx")
    onnx_mask = np.asarray(nibabel.load(tmp_path / "onnx" / "case_mask.nii").dataobj)
    assert summary["checkpoint_step"] == int(tiny_state.step)
    assert np.mean(onnx_mask == masks["best"]) > 0.999
    # The summary says what the prediction depended on.
    settings = {
        key: summary[key] for key in ("threshold", "test_time_flips", "runtime", "image_size", "hu_window")
    }
    assert settings == {
        "threshold": config.eval.threshold,
        "test_time_flips": False,
        "runtime": "onnxruntime",
        "image_size": 32,
        "hu_window": [-1350.0, 150.0],
    }
    config.eval.test_time_flips = True
    (summary,) = predict.predict_path(config, tmp_path / "run", source, tmp_path / "flips")
    assert summary["test_time_flips"] is True


def test_missing_input_or_output_and_unknown_units_are_one_line_each(tmp_path):
    needs = "--mode=predict needs --input (a NIfTI/PNG/JPEG file or a folder) and --output"
    for input_path, output_dir in ((None, tmp_path / "out"), (tmp_path, None)):
        with pytest.raises(UserError) as error:
            predict.predict_path(make_tiny_config(), None, input_path, output_dir, predictor=ImagePredictor())
        assert str(error.value) == needs
    with pytest.raises(UserError) as error:
        predict.predict_path(make_tiny_config(), None, tmp_path, tmp_path / "out", input_units="kelvin")
    assert str(error.value) == "--input_units: 'kelvin' is not one of ['hu', 'display']"


@pytest.mark.parametrize("units", ["display", "hu"])
def test_input_units_given_for_slices_alone_are_refused_not_ignored(tmp_path, units):
    # Slices are always read as display images: the flag was silently ignored.
    (tmp_path / "slices").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "slices" / "a.png")
    with pytest.raises(UserError) as error:
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "slices",
            tmp_path / "out",
            input_units=units,
            predictor=ImagePredictor(),
        )
    assert str(error.value) == (
        f"--input_units={units}: {tmp_path / 'slices'} holds PNG/JPEG slices only, which are always read as "
        "8-bit display images; it applies to volumes (NIfTI, DICOM)"
    )
    assert not (tmp_path / "out").exists()
    # Beside a volume it is the volume's.
    save_nifti(tmp_path / "slices" / "volume.nii", np.full((8, 8, 1), 40.0, np.float32))
    summaries = predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "slices",
        tmp_path / "out",
        input_units="display",
        predictor=ImagePredictor(),
    )
    assert [summary["input_units"] for summary in summaries] == ["display"]


def test_an_image_overlay_outlines_the_prediction_in_red_and_the_ground_truth_in_white(tmp_path, monkeypatch):
    _stand_in_model(monkeypatch)
    # The stand-in model finds lesion where the slice is bright (rows 16-31); the expert mask covers
    # columns 0-9 instead. Each outline is the mask's border, inside it.
    image = np.full((32, 32), 20, np.uint8)
    image[16:] = 200
    truth = np.zeros((32, 32), np.uint8)
    truth[:, :10] = 255
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "s.png")
    Image.fromarray(truth).save(tmp_path / "truth.png")
    predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "in" / "s.png",
        tmp_path / "out",
        ground_truth=tmp_path / "truth.png",
    )
    with Image.open(tmp_path / "out" / "s_overlay.png") as overlay:
        rgb = np.asarray(overlay)
    red = (rgb[..., 0] == 255) & (rgb[..., 1] == 0)
    white = (rgb == 255).all(axis=-1)
    assert red[16, 20] and red[31, 20] and not red[:16].any()  # the prediction's top and bottom edges
    assert white[5, 9] and white[5, 0] and not white[:, 10:].any()  # the expert mask's right and left edges


def _predict_folder_with_truth_folder(tmp_path, truth="truth", output="out"):
    """The stand-in model over tmp_path/in, with the expert masks of tmp_path/truth, into tmp_path/out."""
    return predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "in",
        tmp_path / output,
        ground_truth=tmp_path / truth,
        predictor=ImagePredictor(),
    )


def test_a_ground_truth_folder_gives_each_slice_its_same_named_mask_and_bad_ones_are_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32), 20, np.uint8)).save(tmp_path / "in" / name)
    truth = np.zeros((32, 32), np.uint8)
    truth[:, :10] = 255
    Image.fromarray(truth).save(tmp_path / "truth" / "a.png")  # b has no expert mask
    _predict_folder_with_truth_folder(tmp_path)
    for name, outlined in (("a", True), ("b", False)):
        with Image.open(tmp_path / "out" / f"{name}_overlay.png") as overlay:
            assert (np.asarray(overlay) == 255).all(axis=-1).any() == outlined  # white: the expert outline
    with pytest.raises(UserError) as error:  # a folder of inputs takes a folder of masks
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "in",
            tmp_path / "again",
            ground_truth=tmp_path / "truth" / "a.png",
        )
    assert str(error.value) == (
        f"--ground_truth: {tmp_path / 'truth' / 'a.png'} must be a folder when --input is a folder"
    )
    with pytest.raises(UserError) as error:
        predict.predict_path(
            make_tiny_config(),
            None,
            tmp_path / "in" / "a.png",
            tmp_path / "again",
            ground_truth=tmp_path / "no.png",
        )
    assert str(error.value) == f"--ground_truth: {tmp_path / 'no.png'} does not exist"


def test_a_ground_truth_folder_matches_masks_by_stem_says_which_inputs_have_none_and_refuses_ambiguity(
    tmp_path, capsys
):
    # COVID-SemiSeg's layout: Imgs/N.jpg, GT/N.png.
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    for name in ("a.jpg", "b.jpg", "c.png"):
        Image.fromarray(np.full((32, 32), 20, np.uint8)).save(tmp_path / "in" / name)
    truth = np.zeros((32, 32), np.uint8)
    truth[:, :10] = 255
    Image.fromarray(truth).save(tmp_path / "truth" / "a.png")
    Image.fromarray(truth).save(tmp_path / "truth" / "c.png")
    (tmp_path / "truth" / "b").mkdir()  # a folder is not b's mask
    _predict_folder_with_truth_folder(tmp_path)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"warning: --ground_truth: no mask in {tmp_path / 'truth'} for 1 of 3 inputs (first: b.jpg); they "
        "are predicted without one"
    )
    for name, outlined in (("a", True), ("b", False), ("c", True)):
        with Image.open(tmp_path / "out" / f"{name}_overlay.png") as overlay:
            assert (np.asarray(overlay) == 255).all(axis=-1).any() == outlined  # white: the expert outline
    Image.fromarray(truth).save(tmp_path / "truth" / "a.jpg")  # the same name still wins
    Image.fromarray(truth).save(tmp_path / "truth" / "b.png")
    Image.fromarray(truth).save(tmp_path / "truth" / "b.bmp")  # not an image this mode reads
    save_nifti(tmp_path / "truth" / "b.nii.gz", np.zeros((4, 4, 1), np.uint8))
    assert refusal(_predict_folder_with_truth_folder, tmp_path, "truth", "again") == (
        f"--ground_truth: b.nii.gz, b.png in {tmp_path / 'truth'} all match b.jpg; keep one"
    )
    (tmp_path / "other").mkdir()
    Image.fromarray(truth).save(tmp_path / "other" / "z.png")
    assert refusal(_predict_folder_with_truth_folder, tmp_path, "other", "again") == (
        f"--ground_truth: no file in {tmp_path / 'other'} has the name of an input (first: a.jpg)"
    )
    assert not (tmp_path / "again").exists()
    # One input takes its mask from a folder too; a folder without it is refused, not left unsaid.
    (tmp_path / "solo").mkdir()
    Image.fromarray(truth).save(tmp_path / "solo" / "a.png")
    predict.predict_path(
        make_tiny_config(),
        None,
        tmp_path / "in" / "a.jpg",
        tmp_path / "alone",
        ground_truth=tmp_path / "solo",
        predictor=ImagePredictor(),
    )
    with Image.open(tmp_path / "alone" / "a_overlay.png") as overlay:
        assert (np.asarray(overlay) == 255).all(axis=-1).any()  # its mask found in the folder
    assert refusal(
        predict.predict_path,
        make_tiny_config(),
        None,
        tmp_path / "in" / "a.jpg",
        tmp_path / "again",
        ground_truth=tmp_path / "other",
        predictor=ImagePredictor(),
    ) == (f"--ground_truth: no file in {tmp_path / 'other'} has the name of an input (first: a.jpg)")
    assert not (tmp_path / "again").exists()


def test_two_inputs_that_would_write_one_output_are_refused_naming_both(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("s.png", "s.jpg"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / name)
    with pytest.raises(UserError) as error:
        predict.predict_path(
            make_tiny_config(), None, tmp_path / "in", tmp_path / "out", predictor=ImagePredictor()
        )
    first, second = tmp_path / "in" / "s.jpg", tmp_path / "in" / "s.png"  # sorted: .jpg first
    assert (
        str(error.value)
        == f"--input: {second} and {first} would both write {tmp_path / 'out' / 's_mask.png'}"
    )


def test_window_matching_without_readable_training_slices_fails_before_restoring(tmp_path, monkeypatch):
    def unreadable(data):
        raise UserError("data.manual_dir: no COVID-SemiSeg here")

    monkeypatch.setattr(predict.datasets, "training_intensity_counts", unreadable)
    monkeypatch.setattr(steps, "restore_state", pytest.fail)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "s.png")
    with pytest.raises(UserError, match="^data.manual_dir: no COVID-SemiSeg here$"):
        predict.predict_path(
            make_tiny_config(), None, tmp_path / "in", tmp_path / "out", input_window="match"
        )
    assert not (tmp_path / "out").exists()


# --- The volume path: its settings, summary, overlays and refusals, each against a hand count -------------


def _lesion_volume(shape=(32, 32, 4)):
    """HU at the tiny model's size (no resize): air at -1000 HU (4 rows), tissue at -500 HU, lesion at
    +100 HU: none on slice 0, one voxel on slice 1, a 2 x 3 box on slice 2 and a 4 x 5 box on slice 3."""
    volume = np.full(shape, -500, np.int16)
    volume[28:] = -1000  # CT has air: the units check looks for it
    volume[10, 12, 1] = 100
    volume[4:6, 7:10, 2] = 100
    volume[20:24, 3:8, 3] = 100
    return volume


def _narrow_window_config():
    """The tiny config in the window (-200, 300) HU: -500 HU is 0 and +100 HU is 0.6 (in the default lung
    window (-1350, 150), -500 HU is 0.57 and would be lesion too)."""
    config = make_tiny_config()
    config.data.hu_window = (-200.0, 300.0)
    return config


def _grey_levels(png) -> set:
    """The grey levels of an overlay: its pixels with R = G = B."""
    with Image.open(png) as picture:
        rgb = np.asarray(picture)
    return set(np.unique(rgb[(rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])][:, 0]).tolist())


def _colour_pixels(png, colour) -> int:
    with Image.open(png) as picture:
        return int(np.all(np.asarray(picture) == colour, axis=-1).sum())


def test_a_volume_is_windowed_by_data_hu_window_and_summarised_by_hand_counts(tmp_path):
    volume = _lesion_volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    (summary,) = predict.predict_path(
        _narrow_window_config(), None, source, tmp_path / "out", predictor=ImagePredictor(7)
    )

    mask = np.asarray(nibabel.load(tmp_path / "out" / "case_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, (volume > 0).astype(np.uint8))
    assert summary.pop("voxel_spacing_mm") == pytest.approx([0.7, 0.9, 2.5])
    assert summary.pop("lesion_volume_ml") == pytest.approx(27 * 0.7 * 0.9 * 2.5 / 1000)
    assert summary == {
        "input": str(source),
        "mask": str(tmp_path / "out" / "case_mask.nii.gz"),
        "shape": [32, 32, 4],
        "num_slices": 4,
        "lesion_voxels": 27,
        "slices_with_lesion": 3,  # the one-voxel slice counts, the empty one does not
        "fraction_slices_with_lesion": 0.75,
        "input_units": "hu",
        "orientation": "PL",
        "orientation_in_header": True,
        "checkpoint_step": 7,
        "threshold": 0.5,
        "test_time_flips": False,
        "runtime": "jax",
        "image_size": 32,
        "hu_window": [-200.0, 300.0],
    }
    # Overlays (up to 4) of the slices with lesion only; grey levels as the model saw them: 0 and 0.6 x 255.
    overlays = sorted((tmp_path / "out" / "case_overlays").iterdir())
    assert [path.name for path in overlays] == ["slice_0001.png", "slice_0002.png", "slice_0003.png"]
    assert _grey_levels(overlays[-1]) == {0, 153}  # the 4 x 5 box's 2 x 3 inside is not outline


class LeftHalfPredictor(inference.Predictor):
    """A stand-in model that is not mirror-symmetric: 0.8 on the left half of the model's columns, 0.1 on
    the right (mirrored left to right and averaged: 0.45 everywhere)."""

    step = 3

    def _probabilities(self, images):
        left = jnp.arange(images.shape[2]) < images.shape[2] // 2
        return jnp.broadcast_to(jnp.where(left, 0.8, 0.1)[None, None, :, None], images.shape)


@pytest.mark.parametrize("test_time_flips, lesion_voxels", [(False, 32 * 16 * 2), (True, 0)])
def test_a_volume_is_predicted_with_test_time_flips_as_configured(tmp_path, test_time_flips, lesion_voxels):
    source = save_nifti(tmp_path / "case.nii", _lesion_volume()[..., :2])  # the stand-in ignores it
    config = make_tiny_config()
    config.eval.test_time_flips = test_time_flips
    (summary,) = predict.predict_path(config, None, source, tmp_path / "out", predictor=LeftHalfPredictor())
    assert summary["lesion_voxels"] == lesion_voxels and summary["test_time_flips"] is test_time_flips


def test_a_display_volume_overlay_shows_its_display_values(tmp_path):
    display = np.full((32, 32, 1), 40.0, np.float32)
    display[8:16, 8:16, 0] = 200.0  # 200 / 255 = 0.78: lesion; 40 / 255 = 0.16: not
    source = save_nifti(tmp_path / "windowed.nii", display)
    (summary,) = predict.predict_path(
        make_tiny_config(), None, source, tmp_path / "out", input_units="display", predictor=ImagePredictor()
    )
    assert summary["lesion_voxels"] == 64
    assert _grey_levels(tmp_path / "out" / "windowed_overlays" / "slice_0000.png") == {40, 200}


def test_a_volume_with_ground_truth_is_scored_and_its_overlays_outline_both(tmp_path):
    volume = _lesion_volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    truth = np.zeros(volume.shape, np.uint8)
    truth[20:24, 3:10, 3] = 1  # the 4 x 5 box widened to 4 x 7: 20 of 27 predicted voxels, 28 expert
    truth_file = save_nifti(tmp_path / "truth.nii.gz", truth)
    (summary,) = predict.predict_path(
        _narrow_window_config(),
        None,
        source,
        tmp_path / "out",
        ground_truth=truth_file,
        predictor=ImagePredictor(),
    )
    assert summary["ground_truth"] == str(truth_file)
    assert summary["dice_with_ground_truth"] == pytest.approx(2 * 20 / (27 + 28))
    overlays = tmp_path / "out" / "case_overlays"
    # Red outlines the prediction on each slice; white the expert's, on the only slice that has one.
    assert [_colour_pixels(overlays / f"slice_{index:04d}.png", (255, 0, 0)) > 0 for index in (1, 2, 3)] == [
        True
    ] * 3
    assert [
        _colour_pixels(overlays / f"slice_{index:04d}.png", (255, 255, 255)) > 0 for index in (1, 2, 3)
    ] == [
        False,
        False,
        True,
    ]


def test_a_volume_predicted_again_with_overwrite_replaces_its_overlays(tmp_path):
    source = save_nifti(tmp_path / "case.nii", _lesion_volume())
    config = _narrow_window_config()
    predict.predict_path(config, None, source, tmp_path / "out", predictor=ImagePredictor())
    moved = np.where(_lesion_volume() > 0, -500, _lesion_volume())
    moved[3:9, 3:9, 0] = 100  # lesion on slice 0 only now
    save_nifti(source, moved)
    predict.predict_path(config, None, source, tmp_path / "out", overwrite=True, predictor=ImagePredictor())
    assert [path.name for path in (tmp_path / "out" / "case_overlays").iterdir()] == ["slice_0000.png"]


def test_a_volume_ground_truth_of_another_shape_in_a_folder_fails_before_any_output(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    for name, shape in (("a.nii", (32, 32, 4)), ("b.nii", (32, 30, 4))):
        save_nifti(tmp_path / "in" / name, _lesion_volume())
        save_nifti(tmp_path / "truth" / name, np.zeros(shape, np.uint8))
    with pytest.raises(
        UserError, match=r"--ground_truth: \S+truth/b.nii has shape \(32, 30, 4\), \S+in/b.nii"
    ):
        _predict_folder_with_truth_folder(tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_truncated_ground_truth_is_one_line_naming_it_and_leaves_no_mask(tmp_path):
    rng = np.random.default_rng(1)  # noise: long enough compressed data to cut mid-stream
    source = save_nifti(tmp_path / "case.nii.gz", _lesion_volume())
    truth = save_nifti(tmp_path / "truth.nii.gz", rng.integers(0, 2, (32, 32, 4)).astype(np.int16))
    truth.write_bytes(truth.read_bytes()[: truth.stat().st_size * 3 // 5])
    with pytest.raises(UserError, match="truth.nii.gz: corrupt or truncated NIfTI file"):
        predict.predict_path(
            make_tiny_config(), None, source, tmp_path / "out", ground_truth=truth, predictor=ImagePredictor()
        )
    assert not (tmp_path / "out").exists()


def test_a_volume_ground_truth_stored_in_another_orientation_is_refused_before_any_output(tmp_path):
    # The same anatomy stored LPS beside a RAS volume: the same shape, but voxel (i, j, k) is elsewhere.
    volume = _lesion_volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume, np.eye(4))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = 31.0
    truth = save_nifti(tmp_path / "truth.nii.gz", (volume[::-1, ::-1] > 0).astype(np.uint8), lps)
    message = refusal(
        predict.predict_path,
        make_tiny_config(),
        None,
        source,
        tmp_path / "out",
        ground_truth=truth,
        predictor=ImagePredictor(),
    )
    assert message.startswith(
        f"--ground_truth: {truth} is not in the geometry of the volume {source} (its affine differs from the "
        "input's [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]"
    )
    assert not (tmp_path / "out").exists()


# Stored axis 0 superior-inferior: the volume and its mask are read whole and turned, a path of its own.
SAGITTAL = np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize(
    "kind, message, affine",
    [
        ("0-255", r"mask values \{255\} outside the known labels \{0, 1, 2, 3\}", ROTATED_AFFINE),
        (
            "the CT",
            r"mask values \{-1000, -500, 100\} outside the known labels \{0, 1, 2, 3\}",
            ROTATED_AFFINE,
        ),
        ("fractions", r"mask has non-integer values; expected labels \{0, 1, 2, 3\}", ROTATED_AFFINE),
        ("slice 0", r"mask values \{9\} outside the known labels \{0, 1, 2, 3\}", ROTATED_AFFINE),
        ("slice 0", r"mask values \{9\} outside the known labels \{0, 1, 2, 3\}", SAGITTAL),
    ],
    ids=["0-255", "the CT", "fractions", "slice 0", "slice 0 of a sagittal-stored volume"],
)
def test_a_volume_ground_truth_that_is_not_a_label_mask_is_one_line_and_leaves_nothing(
    tmp_path, kind, message, affine
):
    # It was scored as it stood (only values 1 and 2 are lesion): a {0, 255} mask or the CT itself gave a
    # Dice of 0 without a word. The middle slice is checked before any output, every slice as it is read
    # (a volume stored otherwise than axially: as it is read whole and turned).
    volume = _lesion_volume()
    source = save_nifti(tmp_path / "case.nii.gz", volume, affine)
    labels = (volume > 0).astype(np.float32)
    truth = {
        "0-255": labels * 255,
        "the CT": volume.astype(np.float32),
        "fractions": labels * 0.5,
        "slice 0": np.where(np.arange(4) == 0, 9.0, labels),  # not the middle slice (2) checked first
    }[kind]
    truth_file = save_nifti(tmp_path / "truth.nii.gz", truth, affine)
    got = refusal(
        predict.predict_path,
        make_tiny_config(),
        None,
        source,
        tmp_path / "out",
        ground_truth=truth_file,
        predictor=ImagePredictor(),
    )
    assert re.fullmatch(f"--ground_truth: {re.escape(str(truth_file))}: {message}", got)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_an_image_ground_truth_of_another_size_names_both_files(tmp_path):
    _write_images(tmp_path / "in")
    truth = tmp_path / "truth.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(truth)
    image = tmp_path / "in" / "a.png"
    with pytest.raises(UserError) as error:
        predict.predict_path(
            make_tiny_config(), None, image, tmp_path / "out", ground_truth=truth, predictor=ImagePredictor()
        )
    with Image.open(image) as picture:
        size = picture.size
    assert str(error.value) == f"{truth}: size (30, 30) differs from its image {image} ({size})"


def test_a_mask_at_the_input_size_keeps_probabilities_at_the_threshold_as_uint8():
    probabilities = np.array([[0.5, 0.25], [0.75, 0.4999]], np.float32)
    mask = predict.mask_at_input_size(probabilities, (2, 2), 0.5)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[1, 0], [1, 0]])


def test_a_volume_whose_header_gives_no_orientation_is_warned_and_said_in_its_summary(tmp_path, capsys):
    # Both codes 0 (an ANALYZE conversion): nibabel reads the voxel axes as left, anterior, superior.
    unknown = nibabel.Nifti1Image(_lesion_volume(), None)
    assert (unknown.header["qform_code"], unknown.header["sform_code"]) == (0, 0)
    nibabel.save(unknown, tmp_path / "analyze.nii")
    save_nifti(tmp_path / "scanner.nii", _lesion_volume())
    summaries = predict.predict_path(
        _narrow_window_config(), None, tmp_path, tmp_path / "out", predictor=ImagePredictor()
    )
    assert [(summary["input"], summary["orientation_in_header"]) for summary in summaries] == [
        (str(tmp_path / "analyze.nii"), False),
        (str(tmp_path / "scanner.nii"), True),
    ]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path / 'analyze.nii'}: no orientation in its header (qform_code and sform_code 0): "
        "read with its voxel axes as left, anterior, superior (nibabel's ANALYZE default); stored otherwise, "
        "the model sees its slices turned: write the scanner's affine into the file"
    ]
