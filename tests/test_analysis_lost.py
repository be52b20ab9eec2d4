"""LOST on planted objects, keys from the qkv hook, CorLoc of known boxes and of a small dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.analysis import (
    DatasetError,
    box_iou,
    connected_component,
    corloc,
    evaluate_corloc,
    lost,
    lost_boxes,
    lost_features,
    read_box_dataset,
)


def planted_features(height=10, width=12, rows=(3, 6), cols=(4, 9), dim=8, seed=0):
    """Background patches share feature b, object patches share o with o·b < 0, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.zeros(height, width, dim)
    features[..., 0] = 1.0
    features[rows[0] : rows[1], cols[0] : cols[1]] = torch.tensor([-0.3, 1.0] + [0.0] * (dim - 2))
    return (features + 0.05 * torch.randn(height, width, dim, generator=generator)).reshape(-1, dim)


def test_lost_finds_planted_object_box():
    features = planted_features()
    result = lost(features, (10, 12), patch_size=14, k=100)
    assert result.box == [4 * 14, 3 * 14, 9 * 14, 6 * 14]
    seed_row, seed_col = divmod(result.seed, 12)
    assert 3 <= seed_row < 6 and 4 <= seed_col < 9
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[3:6, 4:9] = True
    assert torch.equal(result.mask, expected)
    assert result.similarity.shape == (10, 12) and result.degree.shape == (10, 12)
    assert result.detected and result.degenerate is None
    # a bias large enough to make every entry positive gives a box over the whole image, clipped to its size, and
    # says that it is no detection: every patch has the same degree
    everything = lost(features, (10, 12), patch_size=14, bias=100.0, image_size=(130, 160))
    assert everything.box == [0.0, 0.0, 160.0, 130.0]
    assert not everything.detected and "same degree" in everything.degenerate


def test_lost_degree_leaves_out_the_self_similarity_as_the_authors():
    features = planted_features()
    result = lost(features, (10, 12), patch_size=14)
    affinity = features.double() @ features.double().T
    affinity.fill_diagonal_(0)  # LOST's patch_scoring: zero diagonal, negatives to 0, count entries above 0
    affinity[affinity < 0] = 0
    assert torch.equal(result.degree.flatten(), (affinity > 0).sum(dim=1))
    assert int(result.degree.max()) <= 10 * 12 - 1  # at most every other patch


def test_lost_ties_take_the_first_patch_in_raster_order():
    features = torch.ones(3, 4, 2).reshape(-1, 2)  # every similarity positive: every degree equal
    features[5] = torch.tensor([1.0, 3.0])  # still positive with all: a tie of 12 patches
    result = lost(features, (3, 4), patch_size=14)
    assert result.seed == 0 and int(result.degree.min()) == int(result.degree.max()) == 11
    assert not result.detected and "no seed" in result.degenerate


def test_lost_mask_over_the_whole_image_is_no_detection():
    # 3 x 3 grid: patch 8 has the lowest degree (it meets only patch 4), but its similarity map is positive everywhere
    features = torch.tensor([[1.0, 0.0]] * 9)
    features[4] = torch.tensor([1.0, 5.0])
    features[8] = torch.tensor([-0.1, 1.0])
    result = lost(features, (3, 3), patch_size=14)
    assert result.seed == 8 and result.degree.flatten().tolist() == [7, 7, 7, 7, 8, 7, 7, 7, 1]
    assert result.mask.all() and result.box == [0.0, 0.0, 42.0, 42.0]
    assert not result.detected and "whole image" in result.degenerate


def test_lost_object_touching_the_border_and_rectangular_patches():
    features = planted_features(rows=(0, 2), cols=(10, 12))
    assert lost(features, (10, 12), patch_size=(16, 14)).box == [140.0, 0.0, 168.0, 32.0]
    with pytest.raises(ValueError, match="features"):
        lost(features, (9, 12), patch_size=14)
    with pytest.raises(ValueError, match="k must be"):
        lost(features, (10, 12), patch_size=14, k=0)


def test_connected_component_is_four_connected():
    mask = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    assert connected_component(mask, (0, 0)).nonzero().tolist() == [[0, 0], [0, 1]]
    assert connected_component(mask, (1, 2)).nonzero().tolist() == [[1, 2], [2, 2]]
    assert not connected_component(mask, (1, 1)).any()


def test_box_iou_and_corloc_of_known_boxes():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 20]) == 0.5
    predictions = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    truths = [
        [[0, 0, 10, 10]],  # exact
        [[50, 50, 60, 60], [0, 0, 10, 19.9]],  # second box has IoU 0.5025: counts
        [[5, 0, 15, 10]],  # IoU 1/3
        [[0, 0, 10, 21]],  # IoU < 0.5
        [[0, 0, 10, 20]],  # IoU exactly 0.5: wrong, as in LOST
    ]
    assert corloc(predictions, truths) == 0.4
    with pytest.raises(ValueError):
        corloc(predictions, truths[:2])
    with pytest.raises(ValueError):
        corloc([], [])


def lost_bbox_iou(box, other, eps=1e-7):
    """LOST's `datasets.bbox_iou` (from YOLOv5) for one pair of xyxy boxes, re-implemented from reading it."""
    inter = max(min(box[2], other[2]) - max(box[0], other[0]), 0) * max(
        min(box[3], other[3]) - max(box[1], other[1]), 0
    )
    w1, h1 = box[2] - box[0], box[3] - box[1] + eps
    w2, h2 = other[2] - other[0], other[3] - other[1] + eps
    return inter / (w1 * h1 + w2 * h2 - inter + eps)


@pytest.mark.parametrize(
    "prediction,truth",
    [
        ([0, 0, 10, 10], [0, 0, 10, 20]),  # IoU exactly 0.5
        ([0, 0, 100, 100], [0, 0, 100, 200]),  # IoU exactly 0.5, larger boxes
        ([0, 0, 224, 224], [0, 0, 224, 112]),  # IoU exactly 0.5, half of the image
        ([0, 0, 10, 10], [0, 0, 10, 19.999]),  # just above 0.5
        ([14, 28, 70, 84], [0, 0, 64, 64]),
    ],
)
def test_corloc_boundary_is_losts(prediction, truth):
    from vit_registers.analysis.lost import LOST_IOU_EPS, is_correct_localization

    assert LOST_IOU_EPS == 1e-7
    assert box_iou(prediction, truth, eps=LOST_IOU_EPS) == pytest.approx(lost_bbox_iou(prediction, truth), rel=1e-12)
    assert is_correct_localization(prediction, [truth]) == (lost_bbox_iou(prediction, truth) >= 0.5)
    if box_iou(prediction, truth) == 0.5:
        assert not is_correct_localization(prediction, [truth])


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kwargs
    )
    return ViTRegistersModel(config).eval()


@pytest.mark.parametrize("kind,index", [("queries", 0), ("keys", 1), ("values", 2)])
def test_lost_features_read_the_layers_qkv(kind, index):
    model = tiny_model(num_register_tokens=3)
    pixels = torch.randn(2, 3, 28, 42)
    got = lost_features(model, pixels, layer=0, kind=kind)
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[0]
        layer = model.encoder.layer[0]
        qkv = layer.attention.qkv(layer.norm1(hidden))
    expected = qkv[..., index * 32 : (index + 1) * 32][:, 4:]  # skip CLS + 3 registers
    torch.testing.assert_close(got, expected)


def test_lost_boxes_on_models_without_cls_or_registers():
    for kwargs in (
        dict(num_register_tokens=2),
        dict(use_cls_token=False, cls_token_has_position_embedding=False, num_register_tokens=0, pooling="mean"),
    ):
        model = tiny_model(**kwargs)
        results = lost_boxes(model, torch.randn(2, 3, 42, 56))
        for result in results:
            x0, y0, x1, y1 = result.box
            assert 0 <= x0 < x1 <= 56 and 0 <= y0 < y1 <= 42
            assert x0 % 14 == 0 and y1 % 14 == 0
        tokens = lost_features(model, torch.randn(1, 3, 28, 28), kind="tokens")
        assert tokens.shape == (1, 4, 32)
    with pytest.raises(ValueError, match="feature kind"):
        lost_features(model, torch.randn(1, 3, 28, 28), kind="pixels")


def write_dataset(root):
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 60)), ("b.png", (60, 40)), ("c.png", (40, 60))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        {"file_name": "a.png", "objects": {"bbox": [[0, 0, 60, 40]]}},
        {"file_name": "b.png", "objects": {"bbox": [[0, 0, 5, 5], [10, 10, 20, 30]]}},
        {"file_name": "c.png", "objects": {"bbox": [[0, 0, 60, 40]]}},
        {"file_name": "nobox.png"},
        {"file_name": "empty.png", "objects": {"bbox": []}},
        {"file_name": "bad.png", "objects": {"bbox": [[1, 2, 3]]}},
        {"file_name": "broken.jpg", "objects": {"bbox": [[0, 0, 5, 5]]}},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")


def test_read_box_dataset_reports_rows_without_boxes(tmp_path):
    write_dataset(tmp_path)
    samples, problems = read_box_dataset(tmp_path)
    assert [s.path.rsplit("/", 1)[-1] for s in samples] == ["a.png", "b.png", "c.png", "broken.jpg"]
    text = "\n".join(problems)
    assert "nobox.png has no boxes" in text and "empty.png has no boxes" in text
    assert "bad.png" in text and "not valid JSON" in text
    xywh, _ = read_box_dataset(tmp_path, box_format="xywh")
    assert xywh[1].boxes[1] == [10.0, 10.0, 30.0, 40.0]
    with pytest.raises(DatasetError, match="not a directory"):
        read_box_dataset(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match="no metadata.jsonl"):
        read_box_dataset(tmp_path / "sub")


def test_evaluate_corloc_on_a_small_dataset(tmp_path):
    write_dataset(tmp_path)
    model = tiny_model(num_register_tokens=2)
    result = evaluate_corloc(model, 28, tmp_path, batch_size=2, progress=False)
    assert result.num_images == 3
    assert any("broken.jpg" in message for message in result.skipped)
    assert len(result.skipped) == 5
    by_name = {item["file"].rsplit("/", 1)[-1]: item for item in result.per_image}
    # a whole-image box is correct for a and c exactly when the LOST box covers more than half the image
    for name in ("a.png", "c.png"):
        x0, y0, x1, y1 = by_name[name]["box"]
        assert 0 <= x0 < x1 <= 60.01 and 0 <= y0 < y1 <= 40.01
        assert by_name[name]["correct"] == (lost_bbox_iou(by_name[name]["box"], [0, 0, 60, 40]) >= 0.5)
    assert result.num_correct == sum(item["correct"] for item in result.per_image)
    degenerate = [item for item in result.per_image if item["degenerate"] is not None]
    assert result.to_dict()["num_degenerate"] == result.num_degenerate == len(degenerate)
    assert result.corloc == pytest.approx(result.num_correct / 3)
    assert result.to_dict()["num_skipped"] == 5


def test_evaluate_corloc_square_inputs_and_bad_batch_size(tmp_path):
    write_dataset(tmp_path)
    model = tiny_model()
    square = evaluate_corloc(model, 28, tmp_path, batch_size=3, square=True, short_side=42, progress=False)
    assert square.num_images == 3
    for item in square.per_image:
        x0, y0, x1, y1 = item["box"]
        width, height = (40, 60) if item["file"].endswith("b.png") else (60, 40)
        assert 0 <= x0 < x1 <= width + 0.01 and 0 <= y0 < y1 <= height + 0.01
        # boxes come from a 3x3 grid of 14-pixel patches mapped back to the original size
        assert (x1 - x0) * 3 / width == pytest.approx(round((x1 - x0) * 3 / width), abs=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_corloc(model, 28, tmp_path, batch_size=0, progress=False)


def test_dataset_in_split_folders(tmp_path):
    (tmp_path / "train").mkdir()
    write_dataset(tmp_path / "train")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    write_dataset(tmp_path / "deep" / "er")  # two levels down: not part of this dataset
    samples, problems = read_box_dataset(tmp_path)
    assert len(samples) == 4 and all("/train/" in s.path for s in samples)
