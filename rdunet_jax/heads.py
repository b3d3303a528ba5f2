"""Output heads: how many channels the model's last convolution has, and logits to probabilities, per-class
masks and label maps, for `model.head` 'binary' (the paper's sigmoid), 'exclusive' (softmax over
background and K classes) and 'multilabel' (one sigmoid per class).

`activate` runs inside the jitted forward pass (jax.numpy); the rest post-process probabilities in numpy,
whichever runtime produced them.
"""

import jax
import jax.numpy as jnp
import numpy as np

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
    """Boolean masks (..., K), one per foreground class: the probability above `threshold` for the
    sigmoid heads; for 'exclusive' the class with the highest probability (background included, the
    first on a tie), so every pixel has at most one class."""
    probabilities = np.asarray(probabilities)
    if head == "exclusive":
        winner = np.argmax(probabilities, axis=-1)
        return winner[..., None] == np.arange(1, probabilities.shape[-1])
    if head in ("binary", "multilabel"):
        return probabilities > threshold
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def label_map(probabilities, head: str, threshold: float = 0.5) -> np.ndarray:
    """One label map (...) uint8, 0 background and k the k-th class; for 'multilabel', whose classes may
    overlap, the last class that is on wins (infection drawn over the lungs that hold it)."""
    masks = class_masks(probabilities, head, threshold)
    values = np.arange(1, masks.shape[-1] + 1, dtype=np.uint8)
    return np.max(np.where(masks, values, 0), axis=-1).astype(np.uint8)
