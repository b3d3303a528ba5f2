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
    assert visualize.write_curves(tmp_path, "dice", consistency=False) is None  # no log yet
    _write_log(tmp_path)
    path = visualize.write_curves(tmp_path, "dice", consistency=False)
    assert path == tmp_path / "curves.png"
    first = path.read_bytes()
    with Image.open(io.BytesIO(first)) as picture:
        assert picture.format == "PNG" and picture.size == (1000, 400)
    visualize.write_curves(tmp_path, "dice", consistency=False)
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
    figure = visualize.curves_figure(records, loss, consistency=False)
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
            calls.append((tag, image.shape, image.dtype, step, dataformats))

    # Any integer array becomes the uint8 image TensorBoard shows as 0-255.
    overlays = [("a", np.zeros((8, 8, 3), np.uint8)), ("b", np.full((8, 8, 3), 200, np.int64))]
    visualize.add_overlays_to_tensorboard(Writer(), overlays, step=5)
    assert calls == [
        ("validation/overlay/0", (8, 8, 3), np.uint8, 5, "HWC"),
        ("validation/overlay/1", (8, 8, 3), np.uint8, 5, "HWC"),
    ]


def test_grey_levels_clip_floats_outside_zero_to_one_and_outlines_widen_on_512_pixel_slices():
    grey = visualize.to_uint8_grey(np.array([[-0.5, 0.0, 0.5, 1.0, 1.2]], np.float32))
    np.testing.assert_array_equal(grey, [[0, 0, 128, 255, 255]])  # 1.2 is white, not a wrapped grey
    target = np.zeros((512, 512), bool)
    target[100:200, 100:200] = True
    prediction = np.zeros((512, 512), bool)
    prediction[300:400, 300:400] = True
    rgb = visualize.overlay_image(np.zeros((512, 512), np.float32), prediction, target)
    # Two pixels wide at 512 px (one per 256): rows 100 and 101 of the square, not 102; the same in red.
    for colour, top in ((visualize.TARGET_COLOUR, 100), (visualize.PREDICTION_COLOUR, 300)):
        outlined = np.all(rgb == colour, axis=-1)
        assert outlined[top, top + 50] and outlined[top + 1, top + 50] and not outlined[top + 2, top + 50]
        assert outlined.sum() == 100 * 100 - 96 * 96


def test_curves_of_a_run_validated_every_other_epoch_plot_the_validated_epochs_only():
    records = [
        {"epoch": 1, "loss": 0.9},
        {"epoch": 2, "loss": 0.8, "val_loss": 0.85, "val_dice": 0.3},
        {"epoch": 3, "loss": 0.7},
        {"epoch": 4, "loss": 0.6, "val_loss": 0.65, "val_dice": 0.5},
    ]
    figure = visualize.curves_figure(records, "dice", consistency=False)
    training, validation = figure.axes[0].get_lines()
    (dice,) = figure.axes[1].get_lines()
    plotted = [list(line.get_xydata().ravel()) for line in (training, validation, dice)]
    figure.clear()
    assert plotted == [[1, 0.9, 2, 0.8, 3, 0.7, 4, 0.6], [2, 0.85, 4, 0.65], [2, 0.3, 4, 0.5]]


def _ink_box(picture: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), right and bottom exclusive, of the non-black pixels of `picture`."""
    rows, columns = np.nonzero(picture.max(axis=-1) > 0)
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1


def test_a_legend_row_is_a_swatch_of_the_class_colour_then_its_name_in_grey_levels():
    from PIL import ImageDraw

    strip = visualize.legend(["ggo", "consolidation"], 130)
    assert strip.shape == (3 * 12, 130, 3) and strip.dtype == np.uint8
    measure = ImageDraw.Draw(Image.new("RGB", (130, 36)))
    colours = [(255, 0, 0), (0, 200, 0), (255, 255, 255)]  # red, green, then the expert's white
    for row, (name, colour) in enumerate(zip(["ggo", "consolidation", "expert"], colours, strict=True)):
        top = 12 * row
        band = strip[top : top + 12]
        # The swatch: columns 2-10, rows 2-9 of the band, in the colour, black around it.
        swatch = np.zeros((12, 12, 3), np.uint8)
        swatch[2:10, 2:11] = colour
        np.testing.assert_array_equal(band[:, :12], swatch, err_msg=name)
        # The name: where Pillow's own measure of the text at (14, top) says, in white's grey levels.
        text = strip[:, 12:].copy()
        text[:top], text[top + 12 :] = 0, 0
        left, upper, right, lower = _ink_box(text)
        box = measure.textbbox((14, top), name)
        # Anti-aliased: the measured box's last column or row may hold no ink.
        assert (left + 12, upper) == box[:2] and 0 <= box[2] - (right + 12) <= 1 and 0 <= box[3] - lower <= 1
        inked = text[text.max(axis=-1) > 0]
        assert np.all(inked == inked[:, :1]), name  # grey: R = G = B
    assert not np.array_equal(visualize.legend(["expert"], 130)[:12, 12:], strip[:12, 12:])


def test_a_class_overlay_outlines_each_class_in_its_colour_over_the_experts_and_pads_to_the_legend():
    image = np.full((16, 16), 0.5, np.float32)
    predictions = np.zeros((16, 16, 2), bool)
    predictions[2:8, 2:8, 0] = True  # class 0 (red) and class 1 (green) side by side
    predictions[2:8, 9:14, 1] = True
    targets = np.zeros((16, 16, 2), bool)
    targets[2:8, 2:8, 1] = True  # the expert calls class 0's square class 1: white under red
    targets[10:14, 2:6, 0] = True
    rgb = visualize.class_overlay_image(image, predictions, targets, ("ggo", "consolidation"))
    # The slice padded with black to the legend's 120 columns, then 3 legend rows of 12.
    assert rgb.shape == (16 + 36, 120, 3)
    assert tuple(rgb[2, 5]) == (255, 0, 0) and tuple(rgb[2, 11]) == (0, 200, 0)
    assert tuple(rgb[10, 3]) == (255, 255, 255) and tuple(rgb[5, 5]) == (128, 128, 128)
    assert not rgb[:16, 16:].any()
    np.testing.assert_array_equal(rgb[16:], visualize.legend(("ggo", "consolidation"), 120))
    # A slice wider than 120 pixels: not padded, the legend as wide; 512 px outlines are 2 pixels wide.
    wide = np.zeros((512, 512, 1), bool)
    wide[100:200, 100:200, 0] = True
    rgb = visualize.class_overlay_image(np.zeros((512, 512), np.float32), wide, wide[::-1, ::-1], ("lesion",))
    assert rgb.shape == (512 + 24, 512, 3)
    red = np.all(rgb[:512] == (255, 0, 0), axis=-1)
    assert red[100, 150] and red[101, 150] and not red[102, 150] and red.sum() == 100 * 100 - 96 * 96
    white = np.all(rgb[:512] == (255, 255, 255), axis=-1)  # the expert's square, mirrored: 312-411
    assert white[410, 350] and white[411, 350] and not white[409, 350] and white.sum() == 100 * 100 - 96 * 96


def test_a_label_png_keeps_the_stored_values_and_shows_them_in_the_class_colours(tmp_path):
    labels = np.array([[0, 1, 2], [3, 6, 7]], np.int64)  # any integer type; 7 cycles to the second colour
    visualize.write_label_png(tmp_path / "labels.png", labels)
    with Image.open(tmp_path / "labels.png") as picture:
        assert picture.mode == "P"
        np.testing.assert_array_equal(np.asarray(picture), labels)
        palette = picture.getpalette()
    colours = [tuple(palette[3 * value : 3 * value + 3]) for value in range(8)]
    assert colours == [
        (0, 0, 0),
        (255, 0, 0),
        (0, 200, 0),
        (0, 96, 255),
        (255, 220, 0),
        (255, 0, 255),
        (0, 220, 220),
        (255, 0, 0),
    ]


def test_the_curves_show_each_series_against_its_epochs_with_the_axes_a_reader_needs(tmp_path):
    import matplotlib.colors

    records = [
        {"epoch": 1, "loss": 0.9, "val_loss": 0.95, "val_dice": 0.2},
        {"epoch": 2, "loss": 0.7},
        {"epoch": 3, "loss": 0.5, "val_loss": 0.6, "val_dice": 0.55},
    ]
    figure = visualize.curves_figure(records, "dice_bce", consistency=False)
    loss_axes, dice_axes = figure.axes
    assert loss_axes.get_position().x1 < dice_axes.get_position().x0  # side by side, loss on the left
    seen = {
        "loss": (loss_axes.get_title(), loss_axes.get_xlabel(), loss_axes.get_ylabel()),
        "dice": (dice_axes.get_title(), dice_axes.get_xlabel(), dice_axes.get_ylabel(), dice_axes.get_ylim()),
        "legend": [text.get_text() for text in loss_axes.get_legend().get_texts()],
        "lines": [
            (line.get_label(), line.get_marker(), line.get_xydata().tolist())
            for axes in (loss_axes, dice_axes)
            for line in axes.get_lines()
        ],
        "dice colour": matplotlib.colors.to_hex(dice_axes.get_lines()[0].get_color()),
        "grid": [
            (axes.xaxis.get_gridlines()[0].get_visible(), axes.xaxis.get_gridlines()[0].get_alpha())
            for axes in (loss_axes, dice_axes)
        ],
    }
    figure.clear()
    assert seen["loss"] == ("Loss", "epoch", "soft Dice + cross-entropy loss")
    assert seen["dice"] == ("Validation Dice (mean over slices)", "epoch", "Dice", (0.0, 1.0))
    assert seen["legend"] == ["training loss", "validation loss"]
    assert seen["lines"][0] == ("training loss", "o", [[1, 0.9], [2, 0.7], [3, 0.5]])
    assert seen["lines"][1] == ("validation loss", "o", [[1, 0.95], [3, 0.6]])
    assert seen["lines"][2][1:] == ("o", [[1, 0.2], [3, 0.55]])
    assert seen["dice colour"] == matplotlib.colors.to_hex("tab:green")
    assert seen["grid"] == [(True, 0.3), (True, 0.3)]
    # The file says so too: the consistency term changes the picture; no software version in it.
    _write_log(tmp_path)
    plain = visualize.write_curves(tmp_path, "dice", consistency=False).read_bytes()
    with_term = visualize.write_curves(tmp_path, "dice", consistency=True).read_bytes()
    assert plain != with_term
    with Image.open(io.BytesIO(plain)) as picture:
        assert "Software" not in picture.info


@pytest.mark.parametrize(
    "loss, label", [("focal", "focal loss"), ("focal_weighted", "pixel-weighted focal loss")]
)
def test_a_loss_without_a_label_of_its_own_is_named_as_configured(loss, label):
    assert visualize.loss_label(loss) == label


def test_the_curves_file_is_a_1000_by_400_png_whatever_the_users_matplotlib_settings(tmp_path, monkeypatch):
    import matplotlib

    # A matplotlibrc may change the default resolution and file format: curves.png is still the same PNG.
    _write_log(tmp_path)
    expected = visualize.write_curves(tmp_path, "dice", consistency=False).read_bytes()
    monkeypatch.setitem(matplotlib.rcParams, "figure.dpi", 50)
    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "svg")
    assert visualize.write_curves(tmp_path, "dice", consistency=False).read_bytes() == expected


def test_a_png_of_any_integer_array_is_8_bit(tmp_path):
    visualize.write_png(tmp_path / "grey.png", np.array([[0, 128, 255]], np.int64))
    with Image.open(tmp_path / "grey.png") as picture:
        assert picture.mode == "L" and np.asarray(picture).tolist() == [[0, 128, 255]]
