"""Object detection (FCOS / RetinaNet on a ResNet-FPN): COCO box AP, FPN levels P3-P7 as features.

Features are the FPN outputs of one forward (the detector's training step returns them); the receptive tokens
mask the teacher's FPN levels in place, so its head and losses see the masked features (MasKDHook on the neck).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from ..engine import data as scenes
from ..engine.evaluation import DETECTION_KEYS, evaluate_detection
from ..engine.models import DetectorConfig, detector_features_with_masked_forward, detector_train_step, forward_features
from ..engine.runtime import device
from .registry import Task, register

#: torchvision's GeneralizedRCNNTransform pads every batch to a multiple of 32 (``size_divisible``)
SIZE_DIVISIBLE = 32


class Detection(Task):
    name = "detection"
    primary_metric = "mAP"
    secondary_metrics = tuple(k for k in DETECTION_KEYS if k != "mAP")
    model_config = DetectorConfig
    capabilities = frozenset({"boxes"})

    def input_stride(self, cfg) -> int:
        return SIZE_DIVISIBLE

    def datasets(self, manifest):
        root = scenes.generate_scenes(manifest.data, progress=True)
        return (
            scenes.detection_dataset(root, "train"),
            scenes.detection_dataset(root, "val"),
            root / "annotations" / "instances_val.json",
        )

    def collate(self, batch):
        return scenes.collate_detection(batch)

    def forward(self, model, images, targets):
        step = detector_train_step(model, images, targets)
        return step.losses, {"fpn": step.features}, step

    def select_features(self, cfg, feats, names):
        order = list(self.features(cfg))
        return [feats["fpn"][order.index(n)] for n in names]

    def forward_for_features(self, model, images) -> None:
        forward_features(model, images)

    def evaluate(self, model, manifest, val_set, gt, progress=True):
        loader = DataLoader(val_set, batch_size=16, shuffle=False, collate_fn=self.collate)
        model.eval()
        return evaluate_detection(model, loader, gt, device=device(), progress=progress)

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
