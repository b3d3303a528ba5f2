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


# --- Multi-class heads ----------------------------------------------------------------------------------
#
# Shapes: an 'exclusive' head's logits are (batch, H, W, K + 1), channel 0 the background, and its
# labels an integer label map (batch, H, W, 1) or (batch, H, W) with values 0..K; a 'multilabel' head's
# logits and targets are both (batch, H, W, K), one binary channel per class. Every loss returns one
# value per image (shape [batch]), as the binary losses do.
#
# Dice per image and foreground class c: (2 sum(p_c g_c) + s) / (sum(p_c) + sum(g_c) + s), the binary
# loss's smoothing per class. A class absent from both the image's mask and its prediction therefore
# scores Dice 1 (loss 0) and still counts in the mean over the K foreground classes: MONAI's DiceLoss
# (smooth_nr = smooth_dr) and nnU-Net's SoftDiceLoss (smooth in numerator and denominator, do_bg=False)
# do the same. Background is never a Dice class.


def _per_class_soft_dice(probabilities, targets, smooth: float):
    """Soft Dice of each channel of (batch, H, W, C) probabilities and targets: shape (batch, C)."""
    axes = tuple(range(1, probabilities.ndim - 1))
    intersection = jnp.sum(probabilities * targets, axis=axes)
    total = jnp.sum(probabilities, axis=axes) + jnp.sum(targets, axis=axes)
    return (2.0 * intersection + smooth) / (total + smooth)


def _one_hot_labels(labels, num_channels: int):
    """(batch, H, W[, 1]) integer labels 0..K as (batch, H, W, K + 1) float32 one-hot channels."""
    labels = jnp.asarray(labels)
    if labels.ndim == 4:
        labels = labels[..., 0]
    return jax.nn.one_hot(labels.astype(jnp.int32), num_channels, dtype=jnp.float32)


def exclusive_soft_dice_loss(logits, labels, smooth: float = 1.0):
    """1 - mean over the K foreground classes of the soft Dice of softmax(logits) per image."""
    logits = logits.astype(jnp.float32)
    probabilities = jax.nn.softmax(logits, axis=-1)
    targets = _one_hot_labels(labels, logits.shape[-1])
    dice = _per_class_soft_dice(probabilities[..., 1:], targets[..., 1:], smooth)
    return 1.0 - jnp.mean(dice, axis=-1)


def exclusive_dice_ce_loss(logits, labels, smooth: float = 1.0):
    """Foreground soft Dice plus the pixel mean of softmax cross-entropy over background and classes
    (nnU-Net's DC_and_CE_loss, MONAI's DiceCELoss) per image."""
    logits = logits.astype(jnp.float32)
    targets = _one_hot_labels(labels, logits.shape[-1])
    cross_entropy = optax.softmax_cross_entropy(logits, targets)
    axes = tuple(range(1, cross_entropy.ndim))
    return exclusive_soft_dice_loss(logits, labels, smooth) + jnp.mean(cross_entropy, axis=axes)


def multilabel_soft_dice_loss(logits, targets, smooth: float = 1.0):
    """1 - mean over the K channels of each channel's sigmoid soft Dice per image."""
    probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
    dice = _per_class_soft_dice(probabilities, targets.astype(jnp.float32), smooth)
    return 1.0 - jnp.mean(dice, axis=-1)


def multilabel_dice_bce_loss(logits, targets, smooth: float = 1.0):
    """Per-channel sigmoid soft Dice plus the mean binary cross-entropy over pixels and channels."""
    cross_entropy = optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), targets.astype(jnp.float32)
    )
    axes = tuple(range(1, cross_entropy.ndim))
    return multilabel_soft_dice_loss(logits, targets, smooth) + jnp.mean(cross_entropy, axis=axes)


# The losses each `model.head` trains with, by `config.loss` name; 'binary' is LOSSES itself.
LOSSES_BY_HEAD = {
    "binary": LOSSES,
    "exclusive": {"dice": exclusive_soft_dice_loss, "dice_ce": exclusive_dice_ce_loss},
    "multilabel": {"dice": multilabel_soft_dice_loss, "dice_bce": multilabel_dice_bce_loss},
}
