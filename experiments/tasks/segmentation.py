"""Semantic segmentation (DeepLabV3 on a dilated ResNet): mean IoU, the logits and layer4 as features.

Images are normalised with the ImageNet mean and std here (torchvision's DeepLabV3 has no transform of its own).
The receptive tokens mask the teacher's ``backbone`` (layer4, before the ASPP head) and/or its ``logits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maskd import MaskLearning
from maskd.mask_learning import MaskLearningOutput
from maskd.tokens import dice_coeff

from ..datasets import kind_of
from ..engine import data as scenes
from ..engine.evaluation import evaluate_segmentation
from ..engine.models import SegmenterConfig, segmenter_forward, segmenter_masked_forward
from ..engine.runtime import device
from .registry import Task, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASKABLE = ("backbone", "logits")


def normalise(images) -> Tensor:
    """ImageNet mean/std, as torchvision's detectors do inside their transform (DeepLabV3 does not)."""
    images = Task.image_tensor(images)
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


class Segmentation(Task):
    name = "segmentation"
    primary_metric = "mIoU"
    secondary_metrics = ()
    model_config = SegmenterConfig
    capabilities = frozenset()

    def input_stride(self, cfg) -> int:
        return cfg.output_stride

    def datasets(self, manifest):
        return kind_of(manifest.data).datasets(manifest.data, self.name)

    def collate(self, batch):
        """``(images [N, 3, H, W], masks [N, H, W])``; images of different sizes (whole validation images of a real
        kind) are padded bottom-right to the largest, images with the ImageNet mean (0 once normalised), masks with
        the ignore label."""
        sizes = {tuple(image.shape[-2:]) for image, _ in batch}
        if len(sizes) <= 1:
            return scenes.collate_segmentation(batch)
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        images = torch.empty(len(batch), 3, height, width).copy_(torch.tensor(IMAGENET_MEAN)[:, None, None])
        masks = torch.full((len(batch), height, width), scenes.IGNORE_INDEX, dtype=torch.int64)
        for i, (image, mask) in enumerate(batch):
            h, w = image.shape[-2:]
            images[i, :, :h, :w] = torch.as_tensor(image).as_subclass(torch.Tensor)
            masks[i, :h, :w] = torch.as_tensor(mask).as_subclass(torch.Tensor)
        return images, masks

    def forward(self, model, images, targets):
        out, feats = segmenter_forward(model, normalise(images))
        return task_losses(out, feats, targets), feats, None

    def select_features(self, cfg, feats, names):
        return [feats[n] for n in names]

    def forward_for_features(self, model, images) -> None:
        segmenter_forward(model, normalise(images))

    def evaluate(self, model, manifest, val_set, gt, progress=True, transforms=None):
        kind = kind_of(manifest.data)
        loader = DataLoader(
            val_set,
            batch_size=kind.eval_batch_size,  # real kinds: 1, whole images of any size (as the official code)
            shuffle=False,
            collate_fn=self.collate,
            num_workers=getattr(manifest.data, "workers", 0),
        )
        model.eval()
        transforms = transforms or {}

        class _Normalised(nn.Module):  # normalisation (and optional feature masking) as in training
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                if not transforms:
                    return segmenter_forward(self.inner, normalise(x))[0]
                return segmenter_masked_forward(
                    self.inner, normalise(x), transforms.get("logits"), transforms.get("backbone")
                )[0]

        num_classes = kind.num_classes(manifest.data, self.name)  # the classes of the ground truth
        metrics = evaluate_segmentation(_Normalised(model), loader, num_classes, device=device(), progress=progress)
        out = {"mIoU": metrics["mIoU"]}
        out.update({f"IoU_{k}": v for k, v in enumerate(metrics["iou_per_class"])})
        return out

    def masked_losses(self, teacher, learner, manifest, names, images, targets):
        transforms, collect = mask_transforms(learner, names)
        out, extras = segmenter_masked_forward(
            teacher, normalise(images), transforms.get("logits"), transforms.get("backbone")
        )
        return task_losses(out, extras, targets), collect()

    def masked_metric(self, teacher, learner, names, manifest, val_set, gt, progress):
        transforms, _ = mask_transforms(learner, names)
        return self.evaluate(teacher, manifest, val_set, gt, progress, transforms)[self.primary_metric]


#: CIRKD / MasKD segmentation: CE + 0.4 x CE on the auxiliary FCN head over layer3 (models with ``aux_loss``)
AUX_WEIGHT = 0.4


def task_losses(out: Tensor, extras: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """The segmentation task loss: cross-entropy on the logits, plus 0.4 x the aux head's where the model has
    one (in training and in the token stage, as the official code; the KD terms use the main logits only)."""
    losses = {"ce": F.cross_entropy(out, targets, ignore_index=scenes.IGNORE_INDEX)}
    if "aux_out" in extras:
        losses["aux_ce"] = AUX_WEIGHT * F.cross_entropy(extras["aux_out"], targets, ignore_index=scenes.IGNORE_INDEX)
    return losses


def mask_transforms(learner: MaskLearning, names: list[str]):
    """Per-feature transforms that mask the teacher's ``backbone`` (layer4) and/or ``logits`` with the tokens of
    the matching level (``names[j]`` -> ``learner.mask_modules[j]``), applied in the forward's order (backbone,
    then the classifier on the masked backbone, then logits), and a function that collects the
    :class:`MaskLearningOutput` (levels in ``names`` order) after the forward."""
    if not names or any(n not in MASKABLE for n in names) or len(set(names)) != len(names):
        raise ValueError(f"segmentation maskd features must be distinct names from {MASKABLE}, got {names}")
    results: dict[str, tuple[Tensor, Tensor]] = {}

    def make(j: int, name: str):
        def transform(feature: Tensor) -> Tensor:
            masked, masks = learner.mask_modules[j].mask_features(feature, impl=learner.impl)
            results[name] = (masked, masks)
            return masked

        return transform

    transforms = {name: make(j, name) for j, name in enumerate(names)}

    def collect() -> MaskLearningOutput:
        feats = [results[n][0] for n in names]
        masks = [results[n][1] for n in names]
        dice = torch.stack([dice_coeff(m.flatten(2)) for m in masks])
        return MaskLearningOutput(feats, dice, masks)

    return transforms, collect


TASK = register(Segmentation())
