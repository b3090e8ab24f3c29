"""Teacher and student models for the MasKD comparison, built from torchvision classes only.

Two tasks, each with a config dataclass, a builder, a feature declaration and a one-pass forward helper:

* detection: torchvision ``RetinaNet`` or ``FCOS`` on a ResNet + FPN (P3-P7), or ``FasterRCNN`` on a ResNet +
  FPN (P2-P6, as torchvision's ``fasterrcnn_resnet50_fpn`` and mmdet's Faster R-CNN). Distilled features are
  the five FPN levels. :func:`detector_train_step` returns the task losses *and* those FPN features from one
  forward, so a distillation step never runs the student backbone twice.
* segmentation: torchvision ``DeepLabV3`` (ASPP head) or a PSPNet (pyramid pooling head, written here: torchvision
  has none) on a dilated ResNet or MobileNetV2 at output stride 8. Distilled features are the pre-upsampling
  logits (``classifier``) and the last backbone stage.

The embedded models start from torchvision's random init, with trainable BatchNorm. The paper's models start
from files (``backbone_weights``: ImageNet; ``weights``: a trained teacher; see ``weights.py``; nothing is ever
downloaded). The ResNet body keeps torchvision's module names, so at ``width=64`` its ``state_dict`` keys and
shapes equal ``torchvision.models.resnetXX`` (minus ``fc``), and a model built here has the state-dict layout of
the torchvision builder of the same architecture (``export.plain_torchvision_model``).

Shape shorthand: N images, K classes, C channels, (H, W) image size after the detector's resize and padding,
(H_l, W_l) = ceil(H / stride_l), ceil(W / stride_l) for FPN level l.

Class ids: the embedded benchmark uses COCO-style category ids 1..10 and ``num_classes=11``. torchvision's
RetinaNet and FCOS use the label as a column index of a sigmoid classifier, so column 0 is never a positive
(an unused output, as torchvision's 91-class COCO models leave unused ids); no background class is modelled.
Faster R-CNN's softmax classifier uses column 0 as the background, so the same ids work unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models._utils import IntermediateLayerGetter, _make_divisible
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

__all__ = [
    "DEFAULT_DETECTION_STUDENT",
    "DEFAULT_DETECTION_TEACHER",
    "DEFAULT_SEGMENTATION_STUDENT",
    "DEFAULT_SEGMENTATION_TEACHER",
    "DetectorConfig",
    "DetectorStep",
    "FeatureSpec",
    "LastLevelP6P7NoReLU",
    "PSPNet",
    "PyramidPooling",
    "ResNetBody",
    "SegmenterConfig",
    "build_architecture",
    "build_detector",
    "build_model",
    "build_resnet_body",
    "build_segmenter",
    "count_parameters",
    "detector_features_with_masked_forward",
    "detector_train_step",
    "feature_info",
    "forward_features",
    "fpn_levels",
    "freeze_backbone_stages",
    "hash_spec",
    "segmenter_forward",
    "segmenter_masked_forward",
]

# ---------------------------------------------------------------------------------------------------------
# ResNet body with a width knob and dilated BasicBlocks
# ---------------------------------------------------------------------------------------------------------

# name -> (block, blocks per stage). resnet10 is torchvision's ResNet(BasicBlock, [1, 1, 1, 1]).
RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),  # the paper's segmentation teacher
}

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    # Trainable BN: everything here trains from scratch, and FrozenBatchNorm2d with its identity init would
    # freeze an untrained affine. Frozen BN is what torchvision uses with pretrained backbones.
    "batchnorm": nn.BatchNorm2d,
    "frozen_batchnorm": FrozenBatchNorm2d,
}


def _check_choice(field: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


class DilatedBasicBlock(BasicBlock):
    """torchvision ``BasicBlock`` whose two 3x3 convs may be dilated.

    torchvision's BasicBlock raises ``NotImplementedError`` for ``dilation > 1``, so ResNet-18/34 cannot be
    run at output stride 8 with ``replace_stride_with_dilation``. The layers (and state_dict keys) are those
    of BasicBlock; only the 3x3 convs are rebuilt with ``padding = dilation``, so the spatial size is kept.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, norm_layer=norm_layer)
        if dilation > 1:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = conv3x3(planes, planes, dilation=dilation)


class ResNetBody(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``, with a width multiplier and dilation for any block.

    Stage widths are ``width * (1, 2, 4, 8)`` (times 4 for Bottleneck); torchvision's ResNet is ``width=64``
    and hard-codes it, which is why this class exists: a thin student (``width=16``/``32``) is the cheapest
    way to make the student much cheaper than the teacher while the FPN stays the same width for both.
    Module names (``conv1, bn1, relu, maxpool, layer1..layer4``) and their order follow torchvision, so
    ``IntermediateLayerGetter`` works and, at ``width=64``, ImageNet state_dicts load (``strict=False``,
    for the missing fc).

    Args:
        block: ``BasicBlock`` or ``Bottleneck`` from ``torchvision.models.resnet``.
        layers: blocks per stage.
        width: channels of the stem and of ``layer1`` (before Bottleneck expansion).
        dilate: for ``layer2..layer4``, replace the stride-2 by dilation (torchvision's
            ``replace_stride_with_dilation``). ``(False, True, True)`` gives output stride 8.
        norm_layer: normalisation constructor, e.g. ``nn.BatchNorm2d``.

    Shapes: ``x`` [N, 3, H, W] -> ``layer4`` output [N, stage_channels[3], H / s, W / s] with s = 32, 16 or 8.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        width: int = 64,
        dilate: Sequence[bool] = (False, False, False),
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(dilate) != 3:
            raise ValueError(f"expected 4 stages and 3 dilate flags, got layers={layers}, dilate={dilate}")
        self._block = DilatedBasicBlock if block is BasicBlock else block
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(width, layers[0])
        self.layer2 = self._make_stage(width * 2, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_stage(width * 4, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_stage(width * 8, layers[3], stride=2, dilate=dilate[2])
        expansion = block.expansion
        self.stage_channels = tuple(width * m * expansion for m in (1, 2, 4, 8))
        # layer1 is at stride 4; each later stage doubles it unless dilated.
        strides, stride = [4], 4
        for flag in dilate:
            stride *= 1 if flag else 2
            strides.append(stride)
        self.stage_strides = tuple(strides)

        # torchvision ResNet's init, so a width-64 body starts from the same distribution.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        # Same rule as torchvision ResNet._make_layer: a dilated stage keeps stride 1, its first block uses
        # the previous dilation and the later blocks the new one.
        block, norm_layer = self._block, self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion)
            )
        kwargs = {"dilation": previous_dilation, "norm_layer": norm_layer}
        stage = [block(self.inplanes, planes, stride, downsample, **kwargs)]
        self.inplanes = planes * block.expansion
        kwargs["dilation"] = self.dilation
        stage += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_resnet_body(
    name: str, width: int = 64, dilate: Sequence[bool] = (False, False, False), norm: str = "batchnorm"
) -> ResNetBody:
    """Build the ResNet body named ``name`` (a key of :data:`RESNET_LAYOUTS`), randomly initialised."""
    _check_choice("backbone", name, list(RESNET_LAYOUTS))
    _check_choice("norm", norm, list(NORM_LAYERS))
    block, layers = RESNET_LAYOUTS[name]
    return ResNetBody(block, layers, width=width, dilate=dilate, norm_layer=NORM_LAYERS[norm])


# ---------------------------------------------------------------------------------------------------------
# Feature declarations
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """Where a distilled feature comes from and its shape, without a forward pass (timm ``feature_info``).

    ``module`` is the dotted submodule name (for ``model.get_submodule`` / ``FeatureRecorder``); ``key`` is
    the entry of that module's dict output, or None when the module returns a tensor. The feature is
    [N, channels, ceil(H / stride), ceil(W / stride)] for an input of spatial size (H, W) (for detectors, the
    size after the model's resize and padding to a multiple of 32).
    """

    module: str
    channels: int
    stride: int
    key: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------

DETECTION_ARCHS = ("retinanet", "fcos", "faster_rcnn")
#: Where RetinaNet/FCOS take P6 from (P7 is always computed from P6).
EXTRA_LEVEL_SOURCES = ("p5", "c5")


@dataclass(frozen=True)
class DetectorConfig:
    """A ResNet body + FPN + RetinaNet, FCOS or Faster R-CNN head. Plain values only.

    Paper scale (COCO, mmdet 2x configs): ``backbone="resnet50"`` (student) / ``"resnet101"`` (teacher),
    ``width=64, fpn_channels=256, image_size=800, max_size=1333, num_classes=81`` (80 classes in columns 1..80),
    ``norm="frozen_batchnorm", trainable_layers=3, backbone_weights="ResNet50_Weights.IMAGENET1K_V1"``, and per
    architecture:

    * RetinaNet: ``anchor_sizes=(32, 64, 128, 256, 512), scales_per_octave=3, head_group_norm=False,
      extra_levels_from="c5", p7_relu=False`` (mmdet's head has no norm; its FPN adds P6 from C5, ``on_input``,
      and no ReLU before P7).
    * FCOS: ``anchor_sizes`` = the strides ``(8, 16, 32, 64, 128)``, P6 from P5 with the ReLU (mmdet's
      ``on_output`` + ``relu_before_extra_convs``), the defaults.
    * Faster R-CNN: ``returned_layers=(1, 2, 3, 4)`` (P2..P5, P6 a max-pool of P5), ``anchor_sizes=(32, 64, 128,
      256, 512), scales_per_octave=1`` (torchvision's and mmdet's one scale x 3 ratios per level).

    The embedded defaults below scale the one-stage detectors to 128x128 scenes and train from scratch.
    """

    arch: str = "retinanet"
    backbone: str = "resnet18"
    # Stem/layer1 channels of the ResNet body; torchvision's ResNet is 64. Thinner = cheaper student.
    width: int = 64
    # Same for teacher and student (as in the paper, both 256) so FPN features compare without an adapter.
    fpn_channels: int = 64
    # ResNet stages feeding the FPN: layer2..4 -> P3..P5 (strides 8..32); LastLevelP6P7 adds P6, P7.
    # Faster R-CNN: (1, 2, 3, 4) -> P2..P5, and LastLevelMaxPool adds P6.
    returned_layers: tuple[int, ...] = (2, 3, 4)
    # COCO-style ids 1..10, column 0 unused (see module docstring). Faster R-CNN: column 0 is the background.
    num_classes: int = 11
    # Images are resized so min side = max side = image_size; torchvision's default 800/1333 would upsample
    # 128-pixel scenes to 800 and cost ~10x (ECOSYSTEM.md section 4).
    image_size: int = 128
    # RetinaNet: anchor base size per level. torchvision's default is 4 x stride (32..512 for 800-pixel COCO
    # images); 1 x stride gives anchors of 8..203 pixels for the 10..126-pixel digits of 128-pixel scenes
    # (experiments/engine/data.py SceneConfig.digit_size_px). Each base x gets
    # scales_per_octave sizes int(x * 2 ** (k / scales_per_octave)), k = 0.., times each aspect ratio.
    # FCOS uses one "anchor" per location whose size sets the level's regression range (4x..8x the size);
    # torchvision sets it to the stride, which is what anchor_sizes defaults to here.
    # Faster R-CNN's RPN uses the same rule (one entry per level, P2..P6).
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    scales_per_octave: int = 3
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # GroupNorm(32) in the RetinaNet head convs, as torchvision's retinanet_resnet50_fpn_v2 and FCOS have.
    # Departs from the paper (mmdet RetinaNet head, no norm, on ImageNet-initialised backbones): here
    # everything trains from scratch, where a normalised head is the usual stabiliser. False = the v1 head.
    # RetinaNet only: FCOS always has GroupNorm, Faster R-CNN's heads have no norm.
    head_group_norm: bool = True
    # Backbone norm; "frozen_batchnorm" only makes sense with pretrained weights (torchvision's choice then).
    norm: str = "batchnorm"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # RetinaNet/FCOS: candidates per level before NMS (Faster R-CNN keeps torchvision's RPN defaults instead).
    topk_candidates: int = 1000
    # --- paper-scale fields (issue 8); their defaults leave the embedded models exactly as they were ---
    # RetinaNet/FCOS: P6 from the FPN's P5 ("p5": torchvision's retinanet_resnet50_fpn and FCOS, mmdet's
    # add_extra_convs="on_output") or from the ResNet's C5 ("c5": the RetinaNet paper, mmdet's RetinaNet
    # add_extra_convs="on_input", torchvision's retinanet_resnet50_fpn_v2: a 3x3 conv from C5's channels).
    extra_levels_from: str = "p5"
    # RetinaNet/FCOS: ReLU between P6 and P7 (torchvision's LastLevelP6P7, mmdet's FCOS). mmdet's RetinaNet has
    # none (relu_before_extra_convs=False): set False for a teacher converted from mmdet.
    p7_relu: bool = True
    # 0: min side = max side = image_size (square resize, the embedded scenes). Otherwise torchvision's
    # min_size=image_size, max_size=max_size (COCO: 800 / 1333, mmdet's img_scale=(1333, 800)).
    max_size: int = 0
    # Training short sides drawn per image from this inclusive range (mmdet's multiscale "range" mode, FCOS's
    # 1333 x [640, 800]); evaluation at image_size. Empty: always image_size. Copied from data.multiscale_short.
    multiscale_short: tuple[int, ...] = ()
    # ResNet stages that train, counted from layer4 (torchvision's trainable_backbone_layers): 5 = all (from
    # scratch, the default); 3 = torchvision's default with ImageNet weights and mmdet's frozen_stages=1 (stem
    # and layer1 frozen). Frozen stages get requires_grad False; their BatchNorm still follows model.train().
    trainable_layers: int = 5
    # Faster R-CNN: width of the two-layer box head (TwoMLPHead fc6/fc7; torchvision and mmdet use 1024).
    representation_size: int = 1024
    # A whole trained model's state dict (a teacher): a file path or a torchvision weights name
    # (experiments/engine/weights.py). Loaded strictly by build_model, after backbone_weights.
    weights: str = ""
    # The backbone body's initialisation (ImageNet), e.g. "ResNet50_Weights.IMAGENET1K_V1" or a path to
    # torchvision's resnet50 file; its fc.* is ignored. Needs width=64.
    backbone_weights: str = ""
    # Zero the last BatchNorm scale of every residual branch, so each block starts as the identity (torchvision's
    # ResNet(zero_init_residual=True), Goyal et al. 2017). Used by the smoke profile for models without weight
    # files: an untrained ResNet-101 whose BatchNorm has no statistics yet (frozen, or in eval mode) otherwise
    # multiplies the feature scale at every block, and the teacher's features overflow float32 losses.
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, DETECTION_ARCHS)
        _check_choice("backbone", self.backbone, list(RESNET_LAYOUTS))
        _check_choice("norm", self.norm, list(NORM_LAYERS))
        _check_choice("extra_levels_from", self.extra_levels_from, EXTRA_LEVEL_SOURCES)
        layers = self.returned_layers
        consecutive = tuple(range(layers[0], layers[0] + len(layers))) == layers if layers else False
        if not consecutive or layers[0] < 1 or layers[-1] > 4:
            # The FPN levels must be consecutive stages for the strides (and P6/P7) to follow.
            raise ValueError(f"returned_layers must be consecutive ResNet stages in 1..4, got {layers}")
        if self.arch == "faster_rcnn" and (self.extra_levels_from != "p5" or not self.p7_relu):
            raise ValueError(
                "extra_levels_from and p7_relu apply to retinanet/fcos; faster_rcnn's P6 is a max-pool of P5 "
                "(leave them at 'p5' and true)"
            )
        if len(self.anchor_sizes) != self.num_levels:
            extra = "P6" if self.arch == "faster_rcnn" else "P6, P7"
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} entries for {self.num_levels} FPN levels "
                f"(returned_layers={self.returned_layers} + {extra})"
            )
        needs_gn = self.arch == "fcos" or (self.arch == "retinanet" and self.head_group_norm)
        if needs_gn and self.fpn_channels % 32:
            raise ValueError(f"fpn_channels={self.fpn_channels} must be a multiple of 32 for GroupNorm(32) heads")
        if self.max_size and self.max_size < self.image_size:
            raise ValueError(f"max_size={self.max_size} must be 0 or at least image_size={self.image_size}")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers={self.trainable_layers} must be in 0..5 (torchvision's range)")
        if self.representation_size < 1:
            raise ValueError(f"representation_size={self.representation_size} must be positive")

    @property
    def num_levels(self) -> int:
        return len(self.returned_layers) + (1 if self.arch == "faster_rcnn" else 2)

    def level_strides(self) -> tuple[int, ...]:
        """Stride of each FPN level: layer k is at 2 ** (k + 1); P6 (and P7) halve once (twice) more."""
        strides = [2 ** (layer + 1) for layer in self.returned_layers]
        extra = [strides[-1] * 2 ** (k + 1) for k in range(self.num_levels - len(strides))]
        return (*strides, *extra)

    def anchor_generator(self) -> AnchorGenerator:
        """torchvision's ``_default_anchorgen`` rule on ``anchor_sizes`` (one square anchor for FCOS)."""
        if self.arch == "fcos":
            return AnchorGenerator(tuple((size,) for size in self.anchor_sizes), ((1.0,),) * self.num_levels)
        sizes = tuple(
            tuple(int(base * 2 ** (k / self.scales_per_octave)) for k in range(self.scales_per_octave))
            for base in self.anchor_sizes
        )
        return AnchorGenerator(sizes, (tuple(self.aspect_ratios),) * self.num_levels)


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """torchvision's ``LastLevelP6P7`` without the ReLU between P6 and P7 (mmdet's RetinaNet FPN,
    ``relu_before_extra_convs=False``). Same parameters and state_dict keys (``p6``, ``p7``)."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


def freeze_backbone_stages(body: nn.Module, trainable_layers: int) -> None:
    """torchvision's ``_resnet_fpn_extractor`` rule: only the last ``trainable_layers`` of (conv1, layer1..4)
    keep ``requires_grad`` (5 also keeps bn1). Parameters only; BatchNorm statistics follow the module mode."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers={trainable_layers} must be in 0..5")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)


def _extra_levels(cfg: DetectorConfig, c5_channels: int) -> ExtraFPNBlock:
    if cfg.arch == "faster_rcnn":
        return LastLevelMaxPool()  # P6 = max_pool2d(P5, 1, stride 2): torchvision and mmdet (num_outs=5)
    # LastLevelP6P7(C, C): P6 is computed from P5 (torchvision's retinanet_resnet50_fpn). "c5": a 3x3 conv from
    # the last returned stage's channels, as the original RetinaNet and mmdet do.
    in_channels = cfg.fpn_channels if cfg.extra_levels_from == "p5" else c5_channels
    cls = LastLevelP6P7 if cfg.p7_relu else LastLevelP6P7NoReLU
    extra = cls(in_channels, cfg.fpn_channels)
    # torchvision infers the source from in_channels == out_channels; a C5 as wide as the FPN would pass for P5.
    extra.use_P5 = cfg.extra_levels_from == "p5"
    return extra


def _detector_backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    # torchvision's resnet_fpn_backbone hard-codes 256 FPN channels and width 64, so build the same
    # BackboneWithFPN it builds from our body. All layers train by default (trainable_layers=5: from scratch).
    body = build_resnet_body(cfg.backbone, width=cfg.width, norm=cfg.norm)
    freeze_backbone_stages(body, cfg.trainable_layers)
    return_layers = {f"layer{layer}": str(i) for i, layer in enumerate(cfg.returned_layers)}
    in_channels = [body.stage_channels[layer - 1] for layer in cfg.returned_layers]
    extra = _extra_levels(cfg, in_channels[-1])
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


def build_detector(cfg: DetectorConfig) -> RetinaNet | FCOS | FasterRCNN:
    """Build a randomly initialised torchvision RetinaNet/FCOS/FasterRCNN described by ``cfg``.

    ``model(images, targets)`` in train mode returns the loss dict (``classification``, ``bbox_regression``
    [, ``bbox_ctrness``]; Faster R-CNN: ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
    ``loss_rpn_box_reg``); in eval mode a list of dicts ``boxes [D, 4] (xyxy, input pixels), scores [D], labels
    [D]``. ``images`` is a list of [3, H, W] floats in [0, 1] (or a [N, 3, H, W] tensor); the model normalises
    with ImageNet mean/std and resizes to ``image_size`` (and ``max_size``). Weight files are applied by
    :func:`build_model`, not here.
    """
    backbone = _detector_backbone(cfg)
    anchor_generator = cfg.anchor_generator()
    min_size: int | tuple[int, ...] = cfg.image_size
    if cfg.multiscale_short:
        # torchvision draws one of min_size per training image and evaluates at min_size[-1]: the range, with
        # image_size moved last
        low, high = cfg.multiscale_short
        min_size = (*(v for v in range(low, high + 1) if v != cfg.image_size), cfg.image_size)
    sizes = {"min_size": min_size, "max_size": cfg.max_size or cfg.image_size}
    if cfg.arch == "faster_rcnn":
        # torchvision's fasterrcnn_resnet50_fpn heads: RPNHead (one 3x3 conv), RoIAlign 7x7 on P2..P5 (not P6),
        # TwoMLPHead and FastRCNNPredictor (softmax over num_classes, column 0 = background).
        pool = MultiScaleRoIAlign([str(i) for i in range(len(cfg.returned_layers))], output_size=7, sampling_ratio=2)
        return FasterRCNN(
            backbone,
            num_classes=None,
            **sizes,
            rpn_anchor_generator=anchor_generator,
            box_roi_pool=pool,
            box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size),
            box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes),
            box_score_thresh=cfg.score_thresh,
            box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img,
        )
    common = {
        **sizes,
        "anchor_generator": anchor_generator,
        "score_thresh": cfg.score_thresh,
        "nms_thresh": cfg.nms_thresh,
        "detections_per_img": cfg.detections_per_img,
        "topk_candidates": cfg.topk_candidates,
    }
    if cfg.arch == "fcos":
        return FCOS(backbone, cfg.num_classes, **common)
    anchors_per_location = anchor_generator.num_anchors_per_location()[0]
    norm_layer = partial(nn.GroupNorm, 32) if cfg.head_group_norm else None
    head = RetinaNetHead(cfg.fpn_channels, anchors_per_location, cfg.num_classes, norm_layer=norm_layer)
    return RetinaNet(backbone, cfg.num_classes, head=head, **common)


def fpn_levels(fpn_output: Mapping[str, Tensor]) -> list[Tensor]:
    """The FPN's ``OrderedDict`` ('0', '1', '2', 'p6', 'p7'; Faster R-CNN '0'..'3', 'pool') as a list [P3, ...,
    P7] (or [P2, ..., P6]), each [N, C, H_l, W_l].

    torchvision's FPN emits the levels fine to coarse in insertion order, which is also the order the
    detection heads and anchor generator expect.
    """
    if isinstance(fpn_output, Tensor):
        return [fpn_output]
    levels = list(fpn_output.values())
    for key, level in zip(fpn_output, levels, strict=True):
        if not isinstance(level, Tensor) or level.dim() != 4:
            raise TypeError(f"FPN output {key!r} is not a [N, C, H, W] tensor")
    return levels


def _level_names(cfg: DetectorConfig) -> list[str]:
    first = cfg.returned_layers[0] + 1
    return [f"P{first + k}" for k in range(cfg.num_levels)]


def _level_keys(cfg: DetectorConfig) -> list[str]:
    # the keys of torchvision's FPN output: IntermediateLayerGetter's names, then the extra block's
    extra = ["pool"] if cfg.arch == "faster_rcnn" else ["p6", "p7"]
    return [str(i) for i in range(len(cfg.returned_layers))] + extra


class DetectorStep(NamedTuple):
    """Everything one detector forward yields for a distillation step.

    losses: torchvision's loss dict (scalar tensors).
    features: FPN levels [P3..P7] (Faster R-CNN [P2..P6]), each [N, fpn_channels, H_l, W_l] (the tensors the
        heads consumed, with their autograd graph).
    targets: the targets after the model's transform: ``boxes`` [M, 4] in the coordinates of the resized,
        padded batch (what FGD's foreground masks need), ``labels`` [M].
    image_sizes: per-image (h, w) after resize, before padding.
    batch_shape: (H, W) of the padded batch tensor (a multiple of 32).
    batch: the normalised, resized and padded [N, 3, H, W] tensor the backbone consumed: the teacher of a
        distillation step reads the same tensor (:func:`backbone_features`), so both see one resize even when the
        training transform draws the size at random (multi-scale training).
    """

    losses: dict[str, Tensor]
    features: list[Tensor]
    targets: list[dict[str, Tensor]]
    image_sizes: list[tuple[int, int]]
    batch_shape: tuple[int, int]
    batch: Tensor


def _check_detector(model: nn.Module) -> None:
    if not isinstance(model, RetinaNet | FCOS | FasterRCNN):
        raise TypeError(f"expected a torchvision RetinaNet, FCOS or FasterRCNN, got {type(model).__name__}")


def _check_targets(targets: Sequence[Mapping[str, Tensor]]) -> None:
    # The same check torchvision's forward makes: a degenerate box would give NaN regression targets.
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {index}: boxes must be [M, 4], got {tuple(boxes.shape)}")
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            box = boxes[degenerate.nonzero()[0, 0]].tolist()
            raise ValueError(f"target {index}: box {box} has no positive width/height")


@contextlib.contextmanager
def _training_mode(*modules: nn.Module) -> Iterator[None]:
    # torchvision's RPN and RoIHeads compute losses only when self.training (and then sample anchors and
    # proposals with the train-time top-n). Neither has BatchNorm or dropout, so switching them alone gives the
    # train-mode losses while the backbone keeps the model's mode (eval BN for a frozen teacher, as MasKD's
    # mask-learning stage and mmdet's frozen-BN detectors do).
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.train()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _rcnn_losses(model: FasterRCNN, image_list, targets_t, keys: list[str], levels: list[Tensor]) -> dict:
    # Mirrors GeneralizedRCNN.forward in training (torchvision 0.29): RPN, then RoI heads; the same loss dict
    # order (RoI heads' first, then the RPN's).
    features = OrderedDict(zip(keys, levels, strict=True))
    with _training_mode(model.rpn, model.roi_heads):
        proposals, proposal_losses = model.rpn(image_list, features, targets_t)
        _, detector_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets_t)
    return {**detector_losses, **proposal_losses}


def _detector_losses(
    model: RetinaNet | FCOS | FasterRCNN,
    images: Sequence[Tensor] | Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    transform_fpn: Callable[[list[Tensor]], list[Tensor]] | None,
) -> DetectorStep:
    # Mirrors RetinaNet.forward / FCOS.forward / GeneralizedRCNN.forward (torchvision 0.29) in training, keeping
    # the intermediates.
    # Note: in train mode model.transform draws one torch random number per image (torch_choice of min_size)
    # even with a single size, so it advances the global RNG exactly as model(images, targets) does.
    _check_detector(model)
    _check_targets(targets)
    image_list, targets_t = model.transform(list(images), [dict(t) for t in targets])
    fpn_output = model.backbone(image_list.tensors)
    features = fpn_levels(fpn_output)
    head_input = features
    if transform_fpn is not None:
        head_input = list(transform_fpn(features))
        if [f.shape for f in head_input] != [f.shape for f in features]:
            raise ValueError("transform_fpn must return one tensor per FPN level, each of its input's shape")
    if isinstance(model, FasterRCNN):
        losses = _rcnn_losses(model, image_list, targets_t, list(fpn_output), head_input)
    else:
        head_outputs = model.head(head_input)
        anchors = model.anchor_generator(image_list, head_input)
        if isinstance(model, FCOS):
            num_anchors_per_level = [level.size(2) * level.size(3) for level in head_input]
            losses = model.compute_loss(targets_t, head_outputs, anchors, num_anchors_per_level)
        else:
            losses = model.compute_loss(targets_t, head_outputs, anchors)
    batch_shape = (image_list.tensors.shape[-2], image_list.tensors.shape[-1])
    return DetectorStep(losses, features, targets_t, list(image_list.image_sizes), batch_shape, image_list.tensors)


def detector_train_step(
    model: RetinaNet | FCOS | FasterRCNN,
    images: Sequence[Tensor] | Tensor,
    targets: Sequence[Mapping[str, Tensor]],
) -> DetectorStep:
    """Task losses and FPN features of one forward (no second backbone pass for distillation).

    ``losses`` equal ``model(images, targets)`` in train mode (Faster R-CNN: given the same RNG state, since the
    RPN and RoI heads sample anchors and proposals at random). Unlike ``model(...)`` it computes losses in eval
    mode too (the mode then only switches BatchNorm to running statistics), which the MasKD mask-learning stage
    needs for its frozen teacher.

    Args:
        images: N images [3, H, W] in [0, 1] (list or a [N, 3, H, W] tensor).
        targets: N dicts with ``boxes`` [M, 4] (xyxy, input pixels) and ``labels`` [M] (int64).
    """
    return _detector_losses(model, images, targets, None)


def detector_features_with_masked_forward(
    model: RetinaNet | FCOS | FasterRCNN,
    images: Sequence[Tensor] | Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    transform_fpn: Callable[[list[Tensor]], list[Tensor]],
) -> dict[str, Tensor]:
    """Task losses with the FPN outputs replaced by ``transform_fpn(features)`` before the head.

    MasKD stage 1 (mask learning) replaces the frozen teacher's FPN levels by their token-masked versions and
    back-propagates the teacher's detection loss into the tokens. ``transform_fpn`` gets [P3..P7] (Faster R-CNN
    [P2..P6]; each [N, C, H_l, W_l]) and must return the same shapes; the RPN and the RoI heads both see the
    transformed levels, as mmdet's neck hook gives them. With the identity the losses equal
    :func:`detector_train_step`'s.
    """
    return _detector_losses(model, images, targets, transform_fpn).losses


def forward_features(model: RetinaNet | FCOS | FasterRCNN, images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """FPN levels [P3..P7] (Faster R-CNN [P2..P6]) of a detector (its transform, then its backbone), each
    [N, C, H_l, W_l].

    For the teacher in a distillation step (call it under ``torch.no_grad()``): no head, anchors or losses.
    """
    _check_detector(model)
    image_list, _ = model.transform(list(images))
    return fpn_levels(model.backbone(image_list.tensors))


def backbone_features(model: RetinaNet | FCOS | FasterRCNN, batch: Tensor) -> list[Tensor]:
    """FPN levels of a detector for an already transformed batch (:attr:`DetectorStep.batch` of the student's
    step: the same normalisation, size and padding, as both detectors are built with the data's sizes)."""
    _check_detector(model)
    return fpn_levels(model.backbone(batch))


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------

SEGMENTATION_ARCHS = ("deeplabv3", "pspnet")
SEGMENTATION_BACKBONES = (*RESNET_LAYOUTS, "mobilenet_v2")


@dataclass(frozen=True)
class SegmenterConfig:
    """DeepLabV3 (ASPP head) or PSPNet (pyramid pooling head) on a dilated ResNet or MobileNetV2. Plain values.

    Paper scale (Cityscapes, as in CIRKD/CWD/MasKD): teacher DeepLabV3 ``backbone="resnet101"``, students
    DeepLabV3 and PSPNet ``"resnet18"`` and DeepLabV3 ``"mobilenet_v2"``, ``width=64, output_stride=8,
    atrous_rates=(12, 24, 36), num_classes=19`` at 512x1024 crops, ``aux_loss=True`` for the ResNets (CIRKD's
    FCN head on layer3, weight 0.4), ``aspp_channels=256`` (torchvision's DeepLabHead; CIRKD's MobileNetV2 head
    uses 128), ``backbone_weights`` the ImageNet file of the backbone. The embedded defaults scale these to
    128x128 scenes.
    """

    arch: str = "deeplabv3"
    backbone: str = "resnet18"
    # ResNet: stem/layer1 channels (torchvision: 64). mobilenet_v2: width / 64 is torchvision's width_mult
    # (64 = the ImageNet model).
    width: int = 64
    # 11 = background + digits 0..9; the label 255 is ignored by the loss (not by the model).
    num_classes: int = 11
    # 8: layer3 and layer4 dilated (DeepLabV3 in the paper's setting); 16: only layer4; 32: none.
    # mobilenet_v2: the last two downsampling stages (features 7.. and 14..) instead, as CIRKD.
    output_stride: int = 8
    # torchvision's DeepLabHead hard-codes 256; the ASPP and the 3x3 conv after it cost ~1 GMAC per
    # 128-pixel image at 256, so the embedded models use fewer.
    aspp_channels: int = 256
    # DeepLab's (12, 24, 36) are for 513-pixel crops at output stride 8 (65-pixel maps); a 128-pixel scene
    # gives a 16-pixel map, where rate 36 only sees padding. Scale the rates with the map.
    atrous_rates: tuple[int, ...] = (12, 24, 36)
    # torchvision's FCNHead on layer3 (weight 0.4 in the paper's recipe); off by default. ResNet only (CIRKD's
    # MobileNetV2 students have none). Its logits are ``aux_out`` of segmenter_forward.
    aux_loss: bool = False
    norm: str = "batchnorm"
    # --- paper-scale fields (issue 8); their defaults leave the embedded models exactly as they were ---
    # PSPNet: output channels of the 3x3 conv after the pyramid pooling. 0 = CIRKD's choice: 128 for a 512-channel
    # layer4 (ResNet-18/34), 256 for 2048 (ResNet-50/101); other widths get layer4 channels / 4 (at most 256).
    psp_channels: int = 0
    # A whole trained model's state dict (a teacher), or a torchvision weights name; see DetectorConfig.weights.
    weights: str = ""
    # The backbone's ImageNet initialisation: torchvision's resnet file (fc.* ignored) or mobilenet_v2 file
    # (classifier.* and the unused last 1x1 conv features.18.* ignored). Needs width=64.
    backbone_weights: str = ""
    # Zero the last BatchNorm scale of every residual branch, so each block starts as the identity (torchvision's
    # ResNet(zero_init_residual=True), Goyal et al. 2017). Used by the smoke profile for models without weight
    # files: an untrained ResNet-101 whose BatchNorm has no statistics yet (frozen, or in eval mode) otherwise
    # multiplies the feature scale at every block, and the teacher's features overflow float32 losses.
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, SEGMENTATION_ARCHS)
        _check_choice("backbone", self.backbone, list(SEGMENTATION_BACKBONES))
        _check_choice("norm", self.norm, list(NORM_LAYERS))
        _check_choice("output_stride", self.output_stride, (8, 16, 32))
        if self.backbone == "mobilenet_v2" and self.aux_loss:
            raise ValueError("aux_loss needs a ResNet backbone (CIRKD's MobileNetV2 students have no aux head)")
        if self.psp_channels < 0:
            raise ValueError(f"psp_channels={self.psp_channels} must be 0 (CIRKD's choice) or positive")

    def dilate(self) -> tuple[bool, bool, bool]:
        return {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[self.output_stride]

    def backbone_channels(self) -> int:
        """Channels of the distilled ``backbone`` feature (ResNet layer4, or MobileNetV2's 320-channel block)."""
        if self.backbone == "mobilenet_v2":
            return _make_divisible(320 * self.width / 64, 8)
        block, _ = RESNET_LAYOUTS[self.backbone]
        return self.width * 8 * block.expansion

    def backbone_module(self) -> str:
        """Name of the module whose output is the ``backbone`` feature."""
        return f"backbone.{MOBILENET_V2_LAST}" if self.backbone == "mobilenet_v2" else "backbone.layer4"


def _deeplab_head(in_channels: int, num_classes: int, channels: int, atrous_rates: Sequence[int]) -> nn.Sequential:
    # torchvision's DeepLabHead with its 256 channels made a parameter; same layers and state_dict keys
    # (classifier.0 = ASPP, classifier.4 = the 1x1 conv giving the logits).
    return nn.Sequential(
        ASPP(in_channels, list(atrous_rates), out_channels=channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., CVPR 2017), as CIRKD's ``_PyramidPooling``.

    For each bin b in (1, 2, 3, 6): average-pool to b x b, 1x1 conv to C/4 channels, BN, ReLU, and upsample back
    (bilinear, ``align_corners=True`` as CIRKD); the input and the four maps are concatenated.
    Shapes: [N, C, h, w] -> [N, 2C, h, w] (four bins of C/4 each).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, reduced, 1, bias=False),
                nn.BatchNorm2d(reduced),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size, mode="bilinear", align_corners=True) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


def _psp_head(in_channels: int, num_classes: int, channels: int) -> nn.Sequential:
    # CIRKD's _PSPHead: pyramid pooling, 3x3 conv + BN + ReLU + Dropout(0.1), 1x1 classifier. classifier.5 gives
    # the logits (the distilled ``logits`` are the whole head's output, as for DeepLabV3).
    psp = PyramidPooling(in_channels)
    return nn.Sequential(
        psp,
        nn.Conv2d(psp.out_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout(0.1),
        nn.Conv2d(channels, num_classes, 1),
    )


class PSPNet(_SimpleSegmentationModel):
    """torchvision's segmentation container (backbone -> classifier -> bilinear upsampling, optional aux head)
    with a PSP head as ``classifier``; the same interface as torchvision's ``DeepLabV3`` and ``FCN``."""


#: index of MobileNetV2's last inverted-residual block (320 channels) in ``mobilenet_v2().features``; the 1x1
#: conv to 1280 channels after it (index 18) is for classification and is not used (as CIRKD).
MOBILENET_V2_LAST = 17


def _dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> None:
    # CIRKD's MobileNetV2Dilated._nostride_dilate: blocks 7.. (stride 16) and 14.. (stride 32) lose their
    # stride-2; a stage's first (formerly strided) 3x3 conv gets half the stage's dilation, the others all of it,
    # so output stride 8 gives dilations 1, 2 (blocks 7-13) and 2, 4 (blocks 14-17). Convs read stride,
    # padding and dilation at forward time, so changing them in place keeps the parameters and keys.
    stages = {8: ((7, 14, 2), (14, MOBILENET_V2_LAST + 1, 4)), 16: ((14, MOBILENET_V2_LAST + 1, 2),), 32: ()}
    for start, stop, dilation in stages[output_stride]:
        for index in range(start, stop):
            for conv in features[index].modules():
                if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
                    continue
                rate = dilation // 2 if conv.stride == (2, 2) else dilation
                conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)


def _mobilenet_v2_body(cfg: SegmenterConfig) -> nn.Sequential:
    # torchvision's MobileNetV2 features (keys 0..17 of features.*, so its ImageNet file loads), dilated.
    net = mobilenet_v2(weights=None, width_mult=cfg.width / 64, norm_layer=NORM_LAYERS[cfg.norm])
    features = net.features[: MOBILENET_V2_LAST + 1]
    _dilate_mobilenet_v2(features, cfg.output_stride)
    return features


def build_segmenter(cfg: SegmenterConfig) -> DeepLabV3 | PSPNet:
    """Build a randomly initialised torchvision ``DeepLabV3`` (or :class:`PSPNet`) described by ``cfg``.

    ``model(images)`` with images [N, 3, H, W] returns ``{"out": logits [N, K, H, W]}`` (plus ``"aux"`` with
    ``aux_loss``), bilinearly upsampled from stride ``output_stride``. ``model.classifier`` outputs the
    pre-upsampling logits [N, K, H/8, W/8] that MasKD distils. As in torchvision, the model does not normalise
    its input: the caller feeds normalised images. Weight files are applied by :func:`build_model`, not here.
    """
    aux_classifier = None
    if cfg.backbone == "mobilenet_v2":
        backbone = IntermediateLayerGetter(_mobilenet_v2_body(cfg), return_layers={str(MOBILENET_V2_LAST): "out"})
        stage_channels = None
    else:
        body = build_resnet_body(cfg.backbone, width=cfg.width, dilate=cfg.dilate(), norm=cfg.norm)
        return_layers = {"layer4": "out"}
        if cfg.aux_loss:
            return_layers["layer3"] = "aux"
            aux_classifier = FCNHead(body.stage_channels[2], cfg.num_classes)
        backbone = IntermediateLayerGetter(body, return_layers=return_layers)
        stage_channels = body.stage_channels
    in_channels = cfg.backbone_channels()
    if cfg.arch == "pspnet":
        channels = cfg.psp_channels or min(in_channels // 4, 256)
        model = PSPNet(backbone, _psp_head(in_channels, cfg.num_classes, channels), aux_classifier)
    else:
        classifier = _deeplab_head(in_channels, cfg.num_classes, cfg.aspp_channels, cfg.atrous_rates)
        model = DeepLabV3(backbone, classifier, aux_classifier)
    if stage_channels is not None:
        # Recorded so feature_info-style consumers can read the stage layout off the model too.
        model.stage_channels = stage_channels
    return model


def _upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    # Bilinear like torchvision's DeepLabV3.forward; any leading dims (e.g. [N, T, K, h, w]) are kept.
    lead = logits.shape[:-3]
    flat = logits.reshape(-1, *logits.shape[-3:])
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, *up.shape[-3:])


def _segmenter_forward(
    model: _SimpleSegmentationModel,
    images: Tensor,
    transform_logits: Callable[[Tensor], Tensor] | None,
    transform_backbone: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    if not isinstance(model, _SimpleSegmentationModel):
        raise TypeError(f"expected a torchvision DeepLabV3 (or PSPNet), got {type(model).__name__}")
    size = images.shape[-2:]
    features = model.backbone(images)
    head_input = features["out"] if transform_backbone is None else transform_backbone(features["out"])
    logits = model.classifier(head_input)
    extras = {"logits": logits, "backbone": features["out"]}
    head_logits = logits if transform_logits is None else transform_logits(logits)
    if model.aux_classifier is not None:
        extras["aux_out"] = _upsample(model.aux_classifier(features["aux"]), size)
    return _upsample(head_logits, size), extras


def segmenter_forward(model: DeepLabV3 | PSPNet, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward without hooks: upsampled logits and the distillable features.

    Args:
        images: [N, 3, H, W], normalised.
    Returns:
        ``out`` [N, K, H, W] (equal to ``model(images)["out"]``) and a dict with ``logits`` [N, K, h, w]
        (classifier output before upsampling, h = ceil(H / output_stride)), ``backbone`` [N, C4, h, w]
        (layer4 output, or MobileNetV2's last block) and, with an aux head, ``aux_out`` [N, K, H, W] (the FCN
        head on layer3, upsampled: the paper's recipe adds 0.4 x its cross-entropy to the task loss).
    """
    return _segmenter_forward(model, images, None)


def segmenter_masked_forward(
    model: DeepLabV3 | PSPNet,
    images: Tensor,
    transform_logits: Callable[[Tensor], Tensor] | None,
    transform_backbone: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Like :func:`segmenter_forward`, but upsamples ``transform_logits(logits)`` instead of ``logits``.

    MasKD's segmentation stage 1 masks the frozen teacher's logits with the tokens and takes the CE of the
    masked logits. ``transform_logits`` gets [N, K, h, w] and may return [..., K, h, w] (e.g. one masked copy
    per token, [N, T, K, h, w]); the result is upsampled to [..., K, H, W]. The returned dict holds the
    *unmasked* features, as in :func:`segmenter_forward`. ``transform_backbone`` (optional) replaces the layer4
    output [N, C, h, w] before the classifier by a tensor of the same shape (masking the backbone features).
    """
    return _segmenter_forward(model, images, transform_logits, transform_backbone)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def feature_info(cfg: DetectorConfig | SegmenterConfig) -> dict[str, FeatureSpec]:
    """Declared distillation features of the model ``cfg`` builds, in order (no forward needed).

    Detection: ``P3``..``P7`` -> ``FeatureSpec("backbone.fpn", fpn_channels, 8..128, key "0".."p7")``
    (Faster R-CNN: ``P2``..``P6``, strides 4..64, keys "0".."3", "pool").
    Segmentation: ``logits`` -> ``("classifier", num_classes, output_stride)`` and
    ``backbone`` -> ``("backbone.layer4", layer4 channels, output_stride)`` (MobileNetV2: ``backbone.17``, 320
    channels at width 64).
    """
    if isinstance(cfg, DetectorConfig):
        return {
            name: FeatureSpec("backbone.fpn", cfg.fpn_channels, stride, key)
            for name, stride, key in zip(_level_names(cfg), cfg.level_strides(), _level_keys(cfg), strict=True)
        }
    if isinstance(cfg, SegmenterConfig):
        return {
            "logits": FeatureSpec("classifier", cfg.num_classes, cfg.output_stride),
            "backbone": FeatureSpec(cfg.backbone_module(), cfg.backbone_channels(), cfg.output_stride),
        }
    raise TypeError(f"expected a DetectorConfig or SegmenterConfig, got {type(cfg).__name__}")


def feature_shape(spec: FeatureSpec, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[N, C, ceil(H / stride), ceil(W / stride)] for an (H, W) input (batch-padded for detectors).

    Each stride-2 conv or pool of these models (k3 p1, k7 p3, k1 p0) maps a size h to ceil(h / 2).
    """
    return (batch, spec.channels, math.ceil(height / spec.stride), math.ceil(width / spec.stride))


def build_architecture(cfg: DetectorConfig | SegmenterConfig) -> nn.Module:
    """The randomly initialised model ``cfg`` describes, without its weight files (:func:`build_model` less the
    loading); on ``torch.device("meta")`` it costs no memory (weights.py checks files against it)."""
    if isinstance(cfg, DetectorConfig):
        return build_detector(cfg)
    if isinstance(cfg, SegmenterConfig):
        return build_segmenter(cfg)
    raise TypeError(f"expected a DetectorConfig or SegmenterConfig, got {type(cfg).__name__}")


def without_weight_files(cfg: DetectorConfig | SegmenterConfig) -> DetectorConfig | SegmenterConfig:
    """``cfg`` naming no weight files: for a model whose values come from elsewhere (a checkpoint loaded next,
    or a structure-only check), so the files are not read for nothing."""
    return dataclasses.replace(cfg, weights="", backbone_weights="")


def build_model(cfg: DetectorConfig | SegmenterConfig) -> nn.Module:
    """:func:`build_detector` or :func:`build_segmenter`, by config type, then the config's weight files:
    ``backbone_weights`` into the backbone body, then ``weights`` into the whole model (both strict; a file that
    does not fit raises :class:`experiments.engine.weights.WeightsError`)."""
    model = build_architecture(cfg)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    if cfg.weights or cfg.backbone_weights:
        from .weights import apply_weights  # weights.py imports this module

        apply_weights(model, cfg)
    return model


def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale of the last norm of every ResNet residual branch in ``model`` (``bn3`` of a Bottleneck,
    ``bn2`` of a BasicBlock); returns how many. Draws no random numbers."""
    count = 0
    for module in model.modules():
        last = getattr(module, "bn3", None) if isinstance(module, Bottleneck) else None
        if isinstance(module, BasicBlock):
            last = module.bn2
        if last is not None:
            last.weight.detach().zero_()  # a Parameter (BatchNorm2d) or a buffer (FrozenBatchNorm2d)
            count += 1
    return count


#: Config fields added for the paper-scale models (issue 8). At their defaults they change nothing, so a stage
#: hash may leave them out (:func:`hash_spec`) and keep matching the runs cached before the fields existed.
PAPER_SCALE_FIELDS = frozenset(
    {
        "extra_levels_from",
        "p7_relu",
        "max_size",
        "multiscale_short",
        "trainable_layers",
        "representation_size",
        "psp_channels",
        "weights",
        "backbone_weights",
        "zero_init_residual",
    }
)


def hash_spec(cfg: DetectorConfig | SegmenterConfig) -> dict:
    """``dataclasses.asdict(cfg)`` without the :data:`PAPER_SCALE_FIELDS` that are at their defaults: the same
    dict as before those fields existed for every embedded manifest, so its stage hashes (and caches) survive."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PAPER_SCALE_FIELDS or v != defaults[k]}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------
# Embedded-benchmark defaults: 128x128 scenes, 2 CPU cores, batch 8.
#
# Measured with torch.set_num_threads(2), batch 8 at 128x128, SGD step included, best of 6 (the cores are
# shared with other jobs, so the minimum is the stable statistic); "KD step" = student forward/backward +
# no-grad teacher forward + an MSE on the distilled features:
#
#   detection (RetinaNet)  params   train step   no-grad FPN fwd   KD step
#     teacher R18 (w64)    11.79 M  0.250 s      0.062 s
#     student R10 (w16)     0.88 M  0.087 s                        0.149 s
#   segmentation (DeepLabV3, OS8)
#     teacher R18 (w32)     3.33 M  0.272 s      0.070 s
#     student R10 (w16)     0.44 M  0.056 s                        0.127 s
#
# Both students keep the teacher's interface to the distilled features: same FPN width (64) in detection,
# same logits (11 classes at stride 8) in segmentation. The detection student's cost is ~70% head (the
# RetinaNet head is the same for both); the teacher's extra capacity is all in the backbone body (28 vs
# 1.1 GFLOPs forward + backward per batch). The segmentation teacher is a half-width ResNet-18 because at output
# stride 8 a full-width one costs ~0.9 s per training step.
# ---------------------------------------------------------------------------------------------------------

# torchvision's ResNet-18 at full width.
DEFAULT_DETECTION_TEACHER = DetectorConfig(backbone="resnet18", width=64, fpn_channels=64)
DEFAULT_DETECTION_STUDENT = DetectorConfig(backbone="resnet10", width=16, fpn_channels=64)
# (3, 6, 9): DeepLab's (12, 24, 36) scaled from 65-pixel to 16-pixel feature maps.
DEFAULT_SEGMENTATION_TEACHER = SegmenterConfig(backbone="resnet18", width=32, aspp_channels=64, atrous_rates=(3, 6, 9))
DEFAULT_SEGMENTATION_STUDENT = SegmenterConfig(backbone="resnet10", width=16, aspp_channels=32, atrous_rates=(3, 6, 9))
