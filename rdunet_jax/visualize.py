"""Pictures of results: slice overlays in the style of the paper's Figure 5, and training curves.

An overlay draws the predicted lesion outline in red and the expert's outline (when known) in white on
the grey CT slice; a multi-class overlay draws each class's predicted outline in its own colour
(CLASS_COLOURS), the experts' in white, with a legend below the slice. `curves.png` plots the training
and validation loss and the validation Dice of `train_log.jsonl` against the epoch.
"""

import io
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from rdunet_jax.files import write_bytes_atomic

PREDICTION_COLOUR = (255, 0, 0)
TARGET_COLOUR = (255, 255, 255)
# Class k's colour (cycled past the last): red, green, blue, yellow, magenta, cyan, as label-map palettes.
CLASS_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 96, 255), (255, 220, 0), (255, 0, 255), (0, 220, 220))
LEGEND_ROW_PIXELS = 12


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of the class at `index` (0 the first foreground class)."""
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


def to_uint8_grey(image) -> np.ndarray:
    """A 2-D slice as uint8 grey levels: uint8 is kept, floats are taken as [0, 1] and clipped."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def contour(mask, thickness: int) -> np.ndarray:
    """The inner outline of a binary mask, `thickness` pixels wide."""
    mask = np.asarray(mask).astype(bool)
    eroded = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~eroded


def overlay_image(image, prediction=None, target=None) -> np.ndarray:
    """An RGB uint8 (H, W, 3) picture of a slice with the prediction's outline in red and the target's in
    white (drawn first, so red shows where both outlines coincide)."""
    grey = to_uint8_grey(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    # Outlines one pixel wide per 256 pixels of slice, so they stay visible on 512 px slices.
    thickness = max(1, min(grey.shape) // 256)
    if target is not None:
        rgb[contour(target, thickness)] = TARGET_COLOUR
    if prediction is not None:
        rgb[contour(prediction, thickness)] = PREDICTION_COLOUR
    return rgb


def class_overlay_image(image, predictions, targets, class_names) -> np.ndarray:
    """An RGB uint8 picture of a slice with each class's predicted outline (masks (H, W, K)) in its colour
    over the experts' outlines in white, and below it a legend row per class (swatch and name)."""
    grey = to_uint8_grey(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    thickness = max(1, min(grey.shape) // 256)
    if targets is not None:
        for index in range(len(class_names)):
            rgb[contour(targets[..., index], thickness)] = TARGET_COLOUR
    for index in range(len(class_names)):
        rgb[contour(predictions[..., index], thickness)] = class_colour(index)
    return np.concatenate([_pad_width(rgb, 120), legend(class_names, max(rgb.shape[1], 120))], axis=0)


def _pad_width(rgb: np.ndarray, width: int) -> np.ndarray:
    """`rgb` padded with black columns on the right to at least `width` pixels."""
    return np.pad(rgb, ((0, 0), (0, max(0, width - rgb.shape[1])), (0, 0)))


def legend(class_names, width: int) -> np.ndarray:
    """An RGB strip (rows of LEGEND_ROW_PIXELS, black) naming each class beside a swatch of its colour,
    then 'expert' beside a white swatch."""
    entries = [
        *((name, class_colour(index)) for index, name in enumerate(class_names)),
        ("expert", TARGET_COLOUR),
    ]
    picture = Image.new("RGB", (width, LEGEND_ROW_PIXELS * len(entries)))
    draw = ImageDraw.Draw(picture)
    for row, (name, colour) in enumerate(entries):
        top = row * LEGEND_ROW_PIXELS
        draw.rectangle([2, top + 2, 10, top + LEGEND_ROW_PIXELS - 3], fill=colour)
        draw.text((14, top), name, fill=(255, 255, 255))
    return np.asarray(picture)


def png_bytes(array) -> bytes:
    """PNG encoding of a uint8 grey (H, W) or RGB (H, W, 3) array (deterministic: no metadata)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_label_png(path, label_map) -> None:
    """Writes a uint8 label map (0 background, k class k) as a palette PNG: the values as stored, shown
    in the overlay colours (black background)."""
    picture = Image.fromarray(np.asarray(label_map, np.uint8), mode="P")
    palette = [0, 0, 0]
    for index in range(255):
        palette.extend(class_colour(index))
    picture.putpalette(palette)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_png(path, array) -> None:
    """Writes a uint8 grey or RGB array as a PNG file, atomically."""
    write_bytes_atomic(path, png_bytes(array))


def read_train_log(workdir) -> list[dict]:
    """The epoch records of `<workdir>/train_log.jsonl` (empty when there is none)."""
    path = pathlib.Path(workdir) / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# `config.loss` names, as the curves' axis says them (a `_weighted` form: the same, pixel-weighted).
_LOSS_LABELS = {
    "dice": "soft Dice loss",
    "dice_bce": "soft Dice + cross-entropy loss",
    "dice_ce": "soft Dice + cross-entropy loss",
}


def loss_label(loss: str) -> str:
    """The axis label of the loss `config.loss` names."""
    weighted, base = loss.endswith("_weighted"), loss.removesuffix("_weighted")
    label = _LOSS_LABELS.get(base, f"{base} loss")
    return f"pixel-weighted {label}" if weighted else label


def curves_figure(records: list[dict], loss: str, consistency: bool):
    """A matplotlib figure: loss and validation loss (left; `loss` names it, and `consistency` says the
    training loss adds mean teacher's or FixMatch's term) and validation Dice (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    epochs = [record["epoch"] for record in records]
    # Epochs between validations (eval.validate_every_epochs) have no val_* keys.
    validated = [record for record in records if "val_loss" in record]
    validated_epochs = [record["epoch"] for record in validated]
    figure, (loss_axes, dice_axes) = pyplot.subplots(1, 2, figsize=(10, 4), dpi=100)
    training = "training loss + consistency term" if consistency else "training loss"
    loss_axes.plot(epochs, [record["loss"] for record in records], marker="o", label=training)
    loss_axes.plot(
        validated_epochs, [record["val_loss"] for record in validated], marker="o", label="validation loss"
    )
    loss_axes.set(xlabel="epoch", ylabel=loss_label(loss), title="Loss")
    loss_axes.legend()
    dice_axes.plot(
        validated_epochs, [record["val_dice"] for record in validated], marker="o", color="tab:green"
    )
    dice_axes.set(xlabel="epoch", ylabel="Dice", title="Validation Dice (mean over slices)", ylim=(0.0, 1.0))
    for axes in (loss_axes, dice_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_curves(workdir, loss: str, consistency: bool) -> pathlib.Path | None:
    """Writes `<workdir>/curves.png` from train_log.jsonl (`curves_figure`); returns its path (None without
    a log)."""
    from matplotlib import pyplot

    records = read_train_log(workdir)
    if not records:
        return None
    figure = curves_figure(records, loss, consistency)
    buffer = io.BytesIO()
    # No metadata: the same log always gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    pyplot.close(figure)
    path = pathlib.Path(workdir) / "curves.png"
    write_bytes_atomic(path, buffer.getvalue())
    return path


def add_overlays_to_tensorboard(writer, overlays, step: int, tag: str = "validation/overlay") -> None:
    """Adds (id, RGB array) overlays to a tensorboardX `SummaryWriter` as images `<tag>/<i>` at `step`."""
    for index, (_, rgb) in enumerate(overlays):
        writer.add_image(f"{tag}/{index}", np.asarray(rgb, np.uint8), step, dataformats="HWC")
