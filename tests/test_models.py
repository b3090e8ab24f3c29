"""Model builders, feature declarations and one-pass forward helpers, each checked on one real forward.

Sizes are shrunk (64x64 images, batch 2) so the file runs in seconds on one core.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from experiments.engine.models import (
    DEFAULT_DETECTION_STUDENT,
    DEFAULT_DETECTION_TEACHER,
    DEFAULT_SEGMENTATION_STUDENT,
    DEFAULT_SEGMENTATION_TEACHER,
    DetectorConfig,
    SegmenterConfig,
    build_detector,
    build_model,
    build_resnet_body,
    build_segmenter,
    count_parameters,
    detector_features_with_masked_forward,
    detector_train_step,
    feature_info,
    feature_shape,
    forward_features,
    segmenter_forward,
    segmenter_masked_forward,
)
from experiments.engine.recorder import FeatureRecorder

SIZE, BATCH = 64, 2

DETECTORS = {
    "teacher": dataclasses.replace(DEFAULT_DETECTION_TEACHER, image_size=SIZE),
    "student": dataclasses.replace(DEFAULT_DETECTION_STUDENT, image_size=SIZE),
    "fcos_student": dataclasses.replace(DEFAULT_DETECTION_STUDENT, arch="fcos", image_size=SIZE),
    "resnet50": DetectorConfig(backbone="resnet50", width=16, image_size=SIZE),
}
SEGMENTERS = {
    "teacher": DEFAULT_SEGMENTATION_TEACHER,
    "student": DEFAULT_SEGMENTATION_STUDENT,
    "resnet50_os16_aux": SegmenterConfig(
        backbone="resnet50",
        width=16,
        output_stride=16,
        aspp_channels=32,
        atrous_rates=(2, 4, 6),
        aux_loss=True,
    ),
}


def _images_and_targets(size: int = SIZE, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, size, size, generator=gen)
    targets = []
    for num_boxes in (3, 1):
        corner = torch.rand(num_boxes, 2, generator=gen) * size * 0.5
        extent = 6 + torch.rand(num_boxes, 2, generator=gen) * size * 0.4
        boxes = torch.cat([corner, (corner + extent).clamp(max=size)], dim=1)
        labels = torch.randint(1, 11, (num_boxes,), generator=gen)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_train_step_matches_torchvision_forward_and_declared_features(name):
    cfg = DETECTORS[name]
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    images, targets = _images_and_targets()

    # Reference: torchvision's own forward, FPN captured by a hook on the declared module.
    specs = feature_info(cfg)
    modules = {spec.module for spec in specs.values()}
    assert modules == {"backbone.fpn"}
    with FeatureRecorder(model, ["backbone.fpn"], detach=True) as rec:
        expected_losses = model(list(images), targets)
    hooked = rec.get("backbone.fpn")

    step = detector_train_step(model, images, targets)
    assert step.losses.keys() == expected_losses.keys()
    for key, loss in step.losses.items():
        assert torch.isfinite(loss), key
        torch.testing.assert_close(loss, expected_losses[key])

    # Declared channels/strides against the real shapes; strides apply to the padded batch.
    assert step.batch_shape == (SIZE, SIZE) and step.image_sizes == [(SIZE, SIZE)] * BATCH
    assert len(step.features) == len(specs) == cfg.num_levels == 5
    for (level, spec), feature in zip(specs.items(), step.features, strict=True):
        assert tuple(feature.shape) == feature_shape(spec, BATCH, *step.batch_shape), level
        torch.testing.assert_close(feature.detach(), hooked[spec.key])

    # Every parameter is trained by the task loss, and gradients are finite.
    sum(step.losses.values()).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname

    # Identity transform before the head changes nothing.
    masked = detector_features_with_masked_forward(model, images, targets, lambda feats: list(feats))
    for key, loss in masked.items():
        torch.testing.assert_close(loss, step.losses[key])

    model.eval()
    with torch.no_grad():
        detections = model(list(images))
        teacher_feats = forward_features(model, images)
        eval_step = detector_train_step(model, images, targets)  # losses also in eval mode (BN running stats)
    for feat, eval_feat in zip(teacher_feats, eval_step.features, strict=True):
        torch.testing.assert_close(feat, eval_feat)
    assert all(torch.isfinite(loss) for loss in eval_step.losses.values())
    assert len(detections) == BATCH
    for det in detections:
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] <= 100
        assert ((det["labels"] >= 0) & (det["labels"] < cfg.num_classes)).all()


def test_detector_targets_are_returned_in_transformed_coordinates():
    # 48-pixel inputs are resized to image_size=64 and padded to a multiple of 32 (64): boxes scale by 4/3.
    cfg = DETECTORS["student"]
    model = build_detector(cfg).train()
    images, targets = _images_and_targets(size=48)
    step = detector_train_step(model, images, targets)
    assert step.image_sizes == [(64, 64)] * BATCH and step.batch_shape == (64, 64)
    for original, transformed in zip(targets, step.targets, strict=True):
        torch.testing.assert_close(transformed["boxes"], original["boxes"] * (64 / 48))
        assert torch.equal(transformed["labels"], original["labels"])
    assert targets[0]["boxes"].max() <= 48  # the caller's targets are not modified


def test_masked_forward_feeds_the_transformed_levels_to_the_head():
    cfg = DETECTORS["student"]
    torch.manual_seed(0)
    model = build_detector(cfg).eval()  # eval: BN uses running stats, so both calls see the same features
    images, targets = _images_and_targets()
    seen = []

    def zero_p3(feats):
        seen.append([f.shape for f in feats])
        return [torch.zeros_like(feats[0]), *feats[1:]]

    plain = detector_train_step(model, images, targets).losses
    masked = detector_features_with_masked_forward(model, images, targets, zero_p3)
    assert len(seen) == 1 and len(seen[0]) == 5
    assert masked["classification"] != plain["classification"]

    with pytest.raises(ValueError, match="transform_fpn must return one tensor per FPN level"):
        detector_features_with_masked_forward(model, images, targets, lambda feats: feats[:4])


def test_degenerate_boxes_are_rejected():
    model = build_detector(DETECTORS["student"]).train()
    images, targets = _images_and_targets()
    targets[1]["boxes"] = torch.tensor([[10.0, 10.0, 10.0, 20.0]])
    with pytest.raises(ValueError, match="target 1: box .* no positive width/height"):
        detector_train_step(model, images, targets)


def test_anchor_rule_mirrors_torchvision_default():
    # torchvision's _default_anchorgen: (x, int(x * 2^(1/3)), int(x * 2^(2/3))) per level, 3 aspect ratios.
    coco = DetectorConfig(anchor_sizes=(32, 64, 128, 256, 512), image_size=800)
    default = torchvision.models.detection.retinanet._default_anchorgen()
    assert coco.anchor_generator().sizes == default.sizes
    assert coco.anchor_generator().aspect_ratios == default.aspect_ratios
    assert DEFAULT_DETECTION_STUDENT.anchor_generator().sizes[0] == (8, 10, 12)
    fcos = dataclasses.replace(DEFAULT_DETECTION_STUDENT, arch="fcos").anchor_generator()
    assert fcos.num_anchors_per_location() == [1] * 5


def test_detector_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"backbone='resnet152' is not supported; allowed: 'resnet10'"):
        DetectorConfig(backbone="resnet152")
    with pytest.raises(ValueError, match="arch='fasterrcnn'"):
        DetectorConfig(arch="fasterrcnn")
    with pytest.raises(ValueError, match="anchor_sizes has 4 entries for 5 FPN levels"):
        DetectorConfig(anchor_sizes=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="returned_layers must be consecutive"):
        DetectorConfig(returned_layers=(2, 4))
    with pytest.raises(ValueError, match="fpn_channels=48 must be a multiple of 32"):
        DetectorConfig(fpn_channels=48)
    DetectorConfig(fpn_channels=48, head_group_norm=False)  # the plain RetinaNet head takes any width


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_segmenter_forward_matches_torchvision_forward_and_declared_features(name):
    cfg = SEGMENTERS[name]
    torch.manual_seed(0)
    model = build_segmenter(cfg).eval()  # eval: ASPP dropout off, so two forwards agree
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    specs = feature_info(cfg)
    assert list(specs) == ["logits", "backbone"]

    with torch.no_grad(), FeatureRecorder(model, [spec.module for spec in specs.values()]) as rec:
        expected = model(images)
        out, feats = segmenter_forward(model, images)
    torch.testing.assert_close(out, expected["out"])
    assert out.shape == (BATCH, cfg.num_classes, SIZE, SIZE)
    for key, spec in specs.items():
        assert tuple(feats[key].shape) == feature_shape(spec, BATCH, SIZE, SIZE), key
        torch.testing.assert_close(feats[key], rec.get(spec.module))  # last call = segmenter_forward's
    if cfg.aux_loss:
        torch.testing.assert_close(feats["aux_out"], expected["aux"])

    # Train mode: CE with the ignore label, every parameter gets a finite gradient.
    model.train()
    labels = torch.randint(0, cfg.num_classes, (BATCH, SIZE, SIZE))
    labels[:, :4] = 255
    out, feats = segmenter_forward(model, images)
    loss = F.cross_entropy(out, labels, ignore_index=255)
    if cfg.aux_loss:
        loss = loss + 0.4 * F.cross_entropy(feats["aux_out"], labels, ignore_index=255)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname


def test_segmenter_masked_forward():
    cfg = SEGMENTERS["student"]
    torch.manual_seed(0)
    model = build_segmenter(cfg).eval()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    with torch.no_grad():
        plain, plain_feats = segmenter_forward(model, images)
        same, _ = segmenter_masked_forward(model, images, lambda logits: logits)
        # One masked copy per token, [N, T, K, h, w], as MasKD's segmentation stage 1 may produce.
        masks = torch.rand(BATCH, 3, 1, SIZE // 8, SIZE // 8)
        per_token, feats = segmenter_masked_forward(model, images, lambda logits: logits[:, None] * masks)
    torch.testing.assert_close(same, plain)
    assert per_token.shape == (BATCH, 3, cfg.num_classes, SIZE, SIZE)
    torch.testing.assert_close(feats["logits"], plain_feats["logits"])  # the dict keeps unmasked logits
    ones = torch.ones_like(masks)
    with torch.no_grad():
        unmasked, _ = segmenter_masked_forward(model, images, lambda logits: logits[:, None] * ones)
    torch.testing.assert_close(unmasked[:, 1], plain)


def test_output_stride_8_dilates_basic_blocks():
    # torchvision's BasicBlock refuses dilation; ours keeps the map at stride 8 with dilated 3x3 convs.
    body = build_resnet_body("resnet18", width=16, dilate=(False, True, True))
    assert body.stage_strides == (4, 8, 8, 8)
    assert body.layer4[1].conv1.dilation == (4, 4) and body.layer4[0].conv1.dilation == (2, 2)
    assert body(torch.randn(1, 3, 64, 64)).shape == (1, 128, 8, 8)
    with pytest.raises(ValueError, match="output_stride=4"):
        SegmenterConfig(output_stride=4)


# ---------------------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_64_body_has_torchvision_state_dict_layout(name):
    # So ImageNet weights could be loaded for the paper-scale runs (strict=False: no fc).
    ours = build_resnet_body(name).state_dict()
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_teachers_are_much_larger_than_students():
    sizes = {}
    for key, cfg in {
        "det_teacher": DEFAULT_DETECTION_TEACHER,
        "det_student": DEFAULT_DETECTION_STUDENT,
        "seg_teacher": DEFAULT_SEGMENTATION_TEACHER,
        "seg_student": DEFAULT_SEGMENTATION_STUDENT,
    }.items():
        sizes[key] = count_parameters(build_model(cfg))
    assert sizes["det_teacher"] >= 3 * sizes["det_student"]
    assert sizes["seg_teacher"] >= 3 * sizes["seg_student"]
    # Teacher and student FPNs match, so FitNet/CWD/FGD/MasKD compare FPN levels without an adapter.
    assert feature_info(DEFAULT_DETECTION_TEACHER) == feature_info(DEFAULT_DETECTION_STUDENT)
    assert feature_info(DEFAULT_SEGMENTATION_TEACHER)["logits"] == feature_info(DEFAULT_SEGMENTATION_STUDENT)["logits"]


def test_count_parameters_and_feature_shape():
    layer = torch.nn.Conv2d(3, 4, 3)
    assert count_parameters(layer) == 3 * 4 * 9 + 4
    layer.bias.requires_grad_(False)
    assert count_parameters(layer, trainable_only=True) == 3 * 4 * 9
    spec = feature_info(DEFAULT_DETECTION_STUDENT)["P7"]
    assert spec.stride == 128 and spec.key == "p7"
    assert feature_shape(spec, 2, 160, 96) == (2, 64, math.ceil(160 / 128), 1)
    with pytest.raises(TypeError):
        feature_info(object())
