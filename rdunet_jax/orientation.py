"""In-plane orientation: which way a model's slices face, and how a volume is turned to face that way.

An in-plane orientation is written as two letters in nibabel's axis-code sense: the patient direction
in which the array's rows (first axis), then its columns (second axis), increase. `PL` is radiological
display (and DICOM's standard axial pixel order): rows run from anterior (top) to posterior (bottom),
columns from the patient's right (image left) to the patient's left.

The public PNG releases, read from their anatomy (spine and table, liver and stomach, aortic arch):
- Ma et al. 2-D slices (`ma2020_2d`, covid19-ct-seg-2d): `PL`, radiological display. The spine and the
  scanner table are at the bottom, the liver on the image left, the stomach on the image right; the
  release's "rotated 90 degrees" is relative to the NIfTI voxel order, not to the display. Many of its
  last (Radiopaedia) slices are flipped vertically (`AL`); the coronacases slices are all `PL`.
- COVID-SemiSeg labelled slices (`semiseg`): `LP`, the transpose of radiological display. The vertebral
  body is at the right edge, the heart and liver to the left; the arch of the aorta runs from the upper
  left (anterior, patient right) to the lower right (posterior, patient left).
- The phantom (`synthetic`) draws its spine at the bottom: `PL`.
- NIfTI volumes (`nifti`) carry their orientation in the affine: the builder turns each to radiological
  display (`PL`), as prediction does, so training and prediction agree for every NIfTI source.

`data.orientation` records the orientation a model was trained in: `auto` (the default, also for configs
written before the key existed) means the training dataset's orientation above; `voxel` keeps volumes in
their stored voxel order, unturned (how the `nifti` builder and prediction read them before
orientations were known).
"""

import dataclasses

import numpy as np

# Radiological display, in which overlays are drawn.
DISPLAY = "PL"
IN_PLANE_ORIENTATIONS = ("PL", "PR", "AL", "AR", "LP", "LA", "RP", "RA")
VOXEL_ORDER = "voxel"
AUTO = "auto"
ORIENTATION_CHOICES = (AUTO, VOXEL_ORDER, *IN_PLANE_ORIENTATIONS)
# The orientation of each dataset's slices (see the module docstring for the evidence).
DATASET_ORIENTATIONS = {"ma2020_2d": "PL", "synthetic": "PL", "semiseg": "LP", "nifti": DISPLAY}


def model_orientation(data_config) -> str:
    """The in-plane orientation a model of `data_config` was trained in (an IN_PLANE_ORIENTATIONS code or
    VOXEL_ORDER); a config without `orientation` is `auto`."""
    value = data_config.get("orientation", AUTO)
    if value == AUTO:
        return DATASET_ORIENTATIONS.get(data_config.name, VOXEL_ORDER)
    return value


def in_plane_transform(source: str, target: str) -> np.ndarray:
    """The nibabel orientation transform ((2, 2): target axis, flip) that turns a 2-D slice in `source`
    orientation into `target` orientation."""
    from nibabel import orientations

    # Two in-plane codes are a 2-D orientation: rows and columns map to the world axes R-L and A-P.
    plane = (("R", "L"), ("A", "P"))
    return orientations.ornt_transform(
        orientations.axcodes2ornt(tuple(source), plane), orientations.axcodes2ornt(tuple(target), plane)
    )


def turn(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """`array` with its leading axes reordered and flipped by a nibabel orientation transform."""
    from nibabel import orientations

    return orientations.apply_orientation(array, transform)


@dataclasses.dataclass(frozen=True)
class VolumeLayout:
    """How a stored volume maps to the model's layout (rows, columns, slices): `to_model` is the nibabel
    orientation transform from the stored voxel axes to the model's, `from_model` its inverse."""

    to_model: np.ndarray
    from_model: np.ndarray

    @property
    def per_slice(self) -> bool:
        """Whether the model's slices are the stored slices (`volume[:, :, k]`, turned in plane), so a
        volume can be read and written one slice at a time; else the whole volume is turned at once."""
        return int(self.to_model[2, 0]) == 2 and int(self.to_model[2, 1]) == 1

    def slice_to_model(self, stored_slice: np.ndarray) -> np.ndarray:
        """A stored (axis 0, axis 1) slice turned to the model's (rows, columns); needs `per_slice`."""
        return turn(stored_slice, self.to_model[:2])

    def slice_from_model(self, model_slice: np.ndarray) -> np.ndarray:
        """A model-layout slice turned back to the stored voxel order; needs `per_slice`."""
        return turn(model_slice, self.from_model[:2])

    def affine_in_model(self, affine: np.ndarray, stored_shape) -> np.ndarray:
        """The affine of the turned volume: every voxel keeps its world position."""
        from nibabel import orientations

        return affine @ orientations.inv_ornt_aff(self.to_model, stored_shape)

    def spacing_in_model(self, spacing) -> tuple:
        """Voxel sizes along the model's (rows, columns, slices) from the stored axes' sizes."""
        model_spacing = [0.0, 0.0, 0.0]
        for stored_axis, (model_axis, _) in enumerate(self.to_model):
            model_spacing[int(model_axis)] = spacing[stored_axis]
        return tuple(model_spacing)


def volume_layout(affine: np.ndarray, orientation: str) -> VolumeLayout:
    """The layout that shows the model a volume with `affine` in `orientation`: in-plane axes as the model
    was trained, slices along the volume's axis nearest superior-inferior, in their stored direction.
    VOXEL_ORDER keeps the stored voxel order."""
    from nibabel import orientations

    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    if orientation == VOXEL_ORDER:
        return VolumeLayout(identity, identity)
    stored = orientations.io_orientation(affine)  # per voxel axis: (RAS world axis, direction)
    if np.isnan(stored).any():
        return VolumeLayout(identity, identity)  # a degenerate affine says nothing about the patient
    slice_axis = int(np.flatnonzero(stored[:, 0] == 2)[0])
    slice_code = "S" if stored[slice_axis, 1] > 0 else "I"
    target = orientations.axcodes2ornt((*orientation, slice_code))
    return VolumeLayout(
        orientations.ornt_transform(stored, target), orientations.ornt_transform(target, stored)
    )


def to_display(model_slice: np.ndarray, orientation: str) -> np.ndarray:
    """A model-layout slice turned to radiological display for viewing (VOXEL_ORDER, whose patient
    directions are unknown: the stored (x, y) slice turned by 90 degrees, as overlays always were)."""
    if orientation == VOXEL_ORDER:
        return np.rot90(model_slice)
    return turn(model_slice, in_plane_transform(orientation, DISPLAY))
