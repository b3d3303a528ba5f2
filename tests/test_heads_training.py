"""Whole tiny runs of the multi-class heads on the synthetic dataset (its ggo/consolidation class masks):
training, the per-class metrics JSON and markdown, and the checkpoint's head and classes."""

import json

import numpy as np
import pytest
from helpers import ONE_LEVEL, make_tiny_config

from rdunet_jax import checkpoints, datasets, steps, train

CLASSES = ("ggo", "consolidation")


def _config(head: str, loss: str):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = head, CLASSES, loss
    config.model.update(ONE_LEVEL)
    return config


@pytest.mark.parametrize(
    "head, loss",
    # The multilabel run is the same loop with another head (both heads' outputs and losses are pinned
    # against references in test_reference_forward.py): a system test, 23 s on 2 cores.
    [("exclusive", "dice_ce"), pytest.param("multilabel", "dice_bce", marks=pytest.mark.slow)],
)
def test_a_tiny_multi_class_run_writes_per_class_metrics(head, loss, tmp_path):
    config = _config(head, loss)
    summary = train.train_and_evaluate(config, tmp_path)

    written = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert sorted(written["per_class"]) == sorted(CLASSES)
    # Slices holding each class, counted from the dataset's own class masks (stored at 32 px).
    source = datasets.load_source(config.data, "test")
    class_masks = np.stack([np.asarray(source[index]["class_mask"]) for index in range(len(source))])
    for value, name in enumerate(CLASSES, start=1):
        present = int(np.sum(np.any(class_masks == value, axis=(1, 2))))
        assert written["per_class"][name]["num_slices_present"] == present
        assert 0.0 <= written["per_class"][name]["global_dice"] <= 1.0
    # The top level scores any class for 'exclusive', the last class (no 'infection') for 'multilabel'.
    lesion_classes = list(CLASSES) if head == "exclusive" else ["consolidation"]
    assert written["lesion_classes"] == lesion_classes
    lesion_values = [CLASSES.index(name) + 1 for name in lesion_classes]
    with_lesion = np.any(np.isin(class_masks, lesion_values), axis=(1, 2))
    assert written["num_slices_with_lesion"] == int(np.sum(with_lesion))
    markdown = (tmp_path / "metrics" / "test.md").read_text()
    assert "## Per class" in markdown and "| ggo |" in markdown and "Class consolidation:" in markdown
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == config.num_epochs and all(np.isfinite(record["loss"]) for record in log)

    # The checkpoint records its head and classes: a binary config cannot restore it.
    binary = make_tiny_config()
    binary.model.update(ONE_LEVEL)
    with pytest.raises(checkpoints.ModelMismatchError, match=f"model.head='{head}' in the checkpoint"):
        steps.restore_state(binary, tmp_path)
