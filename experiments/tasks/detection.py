"""Object detection (FCOS / RetinaNet / Faster R-CNN on a ResNet-FPN): COCO box AP, the FPN levels as features.

Features are the FPN outputs of one forward (the detector's training step returns them); the receptive tokens
mask the teacher's FPN levels in place, so its head and losses see the masked features (MasKDHook on the neck).
The frozen teacher of a distillation step runs on the student's transformed batch (one resize for both).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor
from torch.utils.data import DataLoader

from ..datasets import kind_of
from ..engine import data as scenes
from ..engine.evaluation import DETECTION_KEYS, evaluate_detection
from ..engine.models import (
    DetectorConfig,
    DetectorStep,
    backbone_features,
    detector_features_with_masked_forward,
    detector_train_step,
    forward_features,
)
from ..engine.runtime import device
from .registry import Task, register

#: torchvision's GeneralizedRCNNTransform pads every batch to a multiple of 32 (``size_divisible``)
SIZE_DIVISIBLE = 32


class Transformed(NamedTuple):
    """A batch already through a detector's transform (normalised, resized, padded): [N, 3, H, W]."""

    batch: Tensor


class Detection(Task):
    name = "detection"
    primary_metric = "mAP"
    secondary_metrics = tuple(k for k in DETECTION_KEYS if k != "mAP")
    model_config = DetectorConfig
    capabilities = frozenset({"boxes"})

    def input_stride(self, cfg) -> int:
        return SIZE_DIVISIBLE

    def datasets(self, manifest):
        return kind_of(manifest.data).datasets(manifest.data, self.name)

    def collate(self, batch):
        return scenes.collate_detection(batch)

    def forward(self, model, images, targets):
        step = detector_train_step(model, images, targets)
        return step.losses, {"fpn": step.features}, step

    def select_features(self, cfg, feats, names):
        order = list(self.features(cfg))
        return [feats["fpn"][order.index(n)] for n in names]

    def teacher_input(self, images, extras):
        # The student's transformed batch: one resize for both models, also when it is drawn at random
        return Transformed(extras.batch) if isinstance(extras, DetectorStep) else images

    def forward_for_features(self, model, images) -> None:
        if isinstance(images, Transformed):
            backbone_features(model, images.batch)
        else:
            forward_features(model, images)

    def evaluate(self, model, manifest, val_set, gt, progress=True):
        """COCO box AP against the ground truth ``gt``: the embedded scenes' annotation file (labels are its
        category ids), or a real kind's :class:`~experiments.datasets.coco.CocoTruth` (labels 1..K mapped back to
        the file's category ids; the file's image ids; boxes in original image coordinates, since evaluation images
        are not resized by the data set and the detector maps its boxes back)."""
        loader = DataLoader(
            val_set,
            batch_size=kind_of(manifest.data).eval_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=getattr(manifest.data, "workers", 0),
        )
        model.eval()
        annotations, category_ids = getattr(gt, "annotations", gt), getattr(gt, "category_ids", None)
        return evaluate_detection(
            model, loader, annotations, device=device(), progress=progress, category_ids=category_ids
        )

    def masked_losses(self, teacher, learner, manifest, names, images, targets):
        order = list(self.features(manifest.teacher))
        idx = [order.index(n) for n in names]
        outputs = {}

        def transform(levels):
            out = learner([levels[i] for i in idx])
            outputs["out"] = out
            replaced = list(levels)
            for j, i in enumerate(idx):
                replaced[i] = out.features[j]
            return replaced

        losses = detector_features_with_masked_forward(teacher, images, targets, transform)
        return losses, outputs["out"]

    def masked_metric(self, teacher, learner, names, manifest, val_set, gt, progress):
        order = list(self.features(manifest.teacher))
        idx = [order.index(n) for n in names]
        backbone = teacher.backbone
        original_forward = backbone.forward

        def masked_backbone(x):
            feats = original_forward(x)
            keys = list(feats)
            out = learner([feats[keys[i]] for i in idx])
            for j, i in enumerate(idx):
                feats[keys[i]] = out.features[j]
            return feats

        backbone.forward = masked_backbone
        try:
            return self.evaluate(teacher, manifest, val_set, gt, progress)[self.primary_metric]
        finally:
            del backbone.forward


TASK = register(Detection())
