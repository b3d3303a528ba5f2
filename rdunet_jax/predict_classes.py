"""The multi-class side of prediction: a volume's per-class voxels, mL and lung involvement (predict.py
writes them in the summary)."""

import numpy as np

from rdunet_jax import heads, involvement, metrics


class ClassTally:
    """A multi-class volume's per-class voxels (and lungs and infected lung voxels) over its slices."""

    def __init__(self, config):
        self.head, self.classes = config.model.head, tuple(config.data.classes)
        self.voxels = np.zeros(len(self.classes), np.int64)
        self.expert_counts = np.zeros((len(self.classes), 3), np.int64)  # TP, FP, FN per class
        self.lung_voxels, self.infected_lung_voxels = 0, 0

    def add(self, class_masks: np.ndarray, expert_labels=None) -> None:
        self.voxels += class_masks.reshape(-1, len(self.classes)).sum(axis=0)
        lungs_and_infection = heads.lungs_and_infection(class_masks, self.head, self.classes)
        if lungs_and_infection is not None:
            lungs, infection = lungs_and_infection
            self.lung_voxels += int(lungs.sum())
            self.infected_lung_voxels += int((lungs & infection).sum())
        if expert_labels is not None:
            expert = np.rint(expert_labels)[..., None] == np.arange(1, len(self.classes) + 1)
            counts = metrics.confusion_counts(np.moveaxis(class_masks, -1, 0), np.moveaxis(expert, -1, 0))
            self.expert_counts += np.stack(counts[:3], axis=-1)

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
