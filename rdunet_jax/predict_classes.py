"""The multi-class side of prediction: a volume's per-class voxels, mL and lung involvement for its
summary, and an image's label map and overlay (predict.py calls them)."""

import numpy as np

from rdunet_jax import heads, involvement, metrics, visualize
from rdunet_jax.datasets import labels as class_labels


class ClassTally:
    """A multi-class volume's per-class voxels (and lungs and infected lung voxels) over its slices."""

    def __init__(self, config):
        self.head, self.classes = config.model.head, tuple(config.data.classes)
        self.threshold = config.eval.threshold
        self.voxels = np.zeros(len(self.classes), np.int64)
        self.expert_counts = np.zeros((len(self.classes), 3), np.int64)  # TP, FP, FN per class
        self.lung_voxels, self.infected_lung_voxels = 0, 0

    def add(self, probabilities, shape, expert_labels=None) -> np.ndarray:
        """Counts one slice's class masks (probabilities (S, S, C) resized to `shape`, then the head's
        rule) and returns them; an expert label map (values 0..K) adds to each class's Dice."""
        class_masks = heads.class_masks_at_size(probabilities, shape, self.head, self.threshold)
        self.voxels += class_masks.reshape(-1, len(self.classes)).sum(axis=0)
        lungs_and_infection = heads.lungs_and_infection(class_masks, self.head, self.classes)
        if lungs_and_infection is not None:
            lungs, infection = lungs_and_infection
            self.lung_voxels += int(lungs.sum())
            self.infected_lung_voxels += int((lungs & infection).sum())
        if expert_labels is not None:
            expert = class_labels.label_map_class_masks(expert_labels, self.head, self.classes)
            counts = metrics.confusion_counts(np.moveaxis(class_masks, -1, 0), np.moveaxis(expert, -1, 0))
            self.expert_counts += np.stack(counts[:3], axis=-1)
        return class_masks

    def summary(self, voxel_ml: float | None, with_expert: bool) -> dict:
        """`classes` (voxels, mL where known, Dice with the expert label map when given) and, with lungs
        and infection, the volume's `involvement`."""
        classes = {}
        for index, name in enumerate(self.classes):
            classes[name] = {"voxels": int(self.voxels[index])}
            if voxel_ml is not None:
                classes[name]["volume_ml"] = float(self.voxels[index] * voxel_ml)
            if with_expert:
                tp, fp, fn = (int(count) for count in self.expert_counts[index])
                classes[name]["dice_with_ground_truth"] = float(metrics.slice_metrics(tp, fp, fn)["dice"])
        result = {"classes": classes}
        if "lungs" in self.classes and "infection" in self.classes:
            percent = 100.0 * self.infected_lung_voxels / self.lung_voxels if self.lung_voxels else None
            result["involvement"] = {
                "involvement_percent": percent,
                "severity": involvement.severity_band(percent),
                "note": "share of the whole lungs infected (not per lobe)",
            }
        return result


def write_image_outputs(outputs: dict, image, probabilities, config, expert_labels=None) -> None:
    """A PNG/JPEG slice's palette label map (`outputs['mask']`) and per-class overlay (the expert label
    map's classes outlined in white when given)."""
    classes = tuple(config.data.classes)
    class_masks = heads.class_masks_at_size(
        probabilities, image.shape, config.model.head, config.eval.threshold
    )
    visualize.write_label_png(outputs["mask"], heads.masks_to_label_map(class_masks))
    targets = (
        None
        if expert_labels is None
        else class_labels.label_map_class_masks(expert_labels, config.model.head, classes)
    )
    overlay = visualize.class_overlay_image(image, class_masks, targets, classes)
    visualize.write_png(outputs["overlay"], overlay)
