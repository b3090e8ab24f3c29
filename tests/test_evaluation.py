"""Tests for experiments.engine.evaluation: COCO box AP via faster-coco-eval and mIoU via torchmetrics."""

from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.engine.data import (
    DET_MODEL_NUM_CLASSES,
    NUM_SEG_CLASSES,
    SceneConfig,
    collate_detection,
    collate_segmentation,
    detection_dataset,
    generate_scenes,
    segmentation_dataset,
)
from experiments.engine.evaluation import (
    DETECTION_KEYS,
    coco_stats_from_predictions,
    detections_to_coco_results,
    evaluate_detection,
    evaluate_segmentation,
    iou_from_confusion,
)


def _gt(boxes_per_image: list[list[tuple[int, list[float]]]], size: int = 200) -> dict:
    """A COCO GT dict from ``[[(category_id, [x, y, w, h]), ...] per image]``."""
    images = [
        {"id": i + 1, "file_name": f"{i + 1}.png", "width": size, "height": size} for i in range(len(boxes_per_image))
    ]
    anns = []
    for i, boxes in enumerate(boxes_per_image):
        for cat, (x, y, w, h) in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k, "name": str(k - 1)} for k in range(1, 11)]
    return {"images": images, "annotations": anns, "categories": cats}


# Small (20²), medium (50²) and large (110²) boxes over three images and three categories.
GT = _gt(
    [
        [(1, [10, 10, 20, 20]), (2, [60, 60, 50, 50])],
        [(3, [5, 5, 110, 110]), (1, [150, 150, 20, 20])],
        [(2, [100, 20, 50, 50])],
    ]
)


def _perfect(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
        for a in gt["annotations"]
    ]


# ---------------------------------------------------------------------------------------------- detection
def test_perfect_predictions_score_100():
    stats = coco_stats_from_predictions(GT, _perfect(GT))
    assert list(stats) == list(DETECTION_KEYS)
    assert all(v == pytest.approx(100.0) for v in stats.values())


def test_shifted_boxes_score_lower():
    shifted = [
        dict(p, bbox=[p["bbox"][0] + 0.15 * p["bbox"][2], p["bbox"][1], p["bbox"][2], p["bbox"][3]])
        for p in _perfect(GT)
    ]
    stats = coco_stats_from_predictions(GT, shifted)
    assert stats["AP50"] == pytest.approx(100.0)  # IoU 0.74 still matches at 0.5 ...
    assert stats["AP75"] == pytest.approx(0.0)  # ... but not at 0.75
    assert 0.0 < stats["mAP"] < 100.0


def test_no_predictions_give_zero_and_empty_ranges_nan():
    stats = coco_stats_from_predictions(GT, [])
    assert all(v == 0.0 for v in stats.values())
    no_large = _gt([[(1, [10, 10, 20, 20])]])
    stats = coco_stats_from_predictions(no_large, [])
    assert stats["mAP"] == 0.0 and stats["AP_S"] == 0.0
    assert math.isnan(stats["AP_M"]) and math.isnan(stats["AP_L"])  # COCOeval's -1: no GT in that range


def test_predictions_are_not_modified():
    preds = _perfect(GT)
    before = [dict(p) for p in preds]
    coco_stats_from_predictions(GT, preds)
    assert preds == before


def test_image_subset():
    # Only image 1 evaluated: perfect there, so the misses on images 2-3 do not count.
    preds = [p for p in _perfect(GT) if p["image_id"] == 1]
    assert coco_stats_from_predictions(GT, preds, image_ids=[1])["mAP"] == pytest.approx(100.0)
    assert coco_stats_from_predictions(GT, preds)["mAP"] < 100.0


def test_faster_coco_eval_agrees_with_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    preds = []
    for p in _perfect(GT):
        for _ in range(3):  # jittered duplicates with random scores, and wrong-class false positives
            x, y, w, h = p["bbox"]
            jitter = rng.normal(0, 0.08 * w, size=4)
            cat = p["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 11))
            preds.append(
                {
                    "image_id": p["image_id"],
                    "category_id": cat,
                    "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                    "score": float(rng.random()),
                }
            )
    ours = coco_stats_from_predictions(GT, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: list(v) for k, v in GT.items()}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(p, bbox=list(p["bbox"])) for p in preds]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    reference = [math.nan if s < 0 else s * 100 for s in ev.stats[:6]]
    assert 0 < ours["mAP"] < 100
    np.testing.assert_allclose([ours[k] for k in DETECTION_KEYS], reference, atol=1e-9)


def test_detections_to_coco_results_converts_xyxy_to_xywh():
    out = {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([3]),
    }
    empty = {
        "boxes": torch.zeros((0, 4)),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    res = detections_to_coco_results([4, 5], [out, empty])
    assert res == [{"image_id": 4, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 5.0], "score": 0.5}]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cfg = SceneConfig(image_size=64, num_train=1, num_val=4, digit_size_px=(8.0, 60.0), clutter=1)
    return generate_scenes(cfg, root=tmp_path_factory.mktemp("scenes"), progress=False)


class _Oracle(nn.Module):
    """Returns pre-computed outputs in loader order (the loader is not shuffled)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.calls = 0

    def forward(self, images):
        n = len(images)
        out, self.outputs = self.outputs[:n], self.outputs[n:]
        self.calls += 1
        return out


def test_evaluate_detection_with_oracle_and_empty_model(scenes):
    ds = detection_dataset(scenes, "val")
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    truth = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for _, t in ds]
    oracle = _Oracle(truth).train()
    ann = scenes / "annotations" / "instances_val.json"
    stats = evaluate_detection(oracle, loader, ann, progress=False)
    assert stats["mAP"] == pytest.approx(100.0) and stats["AP50"] == pytest.approx(100.0)
    assert oracle.training  # the training flag is restored

    nothing = [
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ] * len(ds)
    stats = evaluate_detection(_Oracle(nothing), loader, ann, progress=False)
    assert stats["mAP"] == 0.0


def test_evaluate_detection_runs_a_torchvision_retinanet(scenes):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class TinyBackbone(nn.Module):
        out_channels = 8

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())

        def forward(self, x):
            return OrderedDict([("0", self.body(x))])

    torch.manual_seed(0)
    model = RetinaNet(
        TinyBackbone(),
        num_classes=DET_MODEL_NUM_CLASSES,
        min_size=64,
        max_size=64,
        anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((1.0,),)),
    )
    loader = DataLoader(detection_dataset(scenes, "val"), batch_size=2, collate_fn=collate_detection)
    stats = evaluate_detection(model, loader, scenes / "annotations" / "instances_val.json", progress=True)
    assert set(stats) == set(DETECTION_KEYS)
    assert all(math.isnan(v) or 0.0 <= v <= 100.0 for v in stats.values())


# ---------------------------------------------------------------------------------------------- segmentation
class _Logits(nn.Module):
    """Returns fixed logits (optionally wrapped in {"out": ...} like torchvision segmentation models)."""

    def __init__(self, logits: torch.Tensor, as_dict: bool = False):
        super().__init__()
        self.logits, self.as_dict = logits, as_dict

    def forward(self, images):
        return {"out": self.logits} if self.as_dict else self.logits


def _one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()


def test_hand_computed_miou():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])  # the pixel under 255 is wrong but ignored
    loader = [(torch.zeros(1, 3, 2, 3), target)]
    res = evaluate_segmentation(_Logits(_one_hot_logits(pred, 3)), loader, num_classes=3, progress=False)
    # class 0: inter 1 / union 2; class 1: 2 / 3; class 2: 1 / 1
    assert res["iou_per_class"] == pytest.approx([50.0, 200.0 / 3, 100.0])
    assert res["mIoU"] == pytest.approx((50.0 + 200.0 / 3 + 100.0) / 3)


def test_iou_from_confusion_marks_absent_classes_nan():
    confmat = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    res = iou_from_confusion(confmat)
    assert res["iou_per_class"][:2] == pytest.approx([75.0, 200.0 / 3])
    assert math.isnan(res["iou_per_class"][2])
    assert res["mIoU"] == pytest.approx((75.0 + 200.0 / 3) / 2)


def test_perfect_logits_on_scenes_give_100_with_upsampling(scenes):
    loader = DataLoader(segmentation_dataset(scenes, "val"), batch_size=4, collate_fn=collate_segmentation)
    _, masks = next(iter(loader))
    # Perfect logits everywhere except the ignore pixels, where they are deliberately wrong.
    pred = torch.where(masks == 255, torch.full_like(masks, 3), masks)
    res = evaluate_segmentation(
        _Logits(_one_hot_logits(pred, NUM_SEG_CLASSES), as_dict=True),
        loader,
        num_classes=NUM_SEG_CLASSES,
        progress=False,
    )
    assert res["mIoU"] == pytest.approx(100.0)
    assert len(res["iou_per_class"]) == NUM_SEG_CLASSES

    # Half-resolution logits are upsampled to the label size (constant logits survive bilinear resizing).
    low = torch.zeros(masks.shape[0], NUM_SEG_CLASSES, 32, 32)
    low[:, 0] = 1.0
    res = evaluate_segmentation(_Logits(low), loader, num_classes=NUM_SEG_CLASSES, progress=False)
    background_share = ((masks == 0).sum() / (masks != 255).sum()).item()
    assert res["iou_per_class"][0] == pytest.approx(100.0 * background_share)
