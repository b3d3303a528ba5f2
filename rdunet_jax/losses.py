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


# `config.loss` names one of these; each maps (logits, masks) to one loss per image.
LOSSES = {"dice": soft_dice_loss, "dice_bce": dice_bce_loss}
