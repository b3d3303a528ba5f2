"""In-plane orientation: the PNG releases' orientation read from the anatomy of real slices, the config
key, and NIfTI prediction that gives one mask in world coordinates whatever the volume's voxel order."""

import ml_collections
import nibabel
import numpy as np
import pytest
from helpers import (
    CANONICAL_AFFINE,
    EXACT_WINDOW,
    in_canonical_voxels,
    make_tiny_config,
    real_data_root,
    real_display_slices,
)
from nibabel import orientations as nib_orientations
from PIL import Image

from rdunet_jax import (
    checkpoints,
    config_validation,
    inference,
    input_pipeline,
    orientation,
    predict,
    steps,
    train,
)
from rdunet_jax.errors import UserError


def _grayscale(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), np.float32)


def _bone_below_centre(display: np.ndarray, rows: slice, columns: slice) -> bool:
    """Whether the brightest 2% of a slice (bone, the table) in the central column band lie mostly in the
    lower half of `rows`: in radiological display the vertebral body and the table are posterior, below."""
    band = display[rows, columns]
    bright_rows = np.nonzero(band >= np.percentile(display[rows], 98))[0]
    return bool(np.mean(bright_rows > band.shape[0] / 2) > 0.5)


# --- The PNG releases, from their anatomy --------------------------------------------------------------


@pytest.mark.real_data
def test_ma2020_slices_turned_to_display_have_the_spine_below_and_the_larger_right_lung_on_the_left():
    ct_folder = real_data_root() / "covid19-ct-seg-2d"
    source = orientation.DATASET_ORIENTATIONS["ma2020_2d"]
    spine_below, right_lung_on_left = [], []
    # The coronacases volumes (the first ~1250 slices); many later Radiopaedia slices are flipped.
    for index in range(0, 1250, 20):
        display = orientation.to_display(_grayscale(ct_folder / "ct" / f"{index:04d}.png"), source)
        lungs = orientation.to_display(_grayscale(ct_folder / "lungs" / f"{index:04d}.png") > 127, source)
        lung_rows, lung_columns = np.nonzero(lungs)
        top, bottom = lung_rows.min(), lung_rows.max() + 1
        left, right = lung_columns.min(), lung_columns.max() + 1
        width = right - left
        centre_band = slice(left + int(0.45 * width), left + int(0.55 * width))
        spine_below.append(_bone_below_centre(display, slice(top, bottom), centre_band))
        # The right lung (three lobes, no heart beside it) is the larger: on the image left in display.
        right_lung_on_left.append(np.mean(lung_columns < (left + right) / 2) > 0.5)
    assert np.mean(spine_below) > 0.9  # 95% measured
    assert np.mean(right_lung_on_left) > 0.8  # 87% measured


@pytest.mark.real_data
def test_semiseg_slices_turned_to_display_have_the_spine_below():
    folder = real_data_root() / "covid-semiseg" / "Dataset" / "TrainingSet" / "LungInfection-Train"
    source = orientation.DATASET_ORIENTATIONS["semiseg"]
    spine_below = []
    for path in sorted((folder / "Doctor-label" / "Imgs").glob("*.jpg")):
        display = orientation.to_display(_grayscale(path), source)
        width = display.shape[1]
        spine_below.append(
            _bone_below_centre(display, slice(None), slice(int(0.4 * width), int(0.6 * width)))
        )
    assert len(spine_below) == 50 and np.mean(spine_below) > 0.9  # 96% measured


# --- The config key ---------------------------------------------------------------------------------------


def test_the_orientation_key_defaults_to_the_datasets_and_is_validated():
    config = make_tiny_config()
    assert config.data.orientation == "auto"
    assert orientation.model_orientation(config.data) == "PL"  # the phantom: spine at the bottom
    config.data.name = "semiseg"
    assert orientation.model_orientation(config.data) == "LP"
    config.data.name = "nifti"
    assert orientation.model_orientation(config.data) == "PL"  # turned from the affine to display
    config.data.orientation = "RA"
    assert orientation.model_orientation(config.data) == "RA"
    config_validation.validate(config)
    config.data.orientation = "PP"
    with pytest.raises(UserError, match=r"^data.orientation: must be one of \['auto', 'voxel', 'PL'"):
        config_validation.validate(config)
    # A config written before the key existed reads as 'auto'.
    old = ml_collections.ConfigDict({"name": "semiseg", "image_size": 32})
    assert orientation.model_orientation(old) == "LP"


def test_a_checkpoint_carries_its_orientation_and_refuses_another(tiny_state, tmp_path):
    trained = make_tiny_config()  # the phantom: auto is PL
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    run_checkpoints.save("best", 1, tiny_state, train.new_meta(trained))
    run_checkpoints.close()
    steps.restore_state(trained, tmp_path)
    turned = make_tiny_config()
    turned.data.orientation = "LP"
    with pytest.raises(
        UserError, match=r"orientation 'PL', .*data.orientation='LP'; set --config.data.orientation=PL$"
    ):
        steps.restore_state(turned, tmp_path)


def test_a_ras_volume_is_turned_to_radiological_display_per_slice():
    stored = np.arange(5 * 4 * 3).reshape(5, 4, 3)  # axis 0 toward R, 1 toward A, 2 toward S
    layout = orientation.volume_layout(np.eye(4), "PL")
    assert layout.per_slice
    for index in range(3):
        # By hand: display rows run toward P (stored y reversed), columns toward L (stored x reversed).
        expected = stored[::-1, ::-1, index].T
        np.testing.assert_array_equal(layout.slice_to_model(stored[:, :, index]), expected)
        np.testing.assert_array_equal(layout.slice_from_model(expected), stored[:, :, index])


# Each in-plane orientation turned to radiological display (rows toward P, columns toward L), by hand: a
# leading R or A reverses that axis, and a leading L or R (rows along the patient's left-right) transposes.
TO_DISPLAY_BY_HAND = {
    "PL": lambda a: a,
    "PR": lambda a: a[:, ::-1],
    "AL": lambda a: a[::-1, :],
    "AR": lambda a: a[::-1, ::-1],
    "LP": lambda a: a.T,
    "LA": lambda a: a.T[::-1, :],
    "RP": lambda a: a.T[:, ::-1],
    "RA": lambda a: a.T[::-1, ::-1],
}


def test_every_in_plane_orientation_turns_to_display_as_by_hand():
    assert set(TO_DISPLAY_BY_HAND) == set(orientation.IN_PLANE_ORIENTATIONS)
    model_slice = np.arange(6).reshape(2, 3)
    for code, by_hand in TO_DISPLAY_BY_HAND.items():
        np.testing.assert_array_equal(orientation.to_display(model_slice, code), by_hand(model_slice), code)
    # Voxel order has no known patient directions: a quarter turn counter-clockwise, as overlays always were.
    np.testing.assert_array_equal(
        orientation.to_display(model_slice, orientation.VOXEL_ORDER), [[2, 5], [1, 4], [0, 3]]
    )


def test_a_dataset_of_unknown_orientation_is_read_in_its_voxel_order():
    data = ml_collections.ConfigDict({"name": "my_scans", "orientation": "auto"})
    assert orientation.model_orientation(data) == orientation.VOXEL_ORDER


IDENTITY_LAYOUT = [[0, 1], [1, 1], [2, 1]]  # each stored axis to the same model axis, same direction


def test_voxel_order_and_a_degenerate_affine_keep_the_stored_voxels():
    stored = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    flat = np.diag([1.0, 1.0, 0.0, 1.0])  # no slice direction: nothing to say where the patient lies
    for affine, code in ((np.diag([-1.0, -1.0, 1.0, 1.0]), orientation.VOXEL_ORDER), (flat, "PL")):
        layout = orientation.volume_layout(affine, code)
        np.testing.assert_array_equal(layout.to_model, IDENTITY_LAYOUT)
        np.testing.assert_array_equal(layout.from_model, IDENTITY_LAYOUT)
        assert layout.per_slice
        np.testing.assert_array_equal(layout.slice_to_model(stored[:, :, 1]), stored[:, :, 1])
        np.testing.assert_array_equal(layout.slice_from_model(stored[:, :, 1]), stored[:, :, 1])


def _affine_of(codes, zooms=(1.0, 1.0, 1.0)) -> np.ndarray:
    """An affine whose voxel axes point toward `codes` (one world axis each) with these voxel sizes."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for voxel_axis, (code, zoom) in enumerate(zip(codes, zooms, strict=True)):
        world_axis, direction = axes[code]
        affine[world_axis, voxel_axis] = direction * zoom
    return affine


def test_the_model_slices_a_volume_along_its_head_foot_axis_in_the_stored_direction():
    # (stored voxel order, whether the model's slices are the stored slices, the model axis and direction
    # of each stored axis), by hand: rows toward P, columns toward L, slices as stored along S or I.
    expected = {
        "RAS": (True, [[1, -1], [0, -1], [2, 1]]),
        "LPS": (True, [[1, 1], [0, 1], [2, 1]]),
        "ARI": (True, [[0, -1], [1, -1], [2, 1]]),
        "LAI": (True, [[1, 1], [0, -1], [2, 1]]),
        "SPL": (False, [[2, 1], [0, 1], [1, 1]]),
        "IPL": (False, [[2, 1], [0, 1], [1, 1]]),
    }
    for codes, (per_slice, to_model) in expected.items():
        layout = orientation.volume_layout(_affine_of(codes), "PL")
        assert layout.per_slice == per_slice, codes
        np.testing.assert_array_equal(layout.to_model, to_model, codes)


def test_voxel_sizes_and_the_affine_follow_the_voxels_into_the_model_layout():
    # Stored: axis 0 toward A (0.6 mm), 1 toward R (0.8 mm), 2 toward I (5 mm), shape (5, 4, 3).
    affine = _affine_of("ARI", (0.6, 0.8, 5.0))
    affine[:3, 3] = (10.0, 20.0, 30.0)
    layout = orientation.volume_layout(affine, "PL")
    assert layout.spacing_in_model((0.6, 0.8, 5.0)) == (0.6, 0.8, 5.0)
    # By hand: model voxel (r, c, k) is stored voxel (4 - r, 3 - c, k) (rows toward P reverse A, columns
    # toward L reverse R), whose world position is (0.8 (3 - c) + 10, 0.6 (4 - r) + 20, 30 - 5 k).
    by_hand = np.array(
        [[0.0, -0.8, 0.0, 12.4], [-0.6, 0.0, 0.0, 22.4], [0.0, 0.0, -5.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    np.testing.assert_allclose(layout.affine_in_model(affine, (5, 4, 3)), by_hand)
    # A volume sliced along its first axis: each voxel size moves with its axis.
    layout = orientation.volume_layout(_affine_of("SPL"), "PL")
    assert layout.spacing_in_model((5.0, 0.6, 0.8)) == (0.6, 0.8, 5.0)


# --- NIfTI prediction in every voxel order ----------------------------------------------------------------

# The same volume stored in other voxel orders (nibabel orientation transforms from the canonical one):
# RAS, LPS, in-plane axes swapped with slices reversed, turned by 90 degrees (the one in-plane change
# that is not its own inverse), and slices along the first axis.
STORAGE_ORDERS = {
    "RAS": ("R", "A", "S"),
    "LPS": ("L", "P", "S"),
    "ARI": ("A", "R", "I"),
    "LAI": ("L", "A", "I"),
    "SPL": ("S", "P", "L"),
}


def _stored(volume: np.ndarray, codes) -> tuple[np.ndarray, np.ndarray]:
    """The canonical `volume` in the voxel order `codes`, with the affine that keeps every voxel's world
    position (nibabel's orientation tools)."""
    transform = nib_orientations.ornt_transform(
        nib_orientations.io_orientation(CANONICAL_AFFINE), nib_orientations.axcodes2ornt(codes)
    )
    stored = nib_orientations.apply_orientation(volume, transform)
    affine = CANONICAL_AFFINE @ nib_orientations.inv_ornt_aff(transform, volume.shape)
    return stored, affine


@pytest.mark.real_data
def test_every_voxel_order_and_the_png_slices_give_one_mask_in_world_coordinates(tiny_state, tmp_path):
    config = make_tiny_config(hu_window=EXACT_WINDOW)
    config.eval.num_overlays = 0
    display = real_display_slices()
    hounsfield = display.astype(np.int16) * 5 - 1000
    # A random model's probabilities depend on position and direction; its median over the volume as the
    # threshold makes about half of every mask lesion, so a slice fed turned would not match.
    batch = np.zeros((config.eval.batch_size, 32, 32, 1), np.float32)  # the shape prediction compiles
    for index in range(display.shape[2]):
        batch[index, ..., 0] = input_pipeline.resize(display[:, :, index] / 255.0, 32, is_mask=False)
    probabilities = np.asarray(inference.JaxPredictor(tiny_state).probabilities(batch))[: display.shape[2]]
    config.eval.threshold = float(np.median(probabilities))

    masks = {}
    for name, codes in {"canonical": ("P", "L", "S"), **STORAGE_ORDERS}.items():
        stored, affine = _stored(hounsfield, codes)
        nibabel.save(nibabel.Nifti1Image(stored, affine), tmp_path / f"{name}.nii")
        predict.predict_path(
            config,
            None,
            tmp_path / f"{name}.nii",
            tmp_path / "out",
            predictor=inference.JaxPredictor(tiny_state),
        )
        written = nibabel.load(tmp_path / "out" / f"{name}_mask.nii")
        assert written.shape == stored.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        masks[name] = in_canonical_voxels(np.asarray(written.dataobj), affine, hounsfield.shape)
    canonical = masks.pop("canonical")
    assert 0.2 < canonical.mean() < 0.8
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, canonical, err_msg=name)

    # The PNG slices themselves (read as the training data are) give the same masks, up to the float
    # rounding of resizing before or after dividing by 255.
    for index in range(display.shape[2]):
        Image.fromarray(display[:, :, index]).save(tmp_path / f"slice{index}.png")
        predict.predict_path(
            config,
            None,
            tmp_path / f"slice{index}.png",
            tmp_path / "out",
            predictor=inference.JaxPredictor(tiny_state),
        )
        png_mask = _grayscale(tmp_path / "out" / f"slice{index}_mask.png") > 127
        assert np.mean(png_mask == (canonical[:, :, index] > 0)) > 0.99


def test_a_nifti_checkpoint_saved_before_orientations_were_recorded_needs_its_voxel_order_named(tmp_path):
    """Before `data.orientation` existed a `nifti` model trained in stored voxel order; `auto` now means
    radiological display, so such a checkpoint is refused at `auto` and accepted once the order is named."""
    nifti = ml_collections.ConfigDict({"name": "nifti", "image_size": 32, "orientation": "auto"})
    with pytest.raises(UserError, match=r"predates recorded orientations.*data.orientation=voxel$"):
        checkpoints.check_orientation(None, nifti, tmp_path)
    # A config from before the key existed is left at auto too.
    with pytest.raises(UserError, match=r"predates recorded orientations.*data.orientation=voxel$"):
        checkpoints.check_orientation(
            None, ml_collections.ConfigDict({"name": "nifti", "image_size": 32}), tmp_path
        )
    nifti.orientation = "voxel"
    checkpoints.check_orientation(None, nifti, tmp_path)
    # PNG-trained checkpoints were trained in their dataset's own orientation, which `auto` still means.
    checkpoints.check_orientation(None, ml_collections.ConfigDict({"name": "ma2020_2d"}), tmp_path)
