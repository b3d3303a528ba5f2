"""Overlays (Figure 5 style), training curves and TensorBoard images."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from rdunet_jax import visualize


def test_overlay_draws_red_prediction_and_white_target_outlines():
    image = np.full((16, 16), 0.5, np.float32)
    target = np.zeros((16, 16), bool)
    target[2:8, 2:8] = True
    prediction = np.zeros((16, 16), bool)
    prediction[9:14, 9:14] = True
    rgb = visualize.overlay_image(image, prediction, target)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[2, 5]) == (255, 255, 255)  # target's border
    assert tuple(rgb[9, 11]) == (255, 0, 0)  # prediction's border
    assert tuple(rgb[5, 5]) == (128, 128, 128)  # inside the target: the slice itself
    assert tuple(rgb[11, 11]) == (128, 128, 128)
    assert tuple(rgb[0, 0]) == (128, 128, 128)
    # Red wins where both outlines coincide.
    both = visualize.overlay_image(image, target, target)
    assert tuple(both[2, 5]) == (255, 0, 0)


def test_overlay_of_a_uint8_slice_without_masks_is_grey():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = visualize.overlay_image(image)
    np.testing.assert_array_equal(rgb, np.repeat(image[..., None], 3, axis=-1))


def _write_log(workdir, epochs=3):
    lines = [
        json.dumps(
            {"epoch": e, "step": 2 * e, "loss": 1 - 0.1 * e, "val_loss": 1 - 0.08 * e, "val_dice": 0.2 * e}
        )
        for e in range(1, epochs + 1)
    ]
    (workdir / "train_log.jsonl").write_text("\n".join(lines) + "\n")


def test_curves_png_is_written_and_reproducible(tmp_path):
    assert visualize.write_curves(tmp_path) is None  # no log yet
    _write_log(tmp_path)
    path = visualize.write_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    first = path.read_bytes()
    with Image.open(io.BytesIO(first)) as picture:
        assert picture.format == "PNG" and picture.size == (1000, 400)
    visualize.write_curves(tmp_path)
    assert path.read_bytes() == first


@pytest.mark.parametrize(
    "loss, label",
    [
        ("dice", "soft Dice loss"),
        ("dice_bce", "soft Dice + cross-entropy loss"),
        ("dice_bce_weighted", "pixel-weighted soft Dice + cross-entropy loss"),
        ("dice_ce", "soft Dice + cross-entropy loss"),
    ],
)
def test_the_curves_loss_axis_names_the_loss_the_run_trained_with(loss, label):
    # It said "soft Dice loss" whatever config.loss was.
    records = [{"epoch": 1, "loss": 0.5, "val_loss": 0.6, "val_dice": 0.4}]
    figure = visualize.curves_figure(records, loss)
    labels = [axes.get_ylabel() for axes in figure.axes]
    figure.clear()
    assert labels == [label, "Dice"]
    # Mean teacher's and FixMatch's training loss adds the consistency term; their validation loss does not.
    figure = visualize.curves_figure(records, loss, consistency=True)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    figure.clear()
    assert legend == ["training loss + consistency term", "validation loss"]


def test_overlays_go_to_tensorboard_as_hwc_images():
    calls = []

    class Writer:
        def add_image(self, tag, image, step, dataformats):
            calls.append((tag, image.shape, step, dataformats))

    overlays = [("a", np.zeros((8, 8, 3), np.uint8)), ("b", np.zeros((8, 8, 3), np.uint8))]
    visualize.add_overlays_to_tensorboard(Writer(), overlays, step=5)
    assert calls == [
        ("validation/overlay/0", (8, 8, 3), 5, "HWC"),
        ("validation/overlay/1", (8, 8, 3), 5, "HWC"),
    ]


def test_grey_levels_clip_floats_outside_zero_to_one_and_outlines_widen_on_512_pixel_slices():
    grey = visualize.to_uint8_grey(np.array([[-0.5, 0.0, 0.5, 1.0, 1.2]], np.float32))
    np.testing.assert_array_equal(grey, [[0, 0, 128, 255, 255]])  # 1.2 is white, not a wrapped grey
    target = np.zeros((512, 512), bool)
    target[100:200, 100:200] = True
    rgb = visualize.overlay_image(np.zeros((512, 512), np.float32), target=target)
    outlined = np.all(rgb == visualize.TARGET_COLOUR, axis=-1)
    # Two pixels wide at 512 px (one per 256): rows 100 and 101 of the square, not 102.
    assert outlined[100, 150] and outlined[101, 150] and not outlined[102, 150]
    assert outlined.sum() == 100 * 100 - 96 * 96


def test_curves_of_a_run_validated_every_other_epoch_plot_the_validated_epochs_only():
    records = [
        {"epoch": 1, "loss": 0.9},
        {"epoch": 2, "loss": 0.8, "val_loss": 0.85, "val_dice": 0.3},
        {"epoch": 3, "loss": 0.7},
        {"epoch": 4, "loss": 0.6, "val_loss": 0.65, "val_dice": 0.5},
    ]
    figure = visualize.curves_figure(records)
    training, validation = figure.axes[0].get_lines()
    (dice,) = figure.axes[1].get_lines()
    plotted = [list(line.get_xydata().ravel()) for line in (training, validation, dice)]
    figure.clear()
    assert plotted == [[1, 0.9, 2, 0.8, 3, 0.7, 4, 0.6], [2, 0.85, 4, 0.65], [2, 0.3, 4, 0.5]]
