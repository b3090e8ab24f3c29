"""The paper's models (issue 8): Faster R-CNN / RetinaNet / FCOS on ResNet-50/101-FPN, DeepLabV3 / PSPNet on dilated
ResNet-18/101 and MobileNetV2; weights from files; the mmdetection converter; student export.

Paper architectures at a small input (64x96, batch 1 for detectors, 2 for segmenters, whose pooling branches
need two values per channel for BatchNorm in train mode), random weights, files the tests write themselves.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from experiments.engine import convert_mmdet as conv
from experiments.engine.export import export_student, plain_torchvision_model
from experiments.engine.models import (
    DetectorConfig,
    SegmenterConfig,
    build_model,
    detector_features_with_masked_forward,
    detector_train_step,
    feature_info,
    feature_shape,
    forward_features,
    segmenter_forward,
    segmenter_masked_forward,
)
from experiments.engine.recorder import FeatureRecorder
from experiments.engine.weights import (
    WeightsError,
    check_weights,
    load_state_dict_file,
    resolve_weights,
    weight_file_digests,
)

H, W = 64, 96

# The paper's detectors at their COCO shapes (fpn 256, width 64, 81 columns), input shrunk to 64x96.
COCO = {"fpn_channels": 256, "num_classes": 81, "image_size": H, "max_size": W}
PRETRAINED = {"norm": "frozen_batchnorm", "trainable_layers": 3}  # torchvision's choice with ImageNet weights
RCNN = {"arch": "faster_rcnn", "returned_layers": (1, 2, 3, 4), "anchor_sizes": (32, 64, 128, 256, 512)}
RETINA = {"arch": "retinanet", "anchor_sizes": (32, 64, 128, 256, 512)}
DETECTORS = {
    "faster_rcnn_r50": DetectorConfig(backbone="resnet50", scales_per_octave=1, **RCNN, **COCO, **PRETRAINED),
    "faster_rcnn_r101": DetectorConfig(backbone="resnet101", scales_per_octave=1, **RCNN, **COCO, **PRETRAINED),
    # mmdet's RetinaNet: no head norm, P6 from C5, no ReLU before P7
    "retinanet_r50_mmdet": DetectorConfig(
        backbone="resnet50", head_group_norm=False, extra_levels_from="c5", p7_relu=False, **RETINA, **COCO
    ),
    # torchvision's retinanet_resnet50_fpn_v2 layout, on ResNet-101
    "retinanet_r101_v2": DetectorConfig(backbone="resnet101", extra_levels_from="c5", **RETINA, **COCO, **PRETRAINED),
    "fcos_r50": DetectorConfig(arch="fcos", backbone="resnet50", **COCO, **PRETRAINED),
}
SEG = {"num_classes": 19}
SEGMENTERS = {
    "deeplabv3_r101_aux": SegmenterConfig(backbone="resnet101", aux_loss=True, **SEG),
    "deeplabv3_r18_aux": SegmenterConfig(backbone="resnet18", aux_loss=True, **SEG),
    "pspnet_r18_aux": SegmenterConfig(arch="pspnet", backbone="resnet18", aux_loss=True, **SEG),
    "pspnet_r101": SegmenterConfig(arch="pspnet", backbone="resnet101", **SEG),
    "deeplabv3_mbv2": SegmenterConfig(backbone="mobilenet_v2", aspp_channels=128, **SEG),  # CIRKD's head width
}


def _images_and_targets(batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, H, W, generator=gen)
    targets = []
    for _ in range(batch):
        corner = torch.rand(2, 2, generator=gen) * torch.tensor([W, H]) * 0.5
        extent = 8 + torch.rand(2, 2, generator=gen) * 30
        boxes = torch.cat([corner, corner + extent], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (2,), generator=gen)})
    return images, targets


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DETECTORS))
def test_paper_detector_train_step_features_and_eval(name):
    cfg = DETECTORS[name]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, targets = _images_and_targets()
    specs = feature_info(cfg)
    expected_names = ["P2", "P3", "P4", "P5", "P6"] if cfg.arch == "faster_rcnn" else ["P3", "P4", "P5", "P6", "P7"]
    assert list(specs) == expected_names

    # The hand-run forward gives torchvision's own losses (same RNG: the RPN and RoI heads sample at random).
    torch.manual_seed(1)
    with FeatureRecorder(model, ["backbone.fpn"], detach=True) as rec:
        expected = model(list(images), targets)
    torch.manual_seed(1)
    step = detector_train_step(model, images, targets)
    assert step.losses.keys() == expected.keys()
    for key, loss in step.losses.items():
        assert torch.isfinite(loss), key
        torch.testing.assert_close(loss, expected[key])
    assert step.batch_shape == (H, W) and step.image_sizes == [(H, W)]
    for (level, spec), feature in zip(specs.items(), step.features, strict=True):
        assert tuple(feature.shape) == feature_shape(spec, 1, H, W), level
        torch.testing.assert_close(feature.detach(), rec.get("backbone.fpn")[spec.key])

    sum(step.losses.values()).backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        else:
            assert param.grad is None, pname

    model.eval()
    with torch.no_grad():
        detections = model(list(images))
        teacher_feats = forward_features(model, images)
        eval_losses = detector_train_step(model, images, targets).losses  # frozen-teacher losses, BN in eval
    assert all(torch.isfinite(loss) for loss in eval_losses.values())
    assert not any(m.training for m in model.modules())  # the heads' train mode was only borrowed
    for feature, spec in zip(teacher_feats, specs.values(), strict=True):
        assert tuple(feature.shape) == feature_shape(spec, 1, H, W)
    assert detections[0]["boxes"].shape[1] == 4 and detections[0]["boxes"].shape[0] <= cfg.detections_per_img
    assert ((detections[0]["labels"] >= 0) & (detections[0]["labels"] < cfg.num_classes)).all()


def test_faster_rcnn_masked_forward_feeds_rpn_and_roi_heads():
    cfg = DETECTORS["faster_rcnn_r50"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, targets = _images_and_targets()
    torch.manual_seed(2)
    plain = detector_train_step(model, images, targets).losses
    torch.manual_seed(2)
    same = detector_features_with_masked_forward(model, images, targets, lambda levels: list(levels))
    for key, loss in plain.items():
        torch.testing.assert_close(same[key], loss)
    seen = []

    def zero_p2(levels):
        seen.append([tuple(level.shape) for level in levels])
        return [torch.zeros_like(levels[0]), *levels[1:]]

    torch.manual_seed(2)
    masked = detector_features_with_masked_forward(model, images, targets, zero_p2)
    assert len(seen[0]) == 5 and seen[0][0][-2:] == (H // 4, W // 4)
    assert masked["loss_objectness"] != plain["loss_objectness"]


def test_trainable_layers_freeze_stem_and_layer1_as_torchvision():
    model = build_model(DETECTORS["faster_rcnn_r50"])
    body = model.backbone.body
    frozen = {name.split(".")[0] for name, p in body.named_parameters() if not p.requires_grad}
    trained = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}  # FrozenBN: no parameters
    reference = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, trainable_layers=3
    )
    assert {n for n, p in reference.named_parameters() if p.requires_grad} == {
        n for n, p in model.backbone.named_parameters() if p.requires_grad
    }
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    default = build_model(DetectorConfig())
    assert all(p.requires_grad for p in default.parameters())  # the default still trains everything


def test_extra_levels_from_c5_and_p7_relu():
    torch.manual_seed(0)
    cfg = DETECTORS["retinanet_r50_mmdet"]
    model = build_model(cfg).eval()
    extra = model.backbone.fpn.extra_blocks
    assert extra.p6.weight.shape == (256, 2048, 3, 3) and not extra.use_P5
    images, _ = _images_and_targets()
    with torch.no_grad():
        levels = forward_features(model, images)
        torch.testing.assert_close(levels[4], extra.p7(levels[3]))  # mmdet: no ReLU between P6 and P7
        relu = build_model(dataclasses.replace(cfg, p7_relu=True)).eval()
        relu.load_state_dict(model.state_dict())
        torch.testing.assert_close(forward_features(relu, images)[4], extra.p7(F.relu(levels[3])))
    # a C5 as wide as the FPN still counts as C5 (torchvision would guess P5 from equal widths)
    narrow = build_model(DetectorConfig(backbone="resnet18", width=32, fpn_channels=256, extra_levels_from="c5"))
    assert not narrow.backbone.fpn.extra_blocks.use_P5
    assert build_model(DetectorConfig()).backbone.fpn.extra_blocks.use_P5


def test_max_size_keeps_the_aspect_ratio():
    # frozen BatchNorm: the square 16x32 resize leaves C5 at 1x1, where train-mode BatchNorm needs a batch > 1
    cfg = dataclasses.replace(DETECTORS["retinanet_r50_mmdet"], image_size=32, max_size=96, **PRETRAINED)
    model = build_model(cfg).train()
    images = torch.rand(1, 3, 48, 96)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    step = detector_train_step(model, images, targets)
    # min side 48 -> 32 would need scale 2/3; the long side 96 -> 64 stays under max_size, so scale 2/3
    assert step.image_sizes == [(32, 64)] and step.batch_shape == (32, 64)
    square = build_model(dataclasses.replace(cfg, max_size=0)).train()
    assert detector_train_step(square, images, targets).image_sizes == [(16, 32)]  # max side = image_size


def test_new_fields_at_their_defaults_leave_the_hashed_spec_unchanged():
    from experiments.engine.models import DEFAULT_DETECTION_TEACHER, DEFAULT_SEGMENTATION_STUDENT, hash_spec

    for cfg in (DEFAULT_DETECTION_TEACHER, DEFAULT_SEGMENTATION_STUDENT):
        spec = hash_spec(cfg)
        assert not {"weights", "backbone_weights", "trainable_layers", "max_size"} & set(spec)
        assert hash_spec(dataclasses.replace(cfg, weights="x.pt"))["weights"] == "x.pt"
        assert check_weights(cfg) == [] and weight_file_digests(cfg) == {}


def test_paper_detector_config_validation():
    with pytest.raises(ValueError, match="anchor_sizes has 5 entries for 4 FPN levels .* \\+ P6\\)"):
        DetectorConfig(arch="faster_rcnn")  # P3..P5 + P6
    with pytest.raises(ValueError, match="extra_levels_from and p7_relu apply to retinanet/fcos"):
        DetectorConfig(extra_levels_from="c5", **RCNN)
    with pytest.raises(ValueError, match="extra_levels_from='c4'"):
        DetectorConfig(extra_levels_from="c4")
    with pytest.raises(ValueError, match="trainable_layers=6"):
        DetectorConfig(trainable_layers=6)
    with pytest.raises(ValueError, match="max_size=64 must be 0 or at least image_size=128"):
        DetectorConfig(max_size=64)


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_paper_segmenter_train_step_features_and_eval(name):
    cfg = SEGMENTERS[name]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randn(2, 3, H, W)
    labels = torch.randint(0, cfg.num_classes, (2, H, W))
    labels[:, :4] = 255
    specs = feature_info(cfg)
    assert list(specs) == ["logits", "backbone"]
    with FeatureRecorder(model, [spec.module for spec in specs.values()], detach=True) as rec:
        out, feats = segmenter_forward(model, images)
    assert out.shape == (2, cfg.num_classes, H, W)
    for key, spec in specs.items():
        assert tuple(feats[key].shape) == feature_shape(spec, 2, H, W), key
        torch.testing.assert_close(feats[key].detach(), rec.get(spec.module))
    loss = F.cross_entropy(out, labels, ignore_index=255)
    if cfg.aux_loss:  # CIRKD/MasKD ResNet students: + 0.4 x CE of the FCN head on layer3
        assert feats["aux_out"].shape == out.shape
        loss = loss + 0.4 * F.cross_entropy(feats["aux_out"], labels, ignore_index=255)
    else:
        assert "aux_out" not in feats
    assert torch.isfinite(loss)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname

    model.eval()
    with torch.no_grad():
        expected = model(images)
        out, feats = segmenter_forward(model, images)
        masked, _ = segmenter_masked_forward(model, images, lambda logits: logits * 0)
    torch.testing.assert_close(out, expected["out"])
    assert torch.count_nonzero(masked) == 0


def test_mobilenet_v2_is_dilated_as_cirkd():
    model = build_model(SEGMENTERS["deeplabv3_mbv2"])
    features = model.backbone

    def depthwise(index):
        return [
            m for m in features[str(index)].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        ][0]

    assert depthwise(4).stride == (2, 2)  # stride 8 is reached at block 4
    assert (depthwise(7).stride, depthwise(7).dilation) == ((1, 1), (1, 1))  # formerly strided: half the rate
    assert {depthwise(i).dilation for i in range(8, 14)} == {(2, 2)}
    assert (depthwise(14).stride, depthwise(14).dilation) == ((1, 1), (2, 2))
    assert {depthwise(i).dilation for i in range(15, 18)} == {(4, 4)}
    assert len(features) == 18 and feature_info(SEGMENTERS["deeplabv3_mbv2"])["backbone"].channels == 320


def test_pspnet_head_and_segmenter_validation():
    model = build_model(SEGMENTERS["pspnet_r18_aux"])
    psp = model.classifier[0]
    assert [stage[0].output_size for stage in psp.stages] == [1, 2, 3, 6]
    assert psp.out_channels == 1024 and model.classifier[1].out_channels == 128  # CIRKD: 512 -> 128
    assert build_model(SEGMENTERS["pspnet_r101"]).classifier[1].out_channels == 256  # CIRKD: 2048 -> 256
    with pytest.raises(ValueError, match="aux_loss needs a ResNet backbone"):
        SegmenterConfig(backbone="mobilenet_v2", aux_loss=True)
    with pytest.raises(ValueError, match="arch='pspnet2'"):
        SegmenterConfig(arch="pspnet2")


# ---------------------------------------------------------------------------------------------------------
# Weights from files
# ---------------------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_backbone_weights_load_torchvision_imagenet_layout(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)  # the layout of ResNet50_Weights.IMAGENET1K_V1 (with fc)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    cfg = dataclasses.replace(DETECTORS["retinanet_r50_mmdet"], backbone_weights=str(path), **PRETRAINED)
    assert check_weights(cfg) == []
    model = build_model(cfg)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[5].conv2.weight, resnet.layer3[5].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, resnet.bn1.running_var)

    # dilated ResNet-18 (segmentation), trainable BatchNorm: num_batches_tracked loads too
    resnet18 = torchvision.models.resnet18(weights=None)
    resnet18.bn1.num_batches_tracked.fill_(7)
    torch.save({"state_dict": resnet18.state_dict()}, tmp_path / "r18.pth")  # mmcv-style wrapper accepted
    seg = build_model(dataclasses.replace(SEGMENTERS["deeplabv3_r18_aux"], backbone_weights=str(tmp_path / "r18.pth")))
    torch.testing.assert_close(seg.backbone.layer4[1].conv2.weight, resnet18.layer4[1].conv2.weight)
    assert int(seg.backbone.bn1.num_batches_tracked) == 7

    # MobileNetV2: features.0..17 load, classifier.* and the unused features.18 are ignored
    mbv2 = torchvision.models.mobilenet_v2(weights=None)
    torch.save(mbv2.state_dict(), tmp_path / "mbv2.pth")
    cfg = dataclasses.replace(SEGMENTERS["deeplabv3_mbv2"], backbone_weights=str(tmp_path / "mbv2.pth"))
    seg = build_model(cfg)
    torch.testing.assert_close(seg.backbone["17"].conv[2].weight, mbv2.features[17].conv[2].weight)


def test_whole_model_weights_roundtrip_and_wrappers(tmp_path):
    cfg = SEGMENTERS["pspnet_r18_aux"]
    torch.manual_seed(3)
    trained = build_model(cfg)
    state = trained.state_dict()
    for name, payload in {
        "bare.pt": state,
        "wrapped.pt": {"model": state, "epoch": 3},
        "ddp.pt": {f"module.{k}": v for k, v in state.items()},
    }.items():
        torch.save(payload, tmp_path / name)
        torch.manual_seed(4)
        loaded = build_model(dataclasses.replace(cfg, weights=str(tmp_path / name))).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
    digests = weight_file_digests(dataclasses.replace(cfg, weights=str(tmp_path / "bare.pt")))
    assert list(digests) == ["weights"] and re.fullmatch("[0-9a-f]{64}", digests["weights"])
    assert weight_file_digests(cfg) == {}


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    path = tmp_path / "deeplab.pt"
    torch.save(build_model(SEGMENTERS["deeplabv3_r18_aux"]).state_dict(), path)
    cfg = dataclasses.replace(SEGMENTERS["pspnet_r18_aux"], weights=str(path))
    with pytest.raises(WeightsError) as exc:
        build_model(cfg)
    text = _one_line(exc)
    assert str(path) in text and "missing keys (classifier.0.stages.0.1.weight" in text
    assert "unexpected keys (classifier.0.convs.0.0.weight" in text
    [problem] = check_weights(cfg)
    assert problem.startswith("weights: ") and str(path) in problem

    # same keys, another width: shapes named
    narrow = tmp_path / "resnet50_w32.pt"
    torch.save(build_model(DetectorConfig(backbone="resnet50", width=32)).backbone.body.state_dict(), narrow)
    cfg = dataclasses.replace(DETECTORS["retinanet_r50_mmdet"], backbone_weights=str(narrow))
    with pytest.raises(WeightsError) as exc:
        build_model(cfg)
    text = _one_line(exc)
    assert "shape mismatches (conv1.weight: file [32, 3, 7, 7] vs model [64, 3, 7, 7]" in text
    assert text.startswith(f"backbone_weights {narrow} does not fit the backbone body (backbone.body)")

    # beyond the parts of an ImageNet file a body leaves out (fc, unused stages), a foreign key is refused
    resnet = torchvision.models.resnet50(weights=None).state_dict()
    resnet["layer2.0.extra.weight"] = torch.zeros(1)
    torch.save(resnet, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match=r"1 unexpected keys \(layer2.0.extra.weight\)"):
        build_model(dataclasses.replace(DETECTORS["retinanet_r50_mmdet"], backbone_weights=str(tmp_path / "odd.pt")))


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError) as exc:
        build_model(dataclasses.replace(SEGMENTERS["deeplabv3_r18_aux"], weights=str(missing)))
    assert _one_line(exc) == f"weights file {missing} not found"

    # a torchvision name resolves in the hub cache and is never downloaded
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = dataclasses.replace(DETECTORS["retinanet_r50_mmdet"], backbone_weights="ResNet50_Weights.IMAGENET1K_V1")
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(WeightsError) as exc:
        build_model(cfg)
    text = _one_line(exc)
    assert f"expected the file {expected}" in text and "nothing is downloaded" in text
    [problem] = check_weights(cfg)
    assert str(expected) in problem
    expected.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), expected)
    assert resolve_weights("ResNet50_Weights.IMAGENET1K_V1") == expected and check_weights(cfg) == []
    with pytest.raises(WeightsError, match="ResNet50_Weights.NOPE: not a torchvision weights name"):
        resolve_weights("ResNet50_Weights.NOPE")

    # not a state dict, and a pickle weights_only refuses
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_state_dict_file(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "cfg": dataclasses.replace(DetectorConfig())}, tmp_path / "pickle.pt")
    with pytest.raises(WeightsError) as exc:
        load_state_dict_file(tmp_path / "pickle.pt")
    assert "torch.load(weights_only=True) refused it" in _one_line(exc)


# ---------------------------------------------------------------------------------------------------------
# mmdetection converter (synthetic mmdet 2.x state dicts, built from mmdet's key names)
# ---------------------------------------------------------------------------------------------------------


def _randn(*shape):
    return torch.randn(*shape)


def _mmdet_bn(prefix, channels):
    # random but tame statistics, so 100 layers of them keep the activations finite
    return {
        f"{prefix}.weight": 1 + 0.1 * _randn(channels),
        f"{prefix}.bias": 0.1 * _randn(channels),
        f"{prefix}.running_mean": 0.1 * _randn(channels),
        f"{prefix}.running_var": torch.rand(channels) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(100),
    }


def _mmdet_resnet(depth: int) -> dict:
    """mmdet's ResNet (style='pytorch') keys: conv1, bn1, layerN.B.{conv,bn}{1,2,3}, layerN.0.downsample.{0,1}."""
    bottleneck = depth >= 50
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    out = {"backbone.conv1.weight": _randn(64, 3, 7, 7) * 0.1, **_mmdet_bn("backbone.bn1", 64)}
    inplanes = 64
    for stage, count in enumerate(blocks, start=1):
        planes = 64 * 2 ** (stage - 1)
        width = planes * (4 if bottleneck else 1)
        for b in range(count):
            p = f"backbone.layer{stage}.{b}"
            cin = inplanes if b == 0 else width
            if bottleneck:
                convs = [(cin, planes, 1), (planes, planes, 3), (planes, width, 1)]
            else:
                convs = [(cin, planes, 3), (planes, planes, 3)]
            for i, (ci, co, k) in enumerate(convs, start=1):
                out[f"{p}.conv{i}.weight"] = _randn(co, ci, k, k) * (2 / (ci * k * k)) ** 0.5
                out.update(_mmdet_bn(f"{p}.bn{i}", co))
            if b == 0 and (cin != width or stage > 1):
                out[f"{p}.downsample.0.weight"] = _randn(width, cin, 1, 1) * (1 / cin) ** 0.5
                out.update(_mmdet_bn(f"{p}.downsample.1", width))
        inplanes = width
    return out


def _mmdet_conv(prefix, cout, cin, k, bias=True):
    out = {f"{prefix}.weight": _randn(cout, cin, k, k) * 0.05}
    if bias:
        out[f"{prefix}.bias"] = _randn(cout) * 0.1
    return out


def _mmdet_fpn(in_channels, extra_in=(), fpn=256):
    out = {}
    for i, cin in enumerate(in_channels):
        out.update(_mmdet_conv(f"neck.lateral_convs.{i}.conv", fpn, cin, 1))
        out.update(_mmdet_conv(f"neck.fpn_convs.{i}.conv", fpn, fpn, 3))
    for j, cin in enumerate(extra_in):
        out.update(_mmdet_conv(f"neck.fpn_convs.{len(in_channels) + j}.conv", fpn, cin, 3))
    return out


def _mmdet_retinanet(depth=50, classes=80, anchors=9, fpn=256):
    c = 2048 if depth >= 50 else 512
    state = {**_mmdet_resnet(depth), **_mmdet_fpn([c // 4, c // 2, c], extra_in=(c, fpn), fpn=fpn)}
    for branch in ("cls", "reg"):
        for i in range(4):
            state.update(_mmdet_conv(f"bbox_head.{branch}_convs.{i}.conv", fpn, fpn, 3))
    state.update(_mmdet_conv("bbox_head.retina_cls", anchors * classes, fpn, 3))
    state.update(_mmdet_conv("bbox_head.retina_reg", anchors * 4, fpn, 3))
    return state


def _mmdet_faster_rcnn(depth=50, classes=80):
    state = {**_mmdet_resnet(depth), **_mmdet_fpn([256, 512, 1024, 2048])}
    state.update(_mmdet_conv("rpn_head.rpn_conv", 256, 256, 3))
    state.update(_mmdet_conv("rpn_head.rpn_cls", 3, 256, 1))
    state.update(_mmdet_conv("rpn_head.rpn_reg", 12, 256, 1))
    for name, (cout, cin) in {
        "shared_fcs.0": (1024, 256 * 49),
        "shared_fcs.1": (1024, 1024),
        "fc_cls": (classes + 1, 1024),
        "fc_reg": (4 * classes, 1024),
    }.items():
        state[f"roi_head.bbox_head.{name}.weight"] = _randn(cout, cin) * 0.01
        state[f"roi_head.bbox_head.{name}.bias"] = _randn(cout)
    return state


def _mmdet_fcos(depth=50, classes=80, fpn=256):
    c = 2048 if depth >= 50 else 512
    state = {**_mmdet_resnet(depth), **_mmdet_fpn([c // 4, c // 2, c], extra_in=(fpn, fpn), fpn=fpn)}
    for branch in ("cls", "reg"):
        for i in range(4):
            state.update(_mmdet_conv(f"bbox_head.{branch}_convs.{i}.conv", fpn, fpn, 3, bias=False))
            state[f"bbox_head.{branch}_convs.{i}.gn.weight"] = _randn(fpn)
            state[f"bbox_head.{branch}_convs.{i}.gn.bias"] = _randn(fpn)
    state.update(_mmdet_conv("bbox_head.conv_cls", classes, fpn, 3))
    state.update(_mmdet_conv("bbox_head.conv_reg", 4, fpn, 3))
    state.update(_mmdet_conv("bbox_head.conv_centerness", 1, fpn, 3))
    state.update({f"bbox_head.scales.{i}.scale": torch.tensor(1.0 + i) for i in range(5)})
    return state


def test_convert_mmdet_retinanet_columns_and_anchor_order():
    torch.manual_seed(0)
    cfg = DETECTORS["retinanet_r50_mmdet"]
    mmdet = _mmdet_retinanet()
    converted, report = conv.convert_mmdet({"meta": {}, "state_dict": mmdet}, cfg)
    assert report.complete, report
    model = build_model(cfg).eval()
    model.load_state_dict(converted, strict=True)
    ours = model.state_dict()
    for mm, tv in {
        "backbone.layer3.5.conv2.weight": "backbone.body.layer3.5.conv2.weight",
        "backbone.layer1.0.downsample.1.running_var": "backbone.body.layer1.0.downsample.1.running_var",
        "neck.lateral_convs.1.conv.weight": "backbone.fpn.inner_blocks.1.0.weight",
        "neck.fpn_convs.2.conv.bias": "backbone.fpn.layer_blocks.2.0.bias",
        "neck.fpn_convs.3.conv.weight": "backbone.fpn.extra_blocks.p6.weight",
        "neck.fpn_convs.4.conv.weight": "backbone.fpn.extra_blocks.p7.weight",
        "bbox_head.cls_convs.2.conv.weight": "head.classification_head.conv.2.0.weight",
        "bbox_head.reg_convs.3.conv.bias": "head.regression_head.conv.3.0.bias",
        "bbox_head.retina_reg.weight": "head.regression_head.bbox_reg.weight",
    }.items():
        assert torch.equal(ours[tv], mmdet[mm]), mm
    weight = ours["head.classification_head.cls_logits.weight"]
    for a, c in [(0, 0), (4, 17), (8, 79)]:
        assert torch.equal(weight[a * 81 + c + 1], mmdet["bbox_head.retina_cls.weight"][a * 80 + c])
    bias = ours["head.classification_head.cls_logits.bias"].view(9, 81)
    assert (bias[:, 0] == conv.UNUSED_LOGIT_BIAS).all() and not weight.view(9, 81, -1)[:, 0].any()

    # End to end: our per-anchor scores (columns 1..80) equal mmdet's cls_score laid out as mmdet's loss reads
    # it (permute(0, 2, 3, 1).reshape(-1, 80)), so anchors and classes line up without a permutation.
    images, _ = _images_and_targets()
    with torch.no_grad():
        levels = forward_features(model, images)
        logits = model.head(levels)["cls_logits"]  # [N, sum(H W A), 81]
        tower = model.head.classification_head.conv(levels[0])
        mm_score = F.conv2d(tower, mmdet["bbox_head.retina_cls.weight"], mmdet["bbox_head.retina_cls.bias"], padding=1)
    first = mm_score.permute(0, 2, 3, 1).reshape(-1, 80)
    torch.testing.assert_close(logits[0, : first.shape[0], 1:], first)
    assert any("anchor sizes" in d for d in report.differences)
    assert not any("p7_relu" in d for d in report.differences)  # the config already has mmdet's P7


def test_convert_mmdet_faster_rcnn_background_column():
    cfg = DETECTORS["faster_rcnn_r101"]
    mmdet = _mmdet_faster_rcnn(101)
    converted, report = conv.convert_mmdet(mmdet, cfg)
    assert report.complete, report
    model = build_model(cfg).eval()
    model.load_state_dict(converted, strict=True)
    ours = model.state_dict()
    assert torch.equal(ours["rpn.head.conv.0.0.weight"], mmdet["rpn_head.rpn_conv.weight"])
    assert torch.equal(ours["rpn.head.cls_logits.bias"], mmdet["rpn_head.rpn_cls.bias"])
    assert torch.equal(ours["roi_heads.box_head.fc6.weight"], mmdet["roi_head.bbox_head.shared_fcs.0.weight"])
    cls_w = mmdet["roi_head.bbox_head.fc_cls.weight"]
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][0], cls_w[80])  # background
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][5], cls_w[4])
    reg = ours["roi_heads.box_predictor.bbox_pred.weight"].view(81, 4, -1)
    assert not reg[0].any()
    torch.testing.assert_close(reg[1:], mmdet["roi_head.bbox_head.fc_reg.weight"].view(80, 4, -1))
    # functionally: the same class probabilities, background in column 0 instead of last
    x = torch.randn(3, 1024)
    with torch.no_grad():
        scores, _ = model.roi_heads.box_predictor(x)
    mm = F.linear(x, cls_w, mmdet["roi_head.bbox_head.fc_cls.bias"]).softmax(-1)
    torch.testing.assert_close(scores.softmax(-1), torch.cat([mm[:, 80:], mm[:, :80]], dim=1))
    assert any("RoIAlign" in d for d in report.differences)


def test_convert_mmdet_fcos_is_partial_and_says_so():
    cfg = DETECTORS["fcos_r50"]
    mmdet = _mmdet_fcos()
    converted, report = conv.convert_mmdet(mmdet, cfg)
    assert set(report.kept_at_init) == {
        "head.regression_head.bbox_reg.weight",
        "head.regression_head.bbox_reg.bias",
        "head.regression_head.bbox_ctrness.weight",
        "head.regression_head.bbox_ctrness.bias",
    }
    assert not report.complete
    assert {"bbox_head.conv_reg.weight", "bbox_head.conv_centerness.bias", "bbox_head.scales.4.scale"} <= set(
        report.unused
    )
    assert any("caffe-style" in d for d in report.differences)
    build_model(cfg).load_state_dict(converted, strict=True)
    assert torch.equal(converted["head.classification_head.conv.3.weight"], mmdet["bbox_head.cls_convs.1.conv.weight"])
    assert torch.equal(converted["head.classification_head.conv.4.bias"], mmdet["bbox_head.cls_convs.1.gn.bias"])
    assert not converted["head.classification_head.conv.3.bias"].any()
    assert torch.equal(converted["head.classification_head.cls_logits.weight"][1:], mmdet["bbox_head.conv_cls.weight"])
    text = str(report)
    assert "NOT CONVERTED (initialisation kept) head.regression_head.bbox_reg.weight" in text


def test_convert_mmdet_refuses_configs_that_do_not_fit():
    mmdet = _mmdet_retinanet(depth=18, classes=10, fpn=64)
    small = DetectorConfig(backbone="resnet18", head_group_norm=False, extra_levels_from="c5", p7_relu=False)
    converted, report = conv.convert_mmdet(mmdet, small)  # 10 classes -> num_classes 11
    assert report.complete
    with pytest.raises(conv.ConversionError, match="mmdet has 10 classes, so num_classes must be 11"):
        conv.convert_mmdet(mmdet, dataclasses.replace(small, num_classes=81))
    with pytest.raises(conv.ConversionError, match="extra_levels_from") as exc:
        conv.convert_mmdet(mmdet, dataclasses.replace(small, extra_levels_from="p5"))
    assert "neck.fpn_convs.3.conv.weight [64, 512, 3, 3] -> backbone.fpn.extra_blocks.p6.weight" in str(exc.value)
    with pytest.raises(conv.ConversionError, match="no norm: set head_group_norm = false"):
        conv.convert_mmdet(mmdet, dataclasses.replace(small, head_group_norm=True))
    with pytest.raises(conv.ConversionError, match="has no rpn_head"):
        conv.convert_mmdet(mmdet, DETECTORS["faster_rcnn_r50"])


def test_convert_mmdet_command(tmp_path, capsys):
    from experiments.engine.manifest import MANIFEST_DIR

    # a manifest whose teacher is an mmdet-style RetinaNet-R18 (small), already naming the converted file
    out = tmp_path / "teacher.pth"
    model = "\n".join(
        [
            'arch = "retinanet"',
            'backbone = "resnet18"',
            "fpn_channels = 64",
            "head_group_norm = false",
            'extra_levels_from = "c5"',
            "p7_relu = false",
            'norm = "frozen_batchnorm"',
        ]
    )
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        f'base = "{MANIFEST_DIR / "embedded_detection_smoke.toml"}"\n[teacher]\n{model}\nweights = "{out}"\n'
        f"[student]\n{model}\n"
    )
    source = tmp_path / "mmdet.pth"
    mmdet = _mmdet_retinanet(depth=18, classes=10, fpn=64)
    torch.save({"meta": {"epoch": 24}, "state_dict": mmdet}, source)
    assert conv.main([str(source), str(out), "--manifest", str(manifest), "--role", "teacher"]) == 0
    printed = capsys.readouterr().out
    assert "mmdet -> torchvision retinanet resnet18" in printed and f'teacher.weights = "{out}"' in printed
    cfg = DetectorConfig(
        backbone="resnet18", head_group_norm=False, extra_levels_from="c5", p7_relu=False, norm="frozen_batchnorm"
    )
    loaded = build_model(dataclasses.replace(cfg, weights=str(out)))
    assert torch.equal(
        loaded.state_dict()["backbone.body.layer4.1.conv2.weight"], mmdet["backbone.layer4.1.conv2.weight"]
    )

    # a partial conversion is refused unless asked for
    fcos_out = tmp_path / "fcos.pth"
    torch.save(_mmdet_fcos(depth=18, classes=10, fpn=64), source)
    fcos = ['arch="fcos"', 'extra_levels_from="p5"', "p7_relu=true"]  # mmdet's FCOS: P6 from P5, ReLU before P7
    sets = [x for role in ("teacher", "student") for value in fcos for x in ("--set", f"{role}.{value}")]
    args = [str(source), str(fcos_out), "--manifest", str(manifest), *sets]
    assert conv.main(args) == 1 and not fcos_out.exists()
    assert "nothing written" in capsys.readouterr().err
    assert conv.main([*args, "--allow-partial"]) == 0 and fcos_out.exists()
    assert conv.main([str(tmp_path / "absent.pth"), str(fcos_out), "--manifest", str(manifest)]) == 2


# ---------------------------------------------------------------------------------------------------------
# Student export
# ---------------------------------------------------------------------------------------------------------

TORCHVISION_BUILDERS = {
    # our config -> torchvision's high-level builder of the same layout (weights None: BatchNorm2d)
    "faster_rcnn_r50": lambda: torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    ),
    "retinanet_r50_v1": lambda: torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    ),
    "retinanet_r50_v2": lambda: torchvision.models.detection.retinanet_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=81
    ),
    "fcos_r50": lambda: torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    ),
    "deeplabv3_r101_aux": lambda: torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=19, aux_loss=True
    ),
}


EXPORTED = {
    **DETECTORS,
    **SEGMENTERS,
    # torchvision's retinanet_resnet50_fpn (P6 from P5, no head norm) and _v2 (P6 from C5, GroupNorm head)
    "retinanet_r50_v1": DetectorConfig(backbone="resnet50", head_group_norm=False, **RETINA, **COCO),
    "retinanet_r50_v2": DetectorConfig(backbone="resnet50", extra_levels_from="c5", **RETINA, **COCO),
}


@pytest.mark.parametrize(
    "name",
    ["faster_rcnn_r50", "faster_rcnn_r101", "retinanet_r50_v1", "retinanet_r50_v2", "retinanet_r101_v2", "fcos_r50"]
    + ["deeplabv3_r101_aux"],
)
def test_export_loads_strictly_into_plain_torchvision(name, tmp_path):
    cfg = EXPORTED[name]
    torch.manual_seed(0)
    student = build_model(cfg).eval()
    path = export_student(student.state_dict(), cfg, tmp_path / "student.pth")
    exported = torch.load(path, map_location="cpu", weights_only=True)
    plain = plain_torchvision_model(cfg).eval()
    plain.load_state_dict(exported, strict=True)
    # the same function, not only the same keys
    if isinstance(cfg, DetectorConfig):
        images, _ = _images_and_targets()
        with torch.no_grad():
            for ours, theirs in zip(forward_features(student, images), forward_features(plain, images), strict=True):
                torch.testing.assert_close(ours, theirs)
            torch.testing.assert_close(student(list(images))[0]["scores"], plain(list(images))[0]["scores"])
    else:
        images = torch.randn(1, 3, H, W)
        with torch.no_grad():
            torch.testing.assert_close(student(images)["out"], plain(images)["out"])
    builder = TORCHVISION_BUILDERS.get(name)
    if builder is not None:
        reference = builder()
        if cfg.norm == "batchnorm":
            reference.load_state_dict(exported, strict=True)
        else:  # FrozenBatchNorm2d keeps no num_batches_tracked; everything else is identical
            shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if "num_batches" not in k}
            assert shapes == {k: tuple(v.shape) for k, v in exported.items()}


def test_export_without_torchvision_builder_loads_into_our_builder(tmp_path):
    for name in ("deeplabv3_r18_aux", "pspnet_r18_aux", "deeplabv3_mbv2"):
        cfg = SEGMENTERS[name]
        with pytest.raises(ValueError, match="no torchvision builder .* loads into .*build_model"):
            plain_torchvision_model(cfg)
        torch.manual_seed(0)
        student = build_model(cfg)
        path = export_student(student.state_dict(), cfg, tmp_path / f"{name}.pth")
        reloaded = build_model(dataclasses.replace(cfg, weights=str(path)))
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in reloaded.state_dict().items()), name
    with pytest.raises(ValueError, match="p7_relu = false"):
        plain_torchvision_model(DETECTORS["retinanet_r50_mmdet"])


def test_export_refuses_a_distillation_state(tmp_path):
    cfg = SEGMENTERS["deeplabv3_r18_aux"]
    state = build_model(cfg).state_dict()
    for extra in ("teacher.backbone.conv1.weight", "align.0.weight", "loss.tokens.0", "mask_modules.0.tokens"):
        with pytest.raises(ValueError, match="refusing to export: 1 keys are not the student model's"):
            export_student({**state, extra: torch.zeros(1)}, cfg, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="does not fit pspnet resnet18"):
        export_student(state, SEGMENTERS["pspnet_r18_aux"], tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
