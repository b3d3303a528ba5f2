"""Shared test constructors and paths: the tiny config the suite compiles once, and where its caches go."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import nibabel
import numpy as np
import pytest
from PIL import Image

from rdunet_jax import config_lib, config_validation, inference, models
from rdunet_jax.datasets import pseudo_labels
from rdunet_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CACHE = REPO_ROOT / ".pytest_cache" / "xla"
# Prepared phantom datasets of the tests, kept out of the user's ~/tensorflow_datasets; one folder per
# pytest-xdist worker, so that two workers never prepare the same dataset into one folder at once.
TEST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
TEST_DATA_DIR = REPO_ROOT / ".pytest_cache" / "tensorflow_datasets" / TEST_WORKER
# `--set` items of the experiment scripts' tests: a one-level model of 2 feature maps on 8 phantom slices.
TINY_MODEL = [
    "model.features=2",
    "model.depth=1",
    "model.skip_dilation_rates=[[1]]",
    "data.num_train=8",
    f"data.data_dir={TEST_DATA_DIR}",
]
TINY_MODEL_FLAGS = [part for item in TINY_MODEL for part in ("--set", item)]


def config_from_file(file_name: str, *arguments):
    """`get_config(*arguments)` of configs/<file_name>, loaded as the command line loads a config file."""
    return config_lib.config_module(REPO_ROOT / "configs" / file_name).get_config(*arguments)


def init_variables(module, *inputs, seed: int = 0, **kwargs):
    """A block's variables from Flax's default initialisers, drawn in numpy (`models.draw_variables`): on a
    cold compilation cache, compiling `module.init`'s random initialisers took 10-25 s a block on 2 cores."""
    init = functools.partial(module.init, jax.random.PRNGKey(seed), **kwargs)
    return models.draw_variables(jax.eval_shape(init, *inputs), seed)


# The tiny model at one level (one DC module), for the tests whose checks do not depend on the depth: its
# step compiles in about half the time of the tiny config's two levels (5 s against 11 s), and its train
# state has 167 arrays against 301, which Orbax saves in about half the time (0.45 s against 0.84 s a save
# on a 2-core Zen 3), where the loop tests save every step.
ONE_LEVEL = {"depth": 1, "skip_dilation_rates": ((1, 2),)}
ONE_LEVEL_FLAGS = ["--config.model.depth=1", "--config.model.skip_dilation_rates=((1,2),)"]


def make_tiny_config(**data_overrides):
    """`configs/demo.py:tiny` (4 feature maps, 2 levels, 32 px, 8 phantom slices), with the tests' caches:
    in-process tests and the command-line tests compile the same shapes once."""
    config = config_from_file("demo.py", "tiny")
    config.num_epochs = 2
    config.compilation_cache_dir = str(TEST_CACHE)
    config.data.data_dir = str(TEST_DATA_DIR)
    config.data.update(data_overrides)
    return config


def run_tiny_experiment(module: str, arguments: list[str], folder) -> subprocess.CompletedProcess:
    """`python -m experiments.<module> ARGUMENTS` on the TINY_MODEL in a fresh process started in `folder`;
    fails the test, with the end of its stderr, unless it exits 0."""
    command = [sys.executable, "-m", f"experiments.{module}", *arguments, *TINY_MODEL_FLAGS]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=folder, env=checkout_environment()
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def checkout_environment() -> dict:
    """This environment with this checkout first on PYTHONPATH: a child started in any folder imports this
    checkout's `experiments` and `rdunet_jax`."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# --- Consistency regularisation (mean teacher and FixMatch tests) -------------------------------------------


def make_consistency_config(**changes):
    """The tiny config at one level, with half of each batch from 8 unlabelled phantom slices, consistency
    weight 2, no ramp-up, noise or dropout (mean teacher; FixMatch with `consistency.method`)."""
    config = make_tiny_config(num_unlabelled=8, unlabelled_fraction=0.5)
    config.loss = "dice_weighted"
    config.model.dropout_rate = 0.0
    config.model.update(ONE_LEVEL)
    config.consistency.weight = 2.0
    config.consistency.rampup_epochs = 0
    config.consistency.noise_std = 0.0
    config.update(changes)
    return config


def sigmoid64(x):
    """The logistic function in float64: an independent reference for the steps' float32 sigmoid."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def refusal(function, *arguments, **keywords) -> str:
    """The message of the UserError that `function(*arguments, **keywords)` must raise."""
    with pytest.raises(UserError) as raised:
        function(*arguments, **keywords)
    return str(raised.value)


def assert_refused(config, changes: dict, message: str) -> None:
    """Sets each dotted key of `changes` in `config` and checks that validation refuses it with an error
    starting with `message`."""
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(UserError) as raised:
        config_validation.validate(config)
    assert str(raised.value).startswith(message)


def assert_same_training_state(state, reference) -> None:
    """Parameters and optimizer state equal to the bit (a resumed run against an uninterrupted one)."""
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    expected = jax.tree_util.tree_leaves((reference.params, reference.opt_state))
    assert len(leaves) == len(expected)
    for leaf, want in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


class _Crash(Exception):
    pass


def train_to_the_end(config, workdir, crash_after_step=None):
    """The final train state of `config` trained in `workdir`; with `crash_after_step`, the run crashes
    once after that step and the same call is made again (a resume)."""
    from rdunet_jax import steps, train

    real_compile = train.compiled_train_step
    crashes = [crash_after_step]  # once: the resumed run steps past it

    def compiled(*args):
        step_function = real_compile(*args)

        def step(state, batch):
            state, metrics = step_function(state, batch)
            if crashes and int(state.step) == crashes[0]:
                crashes.pop()
                raise _Crash
            return state, metrics

        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "compiled_train_step", compiled)
        if crash_after_step is not None:
            with pytest.raises(_Crash):
                train.train_and_evaluate(config, workdir)
        train.train_and_evaluate(config, workdir)
    return steps.restore_state(config, workdir)


# --- Real data ---------------------------------------------------------------------------------------------

# The public datasets beside the repository (../shared/data), or RDUNET_DATA_ROOT.
DATA_ROOT = pathlib.Path(os.environ.get("RDUNET_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def real_data_root() -> pathlib.Path:
    """DATA_ROOT, or a failed test saying where the data is expected (an absent dataset must not pass)."""
    if not (DATA_ROOT / "covid19-ct-seg-2d").is_dir() or not (DATA_ROOT / "covid-semiseg").is_dir():
        pytest.fail(
            f"real data not found at {DATA_ROOT}: set RDUNET_DATA_ROOT (see ../shared/data/README.md)"
        )
    return DATA_ROOT


# --- Volumes in world coordinates (orientation and DICOM tests) ------------------------------------------

# The canonical volume's affine: voxel axes toward P, L and S; 0.8 x 0.7 mm in plane, 2.5 mm slices.
CANONICAL_AFFINE = np.array(
    [[0.0, -0.7, 0.0, 100.0], [-0.8, 0.0, 0.0, 60.0], [0.0, 0.0, 2.5, -200.0], [0.0, 0.0, 0.0, 1.0]]
)
# A window whose width is 5 * 255: display value v is exactly 5 v - 1000 HU, and back to v / 255.
EXACT_WINDOW = (-1000.0, 275.0)


def real_display_slices(shape=(48, 64), count=3) -> np.ndarray:
    """Neighbouring real slices (ma2020_2d, radiological display 'PL') resized to `shape`, stacked last."""
    folder = real_data_root() / "covid19-ct-seg-2d" / "ct"
    slices = []
    for index in range(700, 700 + count):
        with Image.open(folder / f"{index:04d}.png") as picture:
            slices.append(np.asarray(picture.convert("L").resize(shape[::-1], Image.BILINEAR), np.uint8))
    return np.stack(slices, axis=2)


def in_canonical_voxels(mask: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """`mask` resampled onto the canonical grid through world coordinates (plain affine algebra: every
    stored voxel's world position, then its canonical voxel index)."""
    indices = np.indices(mask.shape).reshape(3, -1)
    world = affine @ np.vstack([indices, np.ones(indices.shape[1])])
    canonical = np.rint(np.linalg.inv(CANONICAL_AFFINE) @ world)[:3].astype(int)
    resampled = np.full(shape, 255, np.uint8)
    resampled[tuple(canonical)] = mask.reshape(-1)
    return resampled


# --- NIfTI volumes (prediction tests) ------------------------------------------------------------------

# Non-identity: rotated, anisotropic (0.7 x 0.9 x 2.5 mm), shifted.
ROTATED_AFFINE = np.array(
    [
        [0.0, -0.9, 0.0, 120.0],
        [0.7, 0.0, 0.0, -80.5],
        [0.0, 0.0, 2.5, -300.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def save_nifti(path, volume, affine=ROTATED_AFFINE):
    """`volume` saved as a NIfTI file at `path` (units mm), with `affine`; returns `path`."""
    image = nibabel.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    nibabel.save(image, path)
    return path


# --- A stand-in model --------------------------------------------------------------------------------------


class ImagePredictor(inference.Predictor):
    """A stand-in model: the probability is the preprocessed image itself (a bright box -> 1)."""

    def __init__(self, step=3):
        self.step = step

    def _probabilities(self, images):
        return images


# Hounsfield units of the phantom's tissues and the class the stand-in model gives them: the lung window
# W1500/L-600 maps -900 HU to 0.3 (background), -600 HU to 0.5 (class 1), 0 HU to 0.9 (class 2).
AIR, CLASS_1, CLASS_2 = -900, -600, 0


class IntensityClassPredictor(inference.Predictor):
    """Exclusive: one-hot probabilities of the class of each pixel's windowed intensity (< 0.4
    background, < 0.8 class 1, else class 2); multilabel: (0.4 <= x, 0.8 <= x), overlapping channels."""

    step = 5

    def __init__(self, head):
        self.head = head

    def _probabilities(self, images):
        x = np.asarray(images)[..., 0]
        first, second = x >= 0.4, x >= 0.8
        if self.head == "exclusive":
            channels = [~first, first & ~second, second]
        else:
            channels = [first, second]
        return np.stack(channels, axis=-1).astype(np.float32)


def class_phantom(shape=(32, 32, 3)):
    """A volume at the model's in-plane size (no resize, so the expected labels are exact)."""
    volume = np.full(shape, AIR, np.int16)
    expected = np.zeros(shape, np.uint8)
    for index in range(shape[2]):
        volume[4 : 20 + index, 3:15, index], expected[4 : 20 + index, 3:15, index] = CLASS_1, 1
        volume[22:26, 10 : 20 + 2 * index, index], expected[22:26, 10 : 20 + 2 * index, index] = CLASS_2, 2
    return volume, expected


# --- Independent references for surface distances ----------------------------------------------------------


def independent_hd95(prediction, target, spacing):
    """HD95 by brute force, in any dimension: the border voxels of a mask are those with a face neighbour
    outside it (beyond the array's edge counts as outside); every border-to-border distance in physical
    units; the 95th percentile of the union of both directions' nearest distances (the code's definition,
    MedPy's hd95; not the larger of two directed percentiles)."""
    from scipy.spatial.distance import cdist

    def border_points(mask):
        mask = np.asarray(mask).astype(bool)
        padded = np.pad(mask, 1)
        interior = tuple(slice(1, -1) for _ in range(mask.ndim))
        all_neighbours_inside = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                all_neighbours_inside &= np.roll(padded, step, axis=axis)[interior]
        return np.argwhere(mask & ~all_neighbours_inside) * np.asarray(spacing, np.float64)

    distances = cdist(border_points(prediction), border_points(target))
    return np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95)


def ellipsoid(shape, centre, radii_mm, spacing):
    """A boolean ellipsoid of `radii_mm` about the voxel `centre`, in a volume of voxel `spacing`."""
    grid = np.indices(shape, dtype=np.float64)
    return sum(((grid[axis] - centre[axis]) * spacing[axis] / radii_mm[axis]) ** 2 for axis in range(3)) <= 1


# --- tiny datasets in their public layouts ----------------------------------------------------------

MULTICLASS = pathlib.Path("Dataset/TrainingSet/MultiClassInfection-Train")
DOCTOR_LABEL = pathlib.Path("Dataset/TrainingSet/LungInfection-Train/Doctor-label")


def lesion_slice(seed: int, height: int = 24, width: int = 20):
    """A noisy image with a square lesion: (image uint8, class mask {0,1,2})."""
    rng = np.random.default_rng(seed)
    image = rng.integers(30, 200, (height, width), dtype=np.uint8)
    class_mask = np.zeros((height, width), np.uint8)
    class_mask[4:10, 5:11] = 1
    class_mask[12:15, 5:8] = 2
    return image, class_mask


def save_png(path, array, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:
        image = image.convert("P")  # palette indices keep the raw label values
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(path)


def write_pseudo_label_folder(folder, slices, intensity_matching=None):
    """A pseudo-label folder as rdunet_jax.selftrain writes one: for each (id, index in the unlabelled
    split, mask {0, 255}, weight bytes) its two PNGs, then the summary (with the pool's matching if given)."""
    folder = pathlib.Path(folder)
    for subfolder in (pseudo_labels.MASKS, pseudo_labels.WEIGHTS):
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
    for example_id, _, mask, weight in slices:
        Image.fromarray(mask).save(folder / pseudo_labels.MASKS / f"{example_id}.png")
        Image.fromarray(weight).save(folder / pseudo_labels.WEIGHTS / f"{example_id}.png")
    summary = {"slices": [{"id": example_id, "index": index} for example_id, index, _, _ in slices]}
    if intensity_matching is not None:
        summary["unlabelled_intensity_matching"] = intensity_matching
    (folder / pseudo_labels.SUMMARY).write_text(json.dumps(summary))
    return folder


def data_config(tmp_path, name, manual_dir="", **overrides):
    """`config.data` for `name`, built into a data_dir under `tmp_path`."""
    data = config_lib.base_config().data
    data.name, data.manual_dir, data.data_dir = name, str(manual_dir), str(tmp_path / "tfds")
    data.update(overrides)
    return data


def make_semiseg(root, ids=range(6), validation=(4, 5)):
    """A COVID-SemiSeg layout with `ids`; val.txt holds `validation`, train.txt the rest."""
    for example_id in ids:
        image, class_mask = lesion_slice(example_id)
        (root / DOCTOR_LABEL / "Imgs").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / DOCTOR_LABEL / "Imgs" / f"{example_id}.jpg", quality=95)
        save_png(root / DOCTOR_LABEL / "GT" / f"{example_id}.png", (class_mask > 0).astype(np.uint8) * 255)
        save_png(root / MULTICLASS / "GT" / f"{example_id}.png", class_mask, palette=True)
    train = [i for i in ids if i not in validation]
    (root / MULTICLASS / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / MULTICLASS / "val.txt").write_text("".join(f"{i}\n" for i in validation))
    return root


def make_ma2020(root, count=10):
    """Ma et al.'s 2-D layout: ct/, covid/, lungs/ with `count` slices."""
    for index in range(count):
        image, class_mask = lesion_slice(index, 16, 16)
        lungs = np.zeros_like(class_mask)
        lungs[2:15, 2:14] = 255
        save_png(root / "ct" / f"{index:04d}.png", image)
        save_png(root / "covid" / f"{index:04d}.png", (class_mask > 0).astype(np.uint8) * 255)
        save_png(root / "lungs" / f"{index:04d}.png", lungs)
    return root


def recipe_records(folder, monkeypatch, slice_dice_by_fold: dict) -> None:
    """The recipe study's records of the given folds ({fold: {slice id: Dice}}, the fields the tables read)
    in `folder`, where experiments.cv_table looks for them."""
    from experiments import cv_table  # only the tables' tests need experiments/

    folder.mkdir(parents=True, exist_ok=True)
    for fold, slice_dice in slice_dice_by_fold.items():
        record = {
            "slices": {"id": list(slice_dice), "dice": list(slice_dice.values())},
            # How the study scored its records (the committed ones: 128 px, flips, last checkpoint).
            "config": {
                "data": {"image_size": 128},
                "eval": {"test_time_flips": True, "checkpoint": "last", "threshold": 0.5},
            },
        }
        (folder / f"{cv_table.RECIPE_ARM}-fold{fold}-seed0.json").write_text(json.dumps(record))
    monkeypatch.setattr(cv_table, "RECIPE_RECORDS", folder)


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)...]} as TensorBoard shows a folder's event files: read in file-name order
    (TFRecord framing, tensorboardX's Event protos), a SessionLog START at step s hiding the points of
    steps >= s written before it (TensorBoard's rule for event files of version 2, which tensorboardX
    writes; checked once against tensorboard 2.21's EventAccumulator)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = np.frombuffer(data[offset : offset + 8], "<u8")
            event = Event.FromString(data[offset + 12 : offset + 12 + int(length)])
            offset += 12 + int(length) + 4  # length, its CRC, the record, its CRC
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for tag, points in shown.items():
                    shown[tag] = [(step, value) for step, value in points if step < event.step]
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":  # not the overlays' images
                    shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown


def assert_running_stats_as_the_reference(batch_stats, reader) -> None:
    """Every BatchNorm's stored running averages (a Flax `batch_stats` tree) are the ones the numpy
    reference's training-mode `reader` (reference_model.Variables) recorded, and no other is stored."""
    stored = {
        tuple(key.key for key in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    }
    expected = {
        (*path, name): value
        for path, statistics in reader.updated_stats.items()
        for name, value in statistics.items()
    }
    assert sorted(stored) == sorted(expected)  # every BatchNorm updated its running averages
    for path, value in expected.items():
        np.testing.assert_allclose(stored[path], value, rtol=1e-4, atol=1e-5, err_msg="/".join(path))
