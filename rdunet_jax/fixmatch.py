"""FixMatch (Sohn et al., 2020) for segmentation: the model's own confident predictions on a weakly augmented
batch are the labels of its predictions on a strongly augmented copy.

The weak view is the batch as the input pipeline augments it (flips and zoom in the shipped config). The
model predicts it with the current parameters and running BatchNorm statistics, without gradient; each
pixel's pseudo-label is its thresholded probability (`eval.threshold`), kept where the model is at least
`consistency.confidence_threshold` sure of it either way. The unlabelled slices reach the student as their
strong view: a random contrast and brightness change of each slice (`consistency.strong_intensity_range`)
plus Gaussian noise (`consistency.noise_std`); the loss adds `consistency.weight` x ramp-up x the binary
cross-entropy of its logits against the kept pseudo-labels, averaged over every pixel of the batch's
unlabelled slices (FixMatch's normalisation: a pixel below the threshold counts 0). The labelled slices are
trained on as they come (the weak view). Intensity changes only, so a pixel's label stays where it was.
With `consistency.min_lesion_fraction` > 0 only the unlabelled slices whose weak view the model calls lesion
on at least that share of pixels count (self-training's slice filter, `data.extra_min_lesion_fraction`): the
mean is then over the kept slices' pixels, and a step that keeps none adds 0.
"""

import jax
import jax.numpy as jnp
import optax


def strong_view(images, key, intensity_range: float, noise_std: float):
    """Each slice's contrast x U(1-s, 1+s) about its mean and brightness + U(-s/2, s/2), clipped to [0, 1]
    (the input pipeline's `jitter_intensity`), then Gaussian noise of `noise_std`."""
    contrast_key, brightness_key, noise_key = jax.random.split(key, 3)
    rows = (images.shape[0],) + (1,) * (images.ndim - 1)
    contrast = jax.random.uniform(
        contrast_key, rows, images.dtype, 1.0 - intensity_range, 1.0 + intensity_range
    )
    brightness = jax.random.uniform(
        brightness_key, rows, images.dtype, -intensity_range / 2, intensity_range / 2
    )
    mean = jnp.mean(images, axis=tuple(range(1, images.ndim)), keepdims=True)
    jittered = jnp.clip((images - mean) * contrast + mean + brightness, 0.0, 1.0)
    return jittered + noise_std * jax.random.normal(noise_key, images.shape, images.dtype)


def unlabelled_rows(mask):
    """1 for each row of a mixed batch whose loss-weight channel (the mask's last) is 0 everywhere: the
    unlabelled slices (`data.unlabelled_fraction`), else 0."""
    return (jnp.max(mask[..., -1:], axis=tuple(range(1, mask.ndim))) == 0).astype(jnp.float32)


def rows_with_lesion(teacher_probabilities, mask_threshold: float, min_lesion_fraction: float):
    """1 for each row whose pseudo-label (p >= mask threshold) covers at least `min_lesion_fraction` of its
    pixels, else 0: the slice filter that keeps a pool mostly without lesion from teaching only background."""
    lesion = (teacher_probabilities >= mask_threshold).astype(jnp.float32)
    share = jnp.mean(lesion, axis=tuple(range(1, lesion.ndim)))
    return (share >= min_lesion_fraction).astype(jnp.float32)


def pseudo_label_loss(
    student_logits, teacher_probabilities, rows, mask_threshold: float, confidence_threshold: float
):
    """Mean over the pixels of the `rows` (1: unlabelled) of the binary cross-entropy against the teacher's
    label (p >= mask threshold), where the teacher is confident in it (lesion: p >= confidence threshold;
    background: p <= 1 - it), 0 elsewhere."""
    lesion = teacher_probabilities >= mask_threshold
    confident = jnp.where(
        lesion,
        teacher_probabilities >= confidence_threshold,
        teacher_probabilities <= 1.0 - confidence_threshold,
    )
    entropy = optax.sigmoid_binary_cross_entropy(
        student_logits.astype(jnp.float32), lesion.astype(jnp.float32)
    )
    per_row = jnp.mean(jnp.where(confident, entropy, 0.0), axis=tuple(range(1, entropy.ndim)))
    return jnp.sum(rows * per_row) / jnp.maximum(jnp.sum(rows), 1.0)
