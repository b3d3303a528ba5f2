"""Training objectives."""

import jax
import jax.numpy as jnp


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
