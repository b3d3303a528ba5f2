"""Per-class metrics and lung involvement in a split's evaluation, against values computed by hand on
planted predictions (a stand-in Predictor returns fixed probabilities, no model runs)."""

import csv
import io
import json

import numpy as np
import pytest
from helpers import make_tiny_config
from scipy import stats

from rdunet_jax import evaluate, evaluate_classes, inference, metrics, reports
from rdunet_jax.datasets import labels as class_labels

SIZE = 32  # the tiny config's image size: records are stored at the model's resolution


class PlantedPredictor(inference.Predictor):
    """Returns each slice's planted probabilities (S, S, C), in order; padding rows stay zero."""

    step = 0

    def __init__(self, planted, head: str):
        self.planted, self.head = list(planted), head
        self.next = 0

    def _loss_and_probabilities(self, batch):
        probabilities = np.zeros((len(batch["image"]), SIZE, SIZE, self.planted[0].shape[-1]), np.float32)
        for row in range(len(probabilities)):
            if self.next < len(self.planted):
                probabilities[row] = self.planted[self.next]
                self.next += 1
        return np.zeros(len(probabilities), np.float32), probabilities


def _record(index: int, expert: np.ndarray, **extra) -> dict:
    lesion = expert > 0 if expert.ndim == 2 else expert[..., -1] > 0
    return {
        "id": f"slice-{index}",
        "image": np.full((SIZE, SIZE), 100, np.uint8),
        "mask": lesion.astype(np.uint8),
        **extra,
    }


def _one_hot(label_map: np.ndarray, channels: int) -> np.ndarray:
    return (label_map[..., None] == np.arange(channels)).astype(np.float32)


def _exclusive_case():
    """Three slices of ggo (1) and consolidation (2): expert and predicted label maps."""
    expert, predicted = np.zeros((3, SIZE, SIZE), np.uint8), np.zeros((3, SIZE, SIZE), np.uint8)
    expert[0, 0:4, 0:4] = 1  # ggo, 16 px; predicted: its left half, 8 px
    predicted[0, 0:4, 0:2] = 1
    expert[0, 10:14, 10:12] = predicted[0, 10:14, 10:12] = 2  # consolidation found exactly, 8 px
    expert[1, 20:22, 0:4] = predicted[1, 20:22, 0:4] = 1  # ggo found exactly, 8 px
    predicted[1, 30:31, 30:32] = 2  # consolidation absent from slice 1, predicted on 2 px
    return expert, predicted  # slice 2: nothing in either


def test_exclusive_per_class_metrics_and_any_lesion_by_hand(tmp_path, monkeypatch):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = "exclusive", ("ggo", "consolidation"), "dice_ce"
    expert, predicted = _exclusive_case()
    records = [_record(index, expert[index], class_mask=expert[index]) for index in range(3)]
    source = class_labels.LabelledSource(records, config.data, "exclusive")
    predictor = PlantedPredictor([_one_hot(labels, 3) for labels in predicted], "exclusive")
    collected = evaluate.collect_slices(predictor, source, config)
    summary = evaluate.summarize_collected(collected, config)

    ggo, consolidation = summary["per_class"]["ggo"], summary["per_class"]["consolidation"]
    assert ggo["num_slices_present"] == 2 and consolidation["num_slices_present"] == 1
    assert ggo["dice"] == pytest.approx((2 * 8 / (8 + 16) + 1.0) / 2)
    assert ggo["global_dice"] == pytest.approx(2 * 16 / (16 + 24))
    assert ggo["false_positive_rate"] == 0.0  # slice 2 has no ggo and none is predicted
    assert consolidation["dice"] == 1.0 and consolidation["hd95"] == 0.0
    assert consolidation["global_dice"] == pytest.approx(2 * 8 / (2 * 8 + 2))
    assert consolidation["false_positive_rate"] == 0.5  # predicted on slice 1, not on slice 2
    # The top level scores any foreground class: slice 0 finds 16 of 24 px, slice 1 has 2 px too many,
    # slice 2 is empty in both (1.0).
    assert summary["lesion_classes"] == ["ggo", "consolidation"] and "per_class" in summary["conventions"]
    assert "involvement" not in summary  # no lungs among the classes
    assert summary["dice"] == pytest.approx((2 * 16 / 40 + 2 * 8 / 18 + 1.0) / 3)
    assert summary["per_class"]["ggo"]["lesion_size"]["all"]["num_lesions"] == 2
    assert ggo["hd95_unit"] == "pixels" and ggo["lesion_size"]["area_unit"] == "pixels"  # no spacing given
    markdown = reports.markdown_report({**summary, "split": "test", "step": 0, "threshold": 0.5}, config)
    assert (
        "| ggo | 2 | 0.8333 ± 0.1667 |" in markdown and "| consolidation | 1 | 1.0000 ± 0.0000 |" in markdown
    )
    json.dumps(summary)  # every value is JSON
    unpack, unpack_calls = np.unpackbits, []
    monkeypatch.setattr(np, "unpackbits", lambda *args: unpack_calls.append(1) or unpack(*args))
    rows = list(csv.DictReader(io.StringIO(evaluate_classes.class_slices_csv(collected, config))))
    monkeypatch.undo()
    assert not unpack_calls  # the summary's unpacked masks are read again, not unpacked twice
    table = {(row["id"], row["class"]): row for row in rows}
    assert len(rows) == 6  # 3 slices x 2 classes
    assert table["slice-0", "ggo"] == {
        "id": "slice-0", "class": "ggo", "present": "1", "dice": reports._number(2 * 8 / 24),
        "jaccard": "0.5", "precision": "1", "recall": "0.5", "expert_pixels": "16", "predicted_pixels": "8",
    }  # fmt: skip
    assert table["slice-1", "consolidation"]["present"] == "0"
    assert (
        table["slice-1", "consolidation"]["dice"] == "0"
        and table["slice-1", "consolidation"]["predicted_pixels"] == "2"
    )
    assert table["slice-2", "ggo"]["dice"] == "1" and table["slice-2", "ggo"]["present"] == "0"
    present_ggo = [float(row["dice"]) for row in rows if row["class"] == "ggo" and row["present"] == "1"]
    assert np.mean(present_ggo) == pytest.approx(ggo["dice"])


def test_multilabel_lungs_and_infection_involvement_by_hand():
    config = make_tiny_config()
    config.model.head, config.data.classes = "multilabel", ("lungs", "infection")
    expert, predicted = np.zeros((3, SIZE, SIZE, 2), np.uint8), np.zeros((3, SIZE, SIZE, 2), np.float32)
    expert[0, 0:10, 0:10, 0] = predicted[0, 0:10, 0:10, 0] = 1  # 100 px of lung
    expert[0, 0:5, 0:5, 1] = 1  # 25 px infected: 25 %
    predicted[0, 0:5, 0:10, 1] = 1  # 50 px: 50 %
    expert[1, 10:20, 0:20, 0] = predicted[1, 10:20, 0:20, 0] = 1  # 200 px of lung, expert 0 % infected
    predicted[1, 10:11, 0:20, 1] = 1  # 20 px: 10 %
    expert[2, 20:25, 0:20, 0] = predicted[2, 20:25, 0:20, 0] = 1  # 100 px of lung
    expert[2, 20:22, 0:10, 1] = 1  # 20 px: 20 %
    predicted[2, 20:21, 0:20, 1] = 1  # 20 px: 20 %, 10 of them the experts'
    spacing = np.array([0.7, 0.8, 2.0])  # mm: rows, columns, slices
    records = [
        _record(
            index, expert[index], labels=expert[index], case_id="case", slice_index=index, spacing=spacing
        )
        for index in range(3)
    ]
    collected = evaluate.collect_slices(PlantedPredictor(predicted, "multilabel"), records, config)
    summary = evaluate.summarize_collected(collected, config)

    assert summary["lesion_classes"] == ["infection"]
    assert summary["global_dice"] == pytest.approx(2 * (25 + 10) / (45 + 90))  # infection only, pooled
    report = summary["involvement"]
    assert report["per_slice"]["involvement_mae_points"] == pytest.approx((25 + 10 + 0) / 3)
    assert report["per_slice"]["involvement_pearson_r"] == pytest.approx(
        stats.pearsonr([50, 10, 20], [25, 0, 20])[0]
    )
    assert report["severity_agreement"] == pytest.approx(1 / 3)  # 50-75% vs 25-50%, 5-25% vs <5%, same
    volume = report["volumes"]["case"]
    assert volume["expert"]["involvement_percent"] == pytest.approx(100 * 45 / 400)
    assert volume["predicted"]["involvement_percent"] == pytest.approx(100 * 90 / 400)
    assert volume["expert"]["lung_ml"] == pytest.approx(400 * 0.7 * 0.8 * 2 / 1000)
    assert volume["predicted"]["severity"] == "5-25%"
    assert volume["predicted"]["lung_ml"] == pytest.approx(400 * 0.7 * 0.8 * 2 / 1000)
    # Per class, HD95 is in mm with the slices' pixel spacing (0.7 x 0.8 mm, so not a multiple of the
    # pixels' figure), over the slices whose experts' mask holds the class: infection on slices 0 and 2.
    infection = summary["per_class"]["infection"]
    assert infection["hd95_unit"] == "mm" and infection["lesion_size"]["area_unit"] == "mm^2"
    hd95 = [metrics.hausdorff95(predicted[i, ..., 1] > 0, expert[i, ..., 1] > 0, (0.7, 0.8)) for i in (0, 2)]
    assert infection["hd95"] == pytest.approx(np.mean(hd95))
    in_pixels = [metrics.hausdorff95(predicted[i, ..., 1] > 0, expert[i, ..., 1] > 0) for i in (0, 2)]
    assert abs(np.mean(hd95) - np.mean(in_pixels)) > 0.1
    assert report["per_volume"]["involvement_mae_points"] == pytest.approx(100 * 45 / 400)
    assert [row["involvement_percent"] for row in collected["rows"]] == pytest.approx([50.0, 10.0, 20.0])
    assert [row["expert_involvement_percent"] for row in collected["rows"]] == pytest.approx(
        [25.0, 0.0, 20.0]
    )
    assert "expert_involvement_percent" in reports.slices_csv(collected["rows"]).splitlines()[0]
    # The stored masks are the infection (lungs are not lesion): (TP, FP, FN, TN) of each slice.
    assert [row["original_counts"] for row in collected["rows"]] == [
        (25, 25, 0, 974),
        (0, 20, 0, 1004),
        (10, 10, 10, 994),
    ]
    # Each class's expert lesions in mm^2 (0.7 x 0.8 mm pixels).
    areas = {name: [lesion["area"] for lesion in found] for name, found in collected["class_lesions"].items()}
    assert areas["lungs"] == pytest.approx([56.0, 112.0, 56.0])
    assert areas["infection"] == pytest.approx([14.0, 11.2])


def test_exclusive_lungs_and_infection_involvement_without_case_ids_by_hand():
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = "exclusive", ("lungs", "infection"), "dice_ce"
    # Label 1 lung, 2 infection: an exclusive head's lungs are both (the infection lies in the lung).
    expert, predicted = np.zeros((2, SIZE, SIZE), np.uint8), np.zeros((2, SIZE, SIZE), np.uint8)
    expert[0, 0:10, 0:10] = predicted[0, 0:10, 0:10] = 1  # 100 px of lung
    expert[0, 0:2, 0:10] = 2  # 20 px infected: 20 %
    predicted[0, 0:5, 0:10] = 2  # 50 px: 50 %
    expert[1, 10:20, 0:10] = predicted[1, 10:20, 0:10] = 1  # 100 px, the experts' 0 %
    predicted[1, 10:11, 0:10] = 2  # 10 px: 10 %
    records = [_record(index, expert[index], class_mask=expert[index]) for index in range(2)]
    source = class_labels.LabelledSource(records, config.data, "exclusive")
    predictor = PlantedPredictor([_one_hot(labels, 3) for labels in predicted], "exclusive")
    collected = evaluate.collect_slices(predictor, source, config)
    summary = evaluate.summarize_collected(collected, config)

    report = summary["involvement"]
    assert report["per_slice"]["involvement_mae_points"] == pytest.approx((30 + 10) / 2)
    assert report["expert_mean_percent"] == pytest.approx(10.0)
    assert [row["involvement_percent"] for row in collected["rows"]] == pytest.approx([50.0, 10.0])
    assert [row["expert_involvement_percent"] for row in collected["rows"]] == pytest.approx([20.0, 0.0])
    # Slices without case ids: no volumes.
    assert "per_volume" not in report and "volumes" not in report


def test_involvement_rows_without_lungs_are_empty_and_each_volume_takes_its_own_spacing():
    config = make_tiny_config()
    config.model.head, config.data.classes = "multilabel", ("lungs", "infection")
    masks = np.zeros((2, 4, 4, 2), bool)
    masks[0, :2, :2, 0] = masks[0, 0, 0, 1] = True  # 4 px of lung, 1 infected: 25 %
    # Slice 1 has no lungs in either mask: its involvement is unknown, not 0 (and not NaN in the CSV).
    rows = [
        {"case_id": "a", "slice_spacing": 2.0, "pixel_spacing": (0.5, 0.5)},
        {"case_id": "b", "slice_spacing": 3.0, "pixel_spacing": (1.0, 1.0)},
    ]
    report = evaluate_classes.involvement_section(masks, masks, rows, config, "mm")
    assert rows[0]["involvement_percent"] == rows[0]["expert_involvement_percent"] == 25.0
    assert rows[1]["involvement_percent"] is None and rows[1]["expert_involvement_percent"] is None
    # One slice a volume: each its own spacing (4 voxels of 0.5 x 0.5 x 2 mm; none of 1 x 1 x 3 mm).
    assert report["volumes"]["a"]["expert"]["lung_ml"] == pytest.approx(4 * 0.5 * 0.5 * 2 / 1000)
    assert report["volumes"]["b"]["predicted"]["lung_ml"] == 0.0
    # Without a spacing (pixels), volumes are counted in voxels only, and the rows need none.
    report = evaluate_classes.involvement_section(
        masks, masks, [{"case_id": "a"}, {"case_id": "b"}], config, "pixels"
    )
    assert report["volumes"]["a"]["predicted"]["lung_pixels"] == 4
    assert "lung_ml" not in report["volumes"]["a"]["predicted"]


def test_the_per_class_slice_csv_by_hand_on_3_px_slices():
    # 3 x 3 slices and 2 classes: 18 bits a mask, packed into 3 bytes with 6 bits of padding.
    config = make_tiny_config()
    config.model.head, config.data.classes, config.data.image_size = "exclusive", ("ggo", "consolidation"), 3
    predictions, targets = np.zeros((2, 3, 3, 2), bool), np.zeros((2, 3, 3, 2), bool)
    targets[0, 1, 1, 0] = predictions[0, 1, 1, 0] = True  # ggo: the experts' one pixel, found
    predictions[0, 0, :2, 1] = True  # consolidation: absent, predicted on 2 px
    collected = {
        "rows": [{"id": "s0"}, {"id": "s1"}],  # s1: nothing in either mask
        "packed_classes": [
            (np.packbits(p), np.packbits(t)) for p, t in zip(predictions, targets, strict=True)
        ],
    }
    text = evaluate_classes.class_slices_csv(collected, config)
    assert text == (
        "id,class,present,dice,jaccard,precision,recall,expert_pixels,predicted_pixels\n"
        "s0,ggo,1,1,1,1,1,1,1\n"
        "s1,ggo,0,1,1,1,1,0,0\n"
        "s0,consolidation,0,0,0,0,0,0,2\n"  # recall 0/0 is 0: one mask is not empty (metrics' rule)
        "s1,consolidation,0,1,1,1,1,0,0\n"
    )


def test_class_overlays_outline_each_predicted_class_in_its_colour_over_the_experts_in_white():
    from rdunet_jax import visualize

    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = "exclusive", ("ggo", "consolidation"), "dice_ce"
    expert, predicted = _exclusive_case()
    records = [_record(index, expert[index], class_mask=expert[index]) for index in range(3)]
    source = class_labels.LabelledSource(records, config.data, "exclusive")
    predictor = PlantedPredictor([_one_hot(predicted[0], 3)], "exclusive")
    ((slice_id, rgb),) = evaluate.overlays_of(predictor, source, [0], config)
    assert slice_id == "slice-0" and rgb.shape[0] > SIZE  # the legend below the slice
    picture = rgb[:SIZE, :SIZE]
    ggo, consolidation, white = (
        np.all(picture == colour, axis=-1)
        for colour in (visualize.class_colour(0), visualize.class_colour(1), (255, 255, 255))
    )
    # Slice 0: ggo predicted on the left half (4 x 2) of the expert's 4 x 4, consolidation exactly.
    assert ggo.sum() == 8 and consolidation.sum() == 8
    # The expert ggo's outline (12 px: the 4 x 4 box less its 2 x 2 inside) less the 6 under the prediction's.
    assert white.sum() == 6
    assert set(np.unique(picture[~ggo & ~consolidation & ~white])) == {100}  # the slice itself


def test_a_multi_class_evaluation_writes_a_row_per_slice_and_class(tmp_path, monkeypatch):
    config = make_tiny_config()
    config.model.head, config.data.classes, config.loss = "exclusive", ("ggo", "consolidation"), "dice_ce"
    expert, predicted = _exclusive_case()
    records = [_record(index, expert[index], class_mask=expert[index]) for index in range(3)]
    monkeypatch.setattr(evaluate.datasets, "load_source", lambda data, split: records)
    predictor = PlantedPredictor([_one_hot(labels, 3) for labels in predicted], "exclusive")
    summary = evaluate.evaluate_state(predictor, config, tmp_path, "validation")
    assert (summary["split"], summary["step"], summary["threshold"]) == ("validation", 0, 0.5)
    with (tmp_path / "metrics" / "validation_classes.csv").open() as file:
        rows = [(row["id"], row["class"], row["present"], row["dice"]) for row in csv.DictReader(file)]
    # ggo: 8 of the expert's 16 px (2 x 8 / 24), found exactly, absent from both; consolidation: found
    # exactly, 2 px where the experts drew none, absent from both.
    assert rows == [
        ("slice-0", "ggo", "1", "0.666667"),
        ("slice-1", "ggo", "1", "1"),
        ("slice-2", "ggo", "0", "1"),
        ("slice-0", "consolidation", "1", "1"),
        ("slice-1", "consolidation", "0", "0"),
        ("slice-2", "consolidation", "0", "1"),
    ]


def test_stored_size_counts_of_the_class_heads_by_hand():
    expert = np.zeros((4, 4), np.uint8)
    expert[0, :2] = 1
    # Exclusive: every class is lesion, ggo (2 px, the experts') and consolidation (1 px) alike.
    exclusive = np.zeros((4, 4, 3), np.float32)
    exclusive[..., 0] = 1.0
    exclusive[0, :2], exclusive[1, :1] = (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    counts = evaluate.original_resolution_counts(
        exclusive, expert, 0.5, "exclusive", ("ggo", "consolidation")
    )
    assert counts == (2, 1, 0, 13)
    # Multilabel: lungs are not lesion; the infection channel at the evaluation's threshold (0.4 >= 0.3).
    multilabel = np.zeros((4, 4, 2), np.float32)
    multilabel[..., 0], multilabel[0, :3, 1] = 0.9, 0.4
    counts = evaluate.original_resolution_counts(
        multilabel, expert, 0.3, "multilabel", ("lungs", "infection")
    )
    assert counts == (2, 1, 0, 13)


def test_a_multilabel_heads_batch_masks_take_the_evaluation_threshold():
    config = make_tiny_config()
    config.model.head, config.data.classes = "multilabel", ("lungs", "infection")
    config.eval.threshold = 0.3
    batch = {
        "probabilities": np.full((1, 2, 2, 2), 0.4, np.float32),
        "labels": np.zeros((1, 2, 2, 2), np.int32),
    }
    lesion, _, class_masks, _ = evaluate.batch_masks(batch, config)
    assert class_masks.all() and lesion.all()  # 0.4 >= 0.3 in both channels


@pytest.mark.parametrize(
    "head, classes",
    [
        ("multilabel", ("ggo", "consolidation")),  # "any lesion" is consolidation alone; the stored mask both
        ("exclusive", ("lungs", "infection")),  # "any lesion" is every class; the stored mask infection alone
    ],
)
def test_the_stored_size_scores_the_same_lesion_classes_as_the_model_size(head, classes):
    config = make_tiny_config()
    config.model.head, config.data.classes = head, classes
    label_map = np.zeros((SIZE, SIZE), np.uint8)
    label_map[0:10, 0:10], label_map[20:24, 20:30] = 1, 2  # class 1: 100 px, class 2: 40 px
    channels = (label_map[..., None] == np.arange(1, 3)).astype(np.uint8)
    # The stored binary mask as each dataset has it: COVID-SemiSeg's both classes, Ma et al.'s the infection.
    stored = label_map > 0 if head == "multilabel" else label_map == 2
    record = {
        "id": "slice-0",
        "image": np.full((SIZE, SIZE), 100, np.uint8),
        "mask": stored.astype(np.uint8),
        "labels": channels if head == "multilabel" else label_map,
    }
    planted = channels.astype(np.float32) if head == "multilabel" else _one_hot(label_map, 3)
    collected = evaluate.collect_slices(PlantedPredictor([planted], head), [record], config)
    (row,) = collected["rows"]
    # The prediction is the expert's classes exactly: no error at either size.
    lesion = 40 if head == "multilabel" else 140
    assert (row["tp"], row["fp"], row["fn"]) == (lesion, 0, 0)
    assert row["original_counts"] == (lesion, 0, 0, SIZE * SIZE - lesion)
