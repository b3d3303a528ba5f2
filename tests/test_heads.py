"""Output heads: channel counts, activations against scipy, per-class masks and label maps by hand."""

import numpy as np
import pytest
from scipy import special

from rdunet_jax import heads


def test_channel_counts():
    assert [heads.num_output_channels(head, 2) for head in heads.HEADS] == [1, 3, 2]
    with pytest.raises(ValueError, match="unknown head"):
        heads.num_output_channels("softmax", 2)


def test_activations_match_scipy():
    logits = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32) * 4
    np.testing.assert_allclose(
        heads.activate(logits, "exclusive"), special.softmax(logits, axis=-1), atol=1e-6
    )
    for head in ("binary", "multilabel"):
        np.testing.assert_allclose(heads.activate(logits, head), special.expit(logits), atol=1e-6)


def test_exclusive_masks_and_label_map_by_hand():
    # Pixels: background wins; class 1 wins; class 2 wins although below 0.5; a background/class tie.
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.35, 0.25, 0.4], [0.4, 0.4, 0.2]])
    masks = heads.class_masks(probabilities, "exclusive")
    np.testing.assert_array_equal(masks, [[0, 0], [1, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(heads.label_map(probabilities, "exclusive"), [0, 1, 2, 0])


def test_sigmoid_heads_threshold_each_class_and_multilabel_draws_the_last_class_on_top():
    probabilities = np.array([[0.9, 0.8], [0.9, 0.2], [0.1, 0.6], [0.45, 0.3]])  # (lungs, infection)
    np.testing.assert_array_equal(
        heads.class_masks(probabilities, "multilabel"), [[1, 1], [1, 0], [0, 1], [0, 0]]
    )
    np.testing.assert_array_equal(heads.label_map(probabilities, "multilabel"), [2, 1, 2, 0])
    np.testing.assert_array_equal(heads.label_map(probabilities, "multilabel", threshold=0.7), [2, 1, 0, 0])
    binary = np.array([[0.2], [0.51], [0.5], [0.49]])  # at the threshold is lesion, as in evaluation
    np.testing.assert_array_equal(heads.label_map(binary, "binary"), [0, 1, 1, 0])


def test_an_exclusive_head_with_one_class_agrees_with_the_binary_head_on_the_logit_difference():
    logits = np.random.default_rng(1).normal(size=(64, 2)).astype(np.float32) * 3
    exclusive = heads.label_map(heads.activate(logits, "exclusive"), "exclusive")
    binary = heads.label_map(heads.activate(logits[:, 1:] - logits[:, :1], "binary"), "binary")
    np.testing.assert_array_equal(exclusive, binary)
