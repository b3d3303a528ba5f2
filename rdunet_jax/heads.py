"""Output heads: how many channels the model's last convolution has, and logits to probabilities, per-class
masks and label maps, for `model.head` 'binary' (the paper's sigmoid), 'exclusive' (softmax over
background and K classes) and 'multilabel' (one sigmoid per class).

`activate` runs inside the jitted forward pass (jax.numpy); the rest post-process probabilities in numpy,
whichever runtime produced them.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rdunet_jax import input_pipeline
from rdunet_jax.datasets import labels as class_labels

HEADS = ("binary", "exclusive", "multilabel")


def num_output_channels(head: str, num_classes: int) -> int:
    """Channels of the logits: 1 (binary), background + K (exclusive), K (multilabel)."""
    if head == "binary":
        return 1
    if head == "exclusive":
        return num_classes + 1
    if head == "multilabel":
        return num_classes
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def activate(logits, head: str):
    """Probabilities of logits (..., C): softmax over channels for 'exclusive', sigmoid otherwise."""
    logits = jnp.asarray(logits, jnp.float32)
    if head == "exclusive":
        return jax.nn.softmax(logits, axis=-1)
    if head in ("binary", "multilabel"):
        return jax.nn.sigmoid(logits)
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def class_masks(probabilities, head: str, threshold: float = 0.5) -> np.ndarray:
    """Boolean masks (..., K), one per foreground class: the probability at or above `threshold` for the
    sigmoid heads (the binary evaluation's rule); for 'exclusive' the class with the highest probability
    (background included, the first on a tie), so every pixel has at most one class."""
    probabilities = np.asarray(probabilities)
    if head == "exclusive":
        winner = np.argmax(probabilities, axis=-1)
        return winner[..., None] == np.arange(1, probabilities.shape[-1])
    if head in ("binary", "multilabel"):
        return probabilities >= threshold
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def label_map(probabilities, head: str, threshold: float = 0.5) -> np.ndarray:
    """One label map (...) uint8, 0 background and k the k-th class; for 'multilabel', whose classes may
    overlap, the last class that is on wins (infection drawn over the lungs that hold it)."""
    return masks_to_label_map(class_masks(probabilities, head, threshold))


def masks_to_label_map(masks) -> np.ndarray:
    """The uint8 label map (...) of boolean class masks (..., K): k where class k is on, the last on wins."""
    masks = np.asarray(masks)
    values = np.arange(1, masks.shape[-1] + 1, dtype=np.uint8)
    return np.max(np.where(masks, values, 0), axis=-1).astype(np.uint8)


def class_masks_at_size(probabilities, shape, head: str, threshold: float = 0.5) -> np.ndarray:
    """Class masks (rows, columns, K) of one slice's probabilities (S, S, C) resized to `shape`: each
    channel resized bilinearly (as the binary probabilities are), then the head's rule."""
    resized = np.stack(
        [
            input_pipeline.resize_probabilities(np.asarray(probabilities)[..., channel], shape)
            for channel in range(np.shape(probabilities)[-1])
        ],
        axis=-1,
    )
    return class_masks(resized, head, threshold)


# --- Expert labels and the "any lesion" mask -------------------------------------------------------------
#
# Every head reports the binary metrics of one "lesion" mask at the top level of metrics/<split>.json, so
# runs of different heads compare: the binary head's own mask; for 'exclusive', any foreground class (the
# union of the classes, e.g. GGO or consolidation); for 'multilabel', the lesion class: the class named
# 'infection' or 'lesion' when there is one (Ma et al.'s lungs + infection), else the last class.
LESION_CLASS_NAMES = ("infection", "lesion")
LUNG_CLASS_NAME = class_labels.LUNG_CLASS_NAME


def lesion_classes(head: str, classes) -> list[int]:
    """Indices of the classes whose union is the head's "any lesion" mask."""
    classes = list(classes)
    if head in ("binary", "exclusive"):
        return list(range(len(classes) if head == "exclusive" else 1))
    named = [index for index, name in enumerate(classes) if name in LESION_CLASS_NAMES]
    return named[:1] or [len(classes) - 1]


def any_lesion(masks, head: str, classes) -> np.ndarray:
    """The "any lesion" mask (...) of per-class masks (..., K)."""
    return np.any(np.asarray(masks)[..., lesion_classes(head, classes)], axis=-1)


def expert_class_masks(labels, head: str, num_classes: int) -> np.ndarray:
    """Boolean per-class masks (..., K) of expert labels as the input pipeline gives them: a label map
    (..., 1) for 'exclusive', binary channels (..., K) for 'multilabel'."""
    labels = np.asarray(labels)
    if head == "exclusive":
        return class_labels.label_map_masks(labels[..., 0], num_classes)
    if head == "multilabel":
        return labels > 0
    raise ValueError(f"expert class masks are for the multi-class heads, not {head!r}")


def lungs_and_infection(masks, head: str, classes):
    """(lungs, infection) boolean masks of per-class masks (..., K) when the classes hold both ('lungs'
    and 'infection'; an exclusive head's lungs are its lung and infection classes together), else None."""
    classes = list(classes)
    if LUNG_CLASS_NAME not in classes or "infection" not in classes:
        return None
    masks = np.asarray(masks)
    lungs, infection = masks[..., classes.index(LUNG_CLASS_NAME)], masks[..., classes.index("infection")]
    return (lungs | infection if head == "exclusive" else lungs), infection
