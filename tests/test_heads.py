"""Output heads: channel counts, activations against scipy, per-class masks and label maps, the "any
lesion" classes and the lungs by hand."""

import jax.numpy as jnp
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
    # bfloat16 logits (a bfloat16 model's, or an exported one's) become float32 probabilities.
    half = jnp.asarray(logits, jnp.bfloat16)
    for head, reference in (("exclusive", lambda x: special.softmax(x, axis=-1)), ("binary", special.expit)):
        probabilities = heads.activate(half, head)
        assert probabilities.dtype == jnp.float32
        np.testing.assert_allclose(probabilities, reference(np.asarray(half, np.float32)), atol=1e-6)


def test_exclusive_masks_and_label_map_by_hand():
    # Pixels: background wins; class 1 wins; class 2 wins although below 0.5; a background/class tie.
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.35, 0.25, 0.4], [0.4, 0.4, 0.2]])
    masks = heads.class_masks(probabilities, "exclusive")
    np.testing.assert_array_equal(masks, [[0, 0], [1, 0], [0, 1], [0, 0]])
    label_map = heads.label_map(probabilities, "exclusive")
    np.testing.assert_array_equal(label_map, [0, 1, 2, 0])
    assert label_map.dtype == np.uint8  # written as a PNG or NIfTI label map


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


def test_unknown_heads_are_refused_naming_the_head_and_the_choices():
    choices = r"; choose one of \('binary', 'exclusive', 'multilabel'\)"
    with pytest.raises(ValueError, match=r"^unknown head 'softmax'" + choices + "$"):
        heads.activate(np.zeros((1, 2), np.float32), "softmax")
    with pytest.raises(ValueError, match=r"^unknown head 'softmax'" + choices + "$"):
        heads.class_masks(np.zeros((1, 2)), "softmax")
    with pytest.raises(ValueError, match="^expert class masks are for the multi-class heads, not 'binary'$"):
        heads.expert_class_masks(np.zeros((1, 2, 2, 1)), "binary", 1)


def test_class_masks_at_another_size_apply_the_threshold_given_or_one_half():
    # Constant channels stay constant under the bilinear resize: p 0.4 and 0.6 on a 2 x 2 slice, to 3 x 5.
    probabilities = np.stack([np.full((2, 2), 0.4), np.full((2, 2), 0.6)], axis=-1).astype(np.float32)
    masks = heads.class_masks_at_size(probabilities, (3, 5), "multilabel")
    assert masks.shape == (3, 5, 2)
    assert not masks[..., 0].any() and masks[..., 1].all()
    assert heads.class_masks_at_size(probabilities, (3, 5), "multilabel", threshold=0.3).all()


def test_the_any_lesion_classes_of_each_head():
    assert heads.lesion_classes("binary", ["lesion"]) == [0]
    assert heads.lesion_classes("exclusive", ["ggo", "consolidation"]) == [0, 1]  # any foreground class
    # Multilabel: the first class named infection or lesion, wherever it stands; without one, the last.
    assert heads.lesion_classes("multilabel", ["lungs", "infection"]) == [1]
    assert heads.lesion_classes("multilabel", ["infection", "lungs"]) == [0]
    assert heads.lesion_classes("multilabel", ["lesion", "lungs", "infection"]) == [0]
    assert heads.lesion_classes("multilabel", ["ggo", "consolidation", "effusion"]) == [2]
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)  # one pixel per class on
    np.testing.assert_array_equal(
        heads.any_lesion(masks, "multilabel", ["lungs", "infection", "x"]), [0, 1, 0]
    )
    np.testing.assert_array_equal(heads.any_lesion(masks, "exclusive", ["a", "b", "c"]), [1, 1, 1])


def test_lungs_and_infection_need_both_classes_and_only_an_exclusive_heads_lungs_hold_its_infection():
    # Pixels (lungs, infection): lung only; infection outside the lung mask; both; neither.
    masks = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)
    lungs, infection = heads.lungs_and_infection(masks, "multilabel", ["lungs", "infection"])
    np.testing.assert_array_equal(lungs, [1, 0, 1, 0])  # a multilabel head draws the lungs whole
    np.testing.assert_array_equal(infection, [0, 1, 1, 0])
    # An exclusive head's label map gives each pixel one class: its lungs are the lung and infection labels.
    lungs, infection = heads.lungs_and_infection(masks, "exclusive", ["lungs", "infection"])
    np.testing.assert_array_equal(lungs, [1, 1, 1, 0])
    lungs, infection = heads.lungs_and_infection(masks, "multilabel", ["infection", "lungs"])
    np.testing.assert_array_equal(lungs, [0, 1, 1, 0])
    for classes in (["lungs", "lesion"], ["ggo", "infection"], ["ggo", "consolidation"]):
        assert heads.lungs_and_infection(masks, "multilabel", classes) is None
