"""Prediction with the multi-class heads: label-map NIfTI round trip, per-class volumes, involvement and
palette PNG masks, with a stand-in model whose class follows the preprocessed intensity."""

import json

import nibabel
import numpy as np
import pytest
from helpers import ROTATED_AFFINE, IntensityClassPredictor, class_phantom, make_tiny_config, save_nifti
from PIL import Image

from rdunet_jax import involvement, predict, predict_classes, visualize
from rdunet_jax.errors import UserError


def _config(head, classes):
    config = make_tiny_config()
    config.model.head, config.data.classes = head, classes
    config.loss = "dice_ce" if head == "exclusive" else "dice"
    return config


def test_exclusive_label_map_nifti_round_trip_with_class_volumes(tmp_path):
    volume, expected = class_phantom()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    config = _config("exclusive", ("ggo", "consolidation"))
    (summary,) = predict.predict_path(
        config, None, source, tmp_path / "out", predictor=IntensityClassPredictor("exclusive")
    )
    written = nibabel.load(tmp_path / "out" / "case_mask.nii.gz")
    assert written.shape == volume.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, ROTATED_AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)  # each voxel's class, exactly
    voxel_ml = 0.7 * 0.9 * 2.5 / 1000
    for value, name in ((1, "ggo"), (2, "consolidation")):
        count = int(np.sum(expected == value))
        assert summary["classes"][name]["voxels"] == count
        assert summary["classes"][name]["volume_ml"] == pytest.approx(count * voxel_ml)
    assert summary["lesion_voxels"] == int(np.sum(expected > 0))  # any class
    assert "involvement" not in summary
    assert json.loads((tmp_path / "out" / "case_summary.json").read_text()) == summary
    overlays = sorted((tmp_path / "out" / "case_overlays").glob("*.png"))
    with Image.open(overlays[0]) as picture:  # a legend below the slice: taller than the 32 px slice
        assert picture.mode == "RGB" and picture.size[1] > 32
        slice_pixels = np.asarray(picture)[:32, :32]
    for index in (0, 1):  # each class outlined in its colour
        assert np.all(slice_pixels == visualize.class_colour(index), axis=-1).any()


def test_a_label_map_of_a_volume_stored_along_another_axis_lands_on_its_voxels(tmp_path):
    volume, expected = class_phantom()
    # Voxel axes stored as (0, 2, 1): the third is no longer head to foot, so the volume is turned whole.
    swap = np.array([[0, 1], [2, 1], [1, 1]])
    nibabel.save(nibabel.Nifti1Image(volume, ROTATED_AFFINE).as_reoriented(swap), tmp_path / "turned.nii.gz")
    config = _config("exclusive", ("ggo", "consolidation"))
    predict.predict_path(
        config,
        None,
        tmp_path / "turned.nii.gz",
        tmp_path / "out",
        predictor=IntensityClassPredictor("exclusive"),
    )
    written = nibabel.load(tmp_path / "out" / "turned_mask.nii.gz")
    assert written.shape == (32, 3, 32)
    np.testing.assert_array_equal(np.asarray(written.as_reoriented(swap).dataobj), expected)


def test_multilabel_lungs_and_infection_summary_has_the_involvement(tmp_path):
    volume, expected = class_phantom()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    truth = save_nifti(tmp_path / "truth.nii.gz", expected)
    config = _config("multilabel", ("lungs", "infection"))
    (summary,) = predict.predict_path(
        config,
        None,
        source,
        tmp_path / "out",
        predictor=IntensityClassPredictor("multilabel"),
        ground_truth=truth,
    )
    # Channel 'lungs' is on for classes 1 and 2, 'infection' for class 2 only: the label map draws
    # infection (2) over the lungs, so it equals the phantom's labels.
    np.testing.assert_array_equal(
        np.asarray(nibabel.load(tmp_path / "out" / "case_mask.nii.gz").dataobj), expected
    )
    lungs, infection = int(np.sum(expected > 0)), int(np.sum(expected == 2))
    assert summary["classes"]["lungs"]["voxels"] == lungs
    assert summary["involvement"]["involvement_percent"] == pytest.approx(100 * infection / lungs)
    assert (lungs, infection) == (756, 144) and summary["involvement"]["severity"] == "5-25%"  # 19 %
    # Against the label map as ground truth (value k is class k, infection drawn over the lungs), both
    # channels are exact: the expert's lungs channel holds its infection too, as the predicted one does.
    assert summary["classes"]["infection"]["dice_with_ground_truth"] == 1.0
    assert summary["classes"]["lungs"]["dice_with_ground_truth"] == 1.0
    # The top-level Dice scores the lesion class, infection, not the label map's every non-zero value.
    assert summary["dice_with_ground_truth"] == 1.0


def test_image_prediction_writes_a_palette_label_map(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((32, 32), np.uint8)
    image[2:10, 2:10], image[20:30, 5:25] = 150, 240  # 0.59 -> class 1, 0.94 -> class 2
    Image.fromarray(image).save(folder / "slice.png")
    Image.fromarray(image.T.copy()).save(folder / "turned.png")  # every slice of a folder is written
    config = _config("exclusive", ("ggo", "consolidation"))
    predict.predict_path(
        config, None, folder, tmp_path / "out", predictor=IntensityClassPredictor("exclusive")
    )
    expected = np.zeros((32, 32), np.uint8)
    expected[2:10, 2:10], expected[20:30, 5:25] = 1, 2
    for name, labels_expected in (("slice", expected), ("turned", expected.T)):
        with Image.open(tmp_path / "out" / f"{name}_mask.png") as mask:
            assert mask.mode == "P"
            assert mask.getpalette()[3:9] == [255, 0, 0, 0, 200, 0]  # class 1 red, class 2 green
            np.testing.assert_array_equal(np.asarray(mask), labels_expected)


def _bad_values(expected):
    expected[0, 0, 1] = 3  # two classes: 0..2 only
    return expected


@pytest.mark.parametrize(
    "mode, classes, spoil, message",
    [
        (
            "multilabel",
            ("lungs", "infection"),
            _bad_values,
            r"^--ground_truth: .*truth\.nii\.gz: mask values \{3\} outside the known labels \{0, 1, 2\}$",
        ),
        (
            "exclusive",
            ("ggo", "consolidation"),
            lambda expected: expected[:, :30],
            r"--ground_truth: \S+truth\.nii\.gz has shape \(32, 30, 3\), \S+case\.nii\.gz \(32, 32, 3\)$",
        ),
    ],
    ids=["values outside the classes", "another shape"],
)
def test_a_bad_ground_truth_label_map_is_refused_naming_the_file(tmp_path, mode, classes, spoil, message):
    volume, expected = class_phantom()
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    truth = save_nifti(tmp_path / "truth.nii.gz", spoil(expected))
    with pytest.raises(UserError, match=message):
        predict.predict_path(
            _config(mode, classes),
            None,
            source,
            tmp_path / "out",
            predictor=IntensityClassPredictor(mode),
            ground_truth=truth,
        )
    assert not (tmp_path / "out" / "case_mask.nii.gz").exists()


def _white_in_slice(path, size=32) -> np.ndarray:
    """Where an overlay's slice (above its legend, which has a white 'expert' swatch) is white."""
    with Image.open(path) as overlay:
        return (np.asarray(overlay)[:size, :size] == visualize.TARGET_COLOUR).all(axis=-1)


def test_an_expert_label_map_is_outlined_in_white_on_a_multi_class_slice_and_volume_overlays(tmp_path):
    config = _config("exclusive", ("ggo", "consolidation"))
    image = np.full((32, 32), 20, np.uint8)
    image[2:10, 2:10] = 150  # class 1 (see test_image_prediction_writes_a_palette_label_map)
    truth = np.zeros((32, 32), np.uint8)
    truth[20:30, 0:6], truth[20:30, 20:26] = 1, 2  # where the model finds nothing
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "s.png")
    Image.fromarray(truth).save(tmp_path / "truth.png")
    predictor = IntensityClassPredictor("exclusive")

    def predict_slice(output):
        kwargs = {"predictor": predictor, "ground_truth": tmp_path / "truth.png"}
        return predict.predict_path(config, None, tmp_path / "in" / "s.png", tmp_path / output, **kwargs)

    predict_slice("out")
    white = _white_in_slice(tmp_path / "out" / "s_overlay.png")
    assert white[20, 0] and white[29, 25] and not white[:20].any()  # both classes' outlines, nothing else
    assert not white[21:29, 1:5].any() and not white[:, 6:20].any()  # outlines, not fills
    truth[0, 0] = 3  # two classes: 0..2 only
    Image.fromarray(truth).save(tmp_path / "truth.png")
    with pytest.raises(
        UserError, match=r"truth\.png: mask values \{3\} outside the known labels \{0, 1, 2\}$"
    ):
        predict_slice("again")
    volume, expected = class_phantom()
    expert = np.zeros_like(expected)
    expert[28:31, 0:3, :] = 1  # a class-1 box the model does not find, on every slice
    source = save_nifti(tmp_path / "case.nii.gz", volume)
    truth_file = save_nifti(tmp_path / "truth.nii.gz", expert)
    predict.predict_path(config, None, source, tmp_path / "out", predictor=predictor, ground_truth=truth_file)
    for overlay in sorted((tmp_path / "out" / "case_overlays").glob("*.png")):
        assert _white_in_slice(overlay).sum() == 8  # the 3x3 box's border, turned for display


def _tally(head, classes, threshold=0.5):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.eval.threshold = head, classes, threshold
    return predict_classes.ClassTally(config), config


def test_a_class_tally_by_hand_with_its_threshold_an_exclusive_heads_lungs_and_no_lungs(tmp_path):
    # Multilabel at threshold 0.7: lungs on 2 pixels (0.6 is not), infection on one of them and outside.
    tally, config = _tally("multilabel", ("lungs", "infection"), threshold=0.7)
    probabilities = np.zeros((2, 2, 2), np.float32)
    probabilities[..., 0] = [[0.8, 0.8], [0.6, 0.1]]
    probabilities[0, 0, 1] = probabilities[1, 1, 1] = 0.9
    tally.add(probabilities, (2, 2))
    assert tally.voxels.tolist() == [2, 2]
    assert tally.summary(None, with_expert=False)["involvement"] == {
        "involvement_percent": 50.0,
        "severity": involvement.severity_band(50.0),
        "note": "share of the whole lungs infected (not per lobe)",
    }
    # Exclusive labels (1 lung, 2 infection) [[1, 2], [0, 2]]: its lungs are both labels, 3 pixels.
    tally, _ = _tally("exclusive", ("lungs", "infection"))
    tally.add(np.eye(3, dtype=np.float32)[[[1, 2], [0, 2]]], (2, 2))
    assert tally.summary(None, with_expert=False)["involvement"]["involvement_percent"] == pytest.approx(
        200 / 3
    )
    # No lungs predicted: involvement unknown; without both classes: no involvement at all.
    tally, _ = _tally("multilabel", ("lungs", "infection"))
    tally.add(np.zeros((2, 2, 2), np.float32), (2, 2))
    assert tally.summary(None, with_expert=False)["involvement"]["involvement_percent"] is None
    tally, _ = _tally("multilabel", ("lungs", "lesion"))
    tally.add(probabilities, (2, 2))
    assert "involvement" not in tally.summary(None, with_expert=False)
    # An image's label map takes the threshold too: lungs at 0.6 are not drawn at 0.7.
    outputs = {"mask": tmp_path / "mask.png", "overlay": tmp_path / "overlay.png"}
    image = np.full((2, 2), 100, np.uint8)
    predict_classes.write_image_outputs(outputs, image, probabilities, config)
    np.testing.assert_array_equal(np.asarray(Image.open(outputs["mask"])), [[2, 1], [0, 2]])
