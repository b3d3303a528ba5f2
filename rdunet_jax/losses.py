"""Training objectives."""

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits, masks, smooth: float = 1.0):
    """The paper's Dice loss: 1 - (2|P.G| + s) / (|P| + |G| + s) per image, with P = sigmoid(logits).

    Returns one loss per image (shape [batch]); the smoothing term `s` makes an image whose mask and
    prediction are both empty score a loss of 0, not NaN.
    """
    probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
    masks = masks.astype(jnp.float32)
    axes = tuple(range(1, masks.ndim))
    intersection = jnp.sum(probabilities * masks, axis=axes)
    total = jnp.sum(probabilities, axis=axes) + jnp.sum(masks, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def dice_bce_loss(logits, masks, smooth: float = 1.0):
    """Soft Dice plus pixel-mean binary cross-entropy per image (nnU-Net's loss, MONAI's DiceCELoss).

    Cross-entropy adds a gradient on every pixel, which Dice alone gives weakly where the image has little
    lesion; returns one loss per image (shape [batch]).
    """
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks.astype(jnp.float32))
    axes = tuple(range(1, masks.ndim))
    return soft_dice_loss(logits, masks, smooth) + jnp.mean(cross_entropy, axis=axes)


def split_pixel_weights(targets):
    """(masks, weights) of targets whose last axis holds the mask and, when it has two channels, each
    pixel's loss weight (a pseudo-label's confidence; 0 ignores the pixel); one channel weighs 1."""
    targets = targets.astype(jnp.float32)
    if targets.shape[-1] == 2:
        return targets[..., :1], targets[..., 1:]
    return targets, jnp.ones_like(targets)


def weighted_soft_dice_loss(logits, targets, smooth: float = 1.0):
    """Soft Dice over weighted pixels: 1 - (2 sum w P G + s) / (sum w P + sum w G + s) per image, the
    weights from `split_pixel_weights` (with weights 1, the paper's Dice loss)."""
    masks, weights = split_pixel_weights(targets)
    probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
    axes = tuple(range(1, masks.ndim))
    intersection = jnp.sum(weights * probabilities * masks, axis=axes)
    total = jnp.sum(weights * probabilities, axis=axes) + jnp.sum(weights * masks, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def weighted_dice_bce_loss(logits, targets, smooth: float = 1.0):
    """Weighted soft Dice plus the weighted mean of binary cross-entropy over the image's pixels
    (sum w CE / sum w; 0 where every weight is 0)."""
    masks, weights = split_pixel_weights(targets)
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks)
    axes = tuple(range(1, masks.ndim))
    weighted_mean = jnp.sum(weights * cross_entropy, axis=axes) / jnp.maximum(
        jnp.sum(weights, axis=axes), 1e-6
    )
    return weighted_soft_dice_loss(logits, targets, smooth) + weighted_mean


# `config.loss` names one of these; each maps (logits, masks) to one loss per image. The `_weighted`
# forms read a second mask channel as per-pixel weights (self-training's student: `WEIGHTED_LOSSES`).
LOSSES = {
    "dice": soft_dice_loss,
    "dice_bce": dice_bce_loss,
    "dice_weighted": weighted_soft_dice_loss,
    "dice_bce_weighted": weighted_dice_bce_loss,
}
# The weighted form of each loss.
WEIGHTED_LOSSES = {"dice": "dice_weighted", "dice_bce": "dice_bce_weighted"}
