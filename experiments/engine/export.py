"""A trained student as a plain torchvision state dict, and the torchvision model it loads into.

:func:`export_student` writes the student model's ``state_dict`` alone (no teacher, tokens, align convs or
optimizer): a bare ``{name: tensor}`` file that ``weights = "<file>"`` loads back here and that
:func:`plain_torchvision_model` (torchvision's own classes and builders, none of this project's) loads with
``load_state_dict(strict=True)``.

Which architectures have a torchvision builder:

* RetinaNet, FCOS, Faster R-CNN on ResNet-18/34/50/101 + FPN at width 64 with 256 FPN channels:
  ``torchvision.models.detection.backbone_utils.resnet_fpn_backbone`` + ``RetinaNet`` / ``FCOS`` / ``FasterRCNN``
  (e.g. the paper's R50/R101 students and teachers). Not ``p7_relu=False`` (torchvision's ``LastLevelP6P7``
  always applies the ReLU before P7; the keys would load but the function would differ).
* DeepLabV3 on ResNet-50/101 at width 64, ``aspp_channels=256``: torchvision's ``resnet50/101`` with
  ``replace_stride_with_dilation`` + ``DeepLabHead`` + ``FCNHead`` + ``DeepLabV3``, which is what
  ``deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=K, aux_loss=...)`` builds (output stride 8,
  rates (12, 24, 36)); other strides and rates use the same classes.
* No torchvision builder: PSPNet (torchvision has none), DeepLabV3 on ResNet-18/34 (torchvision's BasicBlock
  refuses dilation; this project's ``DilatedBasicBlock`` keeps its keys), DeepLabV3 on MobileNetV2 (torchvision has
  the features but not CIRKD's dilation), and any ``width`` other than 64. Their exports load with
  ``strict=True`` into this project's ``build_model(cfg)`` (or set ``weights`` to the file).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import NORM_LAYERS, DetectorConfig, SegmenterConfig, build_architecture

__all__ = ["EXPORT_FORBIDDEN", "export_student", "plain_torchvision_model"]

#: First key components that belong to a distillation run, never to the student model.
EXPORT_FORBIDDEN = frozenset(
    {"teacher", "student", "tokens", "token", "mask_modules", "learner", "align", "aligns", "distill", "distiller"}
)

ModelConfig = DetectorConfig | SegmenterConfig


def export_student(state_dict: Mapping[str, Tensor], cfg: ModelConfig, out_path: str | Path) -> Path:
    """Write the student model's ``state_dict`` (tensors on the CPU, nothing else) to ``out_path``.

    Refuses (``ValueError``, nothing written) a dict with teacher, token or align entries, and a dict that does
    not load strictly into the model ``cfg`` describes (checked on the ``meta`` device, no memory).
    """
    foreign = [
        k
        for k in state_dict
        if k.split(".", 1)[0] in EXPORT_FORBIDDEN or any(p in EXPORT_FORBIDDEN for p in k.split(".")[:-1])
    ]
    if foreign:
        raise ValueError(
            f"refusing to export: {len(foreign)} keys are not the student model's ({', '.join(foreign[:3])}); "
            "pass the student's own state_dict()"
        )
    with torch.device("meta"):
        model = build_architecture(cfg)
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)  # assign: no copies into meta tensors
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise ValueError(f"refusing to export: the state dict does not fit {cfg.arch} {cfg.backbone}: {first}") from exc
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_path)
    return out_path


def _no_builder(cfg: ModelConfig, why: str) -> ValueError:
    return ValueError(
        f"no torchvision builder for {cfg.arch} {cfg.backbone}: {why}; its export loads into "
        "experiments.engine.models.build_model(cfg) (weights = the file)"
    )


def plain_torchvision_model(cfg: ModelConfig) -> nn.Module:
    """The architecture ``cfg`` describes, built from torchvision's public builders and classes only, with
    random weights: the model an exported student (:func:`export_student`) loads into with ``strict=True``.

    Raises ``ValueError`` for configurations torchvision cannot build (see the module docstring).
    """
    norm_layer = NORM_LAYERS[cfg.norm]
    if isinstance(cfg, DetectorConfig):
        return _plain_detector(cfg, norm_layer)
    if isinstance(cfg, SegmenterConfig):
        return _plain_segmenter(cfg, norm_layer)
    raise TypeError(f"expected a DetectorConfig or SegmenterConfig, got {type(cfg).__name__}")


def _plain_detector(cfg: DetectorConfig, norm_layer) -> nn.Module:
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if cfg.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise _no_builder(cfg, f"torchvision has no {cfg.backbone}")
    if cfg.width != 64:
        raise _no_builder(cfg, f"width {cfg.width} (torchvision's ResNet is 64)")
    if cfg.fpn_channels != 256:
        raise _no_builder(cfg, f"fpn_channels {cfg.fpn_channels} (resnet_fpn_backbone's FPN is 256)")
    if not cfg.p7_relu:
        raise _no_builder(cfg, "p7_relu = false (LastLevelP6P7 always applies the ReLU before P7)")
    extra = None  # resnet_fpn_backbone's default, LastLevelMaxPool: Faster R-CNN's P6
    if cfg.arch != "faster_rcnn":
        c5 = {"resnet18": 512, "resnet34": 512}.get(cfg.backbone, 2048) // 2 ** (4 - cfg.returned_layers[-1])
        extra = LastLevelP6P7(256 if cfg.extra_levels_from == "p5" else c5, 256)
        extra.use_P5 = cfg.extra_levels_from == "p5"
    backbone = resnet_fpn_backbone(
        backbone_name=cfg.backbone,
        weights=None,
        norm_layer=norm_layer,
        trainable_layers=cfg.trainable_layers,
        returned_layers=list(cfg.returned_layers),
        extra_blocks=extra,
    )
    anchors = cfg.anchor_generator()
    sizes = {"min_size": cfg.image_size, "max_size": cfg.max_size or cfg.image_size}
    if cfg.arch == "faster_rcnn":
        # FasterRCNN's defaults are RoIAlign on '0'..'3' and a 1024-wide TwoMLPHead; pass them only where cfg differs
        heads = {}
        if len(cfg.returned_layers) != 4:
            names = [str(i) for i in range(len(cfg.returned_layers))]
            heads["box_roi_pool"] = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
        if cfg.representation_size != 1024:
            heads["box_head"] = TwoMLPHead(256 * 7 * 7, cfg.representation_size)
            heads["box_predictor"] = FastRCNNPredictor(cfg.representation_size, cfg.num_classes)
        num_classes = None if "box_predictor" in heads else cfg.num_classes
        post = {"box_score_thresh": cfg.score_thresh, "box_nms_thresh": cfg.nms_thresh}
        post["box_detections_per_img"] = cfg.detections_per_img
        return FasterRCNN(backbone, num_classes, **sizes, rpn_anchor_generator=anchors, **heads, **post)
    # the detection post-processing of cfg (torchvision's FCOS defaults differ: score 0.2, NMS 0.6)
    post = {"score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh, "topk_candidates": cfg.topk_candidates}
    post["detections_per_img"] = cfg.detections_per_img
    if cfg.arch == "fcos":
        return FCOS(backbone, cfg.num_classes, **sizes, anchor_generator=anchors, **post)
    norm = partial(nn.GroupNorm, 32) if cfg.head_group_norm else None
    head = RetinaNetHead(256, anchors.num_anchors_per_location()[0], cfg.num_classes, norm_layer=norm)
    return RetinaNet(backbone, cfg.num_classes, **sizes, anchor_generator=anchors, head=head, **post)


def _plain_segmenter(cfg: SegmenterConfig, norm_layer) -> nn.Module:
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation import DeepLabV3
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    if cfg.arch != "deeplabv3":
        raise _no_builder(cfg, f"torchvision has no {cfg.arch}")
    if cfg.backbone not in ("resnet50", "resnet101"):
        raise _no_builder(cfg, "torchvision's dilated ResNets are the Bottleneck ones (resnet50/101)")
    if cfg.width != 64 or cfg.aspp_channels != 256:
        raise _no_builder(cfg, f"width {cfg.width}, aspp_channels {cfg.aspp_channels} (torchvision: 64, 256)")
    # deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes, aux_loss) is exactly this at output
    # stride 8 and rates (12, 24, 36), with BatchNorm2d; composing the classes also covers other strides, rates
    # and FrozenBatchNorm2d.
    resnet = getattr(torchvision.models, cfg.backbone)(
        weights=None, replace_stride_with_dilation=list(cfg.dilate()), norm_layer=norm_layer
    )
    return_layers = {"layer4": "out", **({"layer3": "aux"} if cfg.aux_loss else {})}
    backbone = IntermediateLayerGetter(resnet, return_layers=return_layers)
    aux = FCNHead(1024, cfg.num_classes) if cfg.aux_loss else None
    return DeepLabV3(backbone, DeepLabHead(2048, cfg.num_classes, list(cfg.atrous_rates)), aux)


def export_run(run_id: str, out_path: str | Path, tracking_uri: str | None = None) -> tuple[Path, str]:
    """:func:`export_student` for the student of MLflow run ``run_id``: its ``checkpoint/student.pt`` artifact
    (checked against the sha256 the run recorded) and its model config from the run's ``manifest.json``.
    Returns the file written and the torchvision class it loads into (or this project's builder)."""
    import json

    from ..tasks import get_task
    from .checkpoints import load_checked
    from .manifest import ManifestError, _build
    from .tracking import Tracker

    tracker = Tracker(tracking_uri)
    try:
        run = tracker.client.get_run(run_id)
    except Exception as exc:  # MlflowException: unknown id
        raise ValueError(f"run {run_id!r} not found in {tracker.uri}: {str(exc).splitlines()[0]}") from None
    tags = run.data.tags
    if tags.get("kind") != "student":
        raise ValueError(f"run {run_id} is a {tags.get('kind', 'parent')!r} run; export takes a student run's id")
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is {run.info.status}; only a finished student run has its final weights")
    with tracker.downloaded(run_id, "manifest.json") as path:
        manifest = json.loads(path.read_text())
    task = get_task(manifest["task"])
    try:
        cfg = _build(task.model_config, manifest["student"], "student", f"run {run_id}'s manifest.json")
    except ManifestError as exc:
        raise ValueError(f"run {run_id}: its student config does not build here ({exc})") from None
    with tracker.downloaded(run_id, "checkpoint/student.pt") as path:
        state = load_checked(path, tags.get("checkpoint_sha256"))
    written = export_student(state, cfg, out_path)
    try:
        plain = type(plain_torchvision_model(cfg))
        target = f"{plain.__module__}.{plain.__name__}"
    except ValueError:
        target = "experiments.engine.models.build_model(cfg) (torchvision has no builder for this architecture)"
    return written, target
