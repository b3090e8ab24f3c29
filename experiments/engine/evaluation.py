"""Evaluation for the embedded benchmark: COCO box mAP (faster-coco-eval) and semantic-segmentation mIoU.

Conventions
-----------
* All metrics are returned in percent points (0..100), as in the MasKD tables.
* Detection: COCO's standard protocol (IoU 0.50:0.95, 101 recall points, at most 100 detections per
  image, COCO area ranges small < 32² <= medium < 96² <= large, using each GT annotation's ``area``).
  COCOeval reports -1 for an area range without any ground-truth box; that is mapped to ``NaN`` ("not
  defined") rather than to 0, so a config without large digits cannot look like a failed detector. A
  model that predicts nothing gets 0.0 wherever ground truth exists.
* Segmentation: per-class IoU from the confusion matrix accumulated over the whole loader
  (``MulticlassJaccardIndex(average="none", ignore_index=255)``). A class whose union is empty (absent from
  both the labels and the predictions of every non-ignored pixel) has IoU ``NaN`` and is left out of the
  mean; a class that is predicted but never labelled has IoU 0 and counts. Ignore pixels are excluded
  from both prediction and target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = [
    "DETECTION_KEYS",
    "coco_stats_from_predictions",
    "detections_to_coco_results",
    "evaluate_detection",
    "evaluate_segmentation",
    "iou_from_confusion",
]

DETECTION_KEYS = ("mAP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
"""Keys of :func:`evaluate_detection`'s result, in the order of COCOeval's first six ``stats``."""


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """Swallow faster-coco-eval's progress and summary printing (it prints a table per evaluation)."""


# --------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------
def detections_to_coco_results(
    image_ids: Sequence[int],
    outputs: Sequence[Mapping[str, torch.Tensor]],
    category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Convert torchvision detector outputs to COCO result dicts.

    ``outputs[i]`` holds ``boxes`` (XYXY, [n, 4]), ``scores`` [n] and ``labels`` [n] for image
    ``image_ids[i]``. Without ``category_ids``, labels are taken as COCO category ids unchanged (the embedded
    scenes' convention: ``num_classes = 11``, label = category id; a label that is not a GT category is ignored by
    COCOeval). With them, label ``k`` (1..K) is category ``category_ids[k - 1]`` (contiguous labels of a real
    annotation file) and any other label (0, never a training target) is dropped.
    """
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
    results: list[dict[str, Any]] = []
    for image_id, out in zip(image_ids, outputs):
        boxes = torch.as_tensor(out["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = torch.as_tensor(out["scores"]).detach().cpu().tolist()
        labels = torch.as_tensor(out["labels"]).detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            if category_ids is not None:
                if not 1 <= int(label) <= len(category_ids):
                    continue
                label = category_ids[int(label) - 1]
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)})
    return results


def _load_gt(coco_gt: str | Path | Mapping[str, Any] | Any):
    from faster_coco_eval import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, Mapping):
        return COCO(dict(coco_gt), use_deepcopy=True, print_function=_quiet)
    return COCO(str(coco_gt), print_function=_quiet)


def coco_stats_from_predictions(
    coco_gt: str | Path | Mapping[str, Any] | Any,
    predictions: Iterable[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO bbox AP of ``predictions`` against ``coco_gt`` with faster-coco-eval, in percent.

    Args:
        coco_gt: path to a COCO instances JSON, the JSON as a dict, or a ``faster_coco_eval.COCO``.
        predictions: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
            (not modified).
        image_ids: restrict the evaluation to these images (e.g. when a loader covers a subset); default
            all images of ``coco_gt``. Images in the set without predictions count as misses.

    Returns:
        ``{"mAP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"}``; ``NaN`` where the ground truth has no box in an
        area range (COCOeval's -1), 0.0 where there are boxes but no (correct) predictions.
    """
    from faster_coco_eval import COCOeval_faster

    gt = _load_gt(coco_gt)
    # loadRes adds id/area/segmentation keys to the dicts it gets: give it copies.
    results = [dict(p, bbox=[float(v) for v in p["bbox"]]) for p in predictions]
    dt = gt.loadRes(results)
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
    if image_ids is not None:
        evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = np.asarray(evaluator.stats[: len(DETECTION_KEYS)], dtype=np.float64)
    return {key: (math.nan if value < 0 else float(value) * 100.0) for key, value in zip(DETECTION_KEYS, stats)}


def _as_image_list(images: torch.Tensor | Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    # Plain tensors: the detector's own transform does arithmetic that need not see tv_tensors subclasses.
    return [torch.as_tensor(img).as_subclass(torch.Tensor).to(device) for img in images]


def evaluate_detection(
    model: torch.nn.Module,
    loader: Iterable,
    coco_gt: str | Path | Mapping[str, Any] | Any,
    device: torch.device | str = "cpu",
    progress: bool = True,
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO box AP (percent) of a torchvision-style detector over ``loader``.

    ``loader`` yields ``(images, targets)`` as produced by ``collate_detection`` (a list or batched tensor of
    [3, H, W] images, targets with ``image_id``). The model is run in eval mode under
    ``torch.inference_mode`` and must return a list of dicts ``boxes`` (XYXY) / ``scores`` / ``labels`` in
    input-image coordinates; its training flag is restored afterwards. Only the images the loader visited
    are evaluated. ``category_ids`` maps contiguous labels back to the file's ids
    (:func:`detections_to_coco_results`). See :func:`coco_stats_from_predictions` for the returned keys and NaN
    convention.
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc="eval detection", unit="batch", disable=not progress):
                outputs = model(_as_image_list(images, device))
                ids = [int(t["image_id"]) for t in targets]
                seen.extend(ids)
                results.extend(detections_to_coco_results(ids, outputs, category_ids))
    finally:
        model.train(was_training)
    return coco_stats_from_predictions(coco_gt, results, image_ids=seen)


# --------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------
def iou_from_confusion(confmat: torch.Tensor) -> dict[str, Any]:
    """mIoU and per-class IoU (percent) from a [K, K] confusion matrix (rows = target, cols = prediction).

    Classes with an empty union get ``NaN`` and are excluded from ``mIoU`` (``NaN`` if every class is empty).
    """
    confmat = confmat.to(torch.float64)
    inter = torch.diag(confmat)
    union = confmat.sum(0) + confmat.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan)) * 100.0
    valid = union > 0
    miou = float(iou[valid].mean()) if bool(valid.any()) else math.nan
    return {"mIoU": miou, "iou_per_class": [float(v) for v in iou]}


def evaluate_segmentation(
    model: torch.nn.Module,
    loader: Iterable,
    num_classes: int,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Mean IoU (percent) of a segmentation model over ``loader``.

    ``loader`` yields ``(images [N,3,H,W], masks [N,H,W])``. The model returns logits ``[N, K, h, w]`` or a
    dict with ``"out"`` (torchvision segmentation models); logits whose size differs from the labels are
    resized bilinearly (``align_corners=False``) before the argmax. The confusion matrix is accumulated with
    torchmetrics' ``MulticlassJaccardIndex(num_classes, average="none", ignore_index)``.

    Returns:
        ``{"mIoU": float, "iou_per_class": list[float]}`` (see :func:`iou_from_confusion` for absent classes).
    """
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=num_classes, average="none", ignore_index=ignore_index).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, masks in tqdm(loader, desc="eval segmentation", unit="batch", disable=not progress):
                images = torch.as_tensor(images).as_subclass(torch.Tensor).to(device)
                masks = torch.as_tensor(masks).as_subclass(torch.Tensor).to(device).long()
                out = model(images)
                logits = out["out"] if isinstance(out, Mapping) else out
                if logits.shape[-2:] != masks.shape[-2:]:
                    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
                metric.update(logits.argmax(dim=1), masks)
    finally:
        model.train(was_training)
    return iou_from_confusion(metric.confmat)
