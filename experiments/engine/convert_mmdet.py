"""mmdetection 2.x ResNet-FPN detector checkpoints as state dicts of this project's torchvision detectors.

The paper's teachers are mmdet models (``faster_rcnn_r101_fpn_2x_coco``, ``retinanet_r101_fpn_2x_coco``,
``fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco``). :func:`convert_mmdet` renames and rearranges their
tensors for :func:`experiments.engine.models.build_model` of a :class:`DetectorConfig`; ``main`` is the command
``maskd-bench convert-mmdet IN.pth OUT.pth --manifest M --role teacher``, which prints the report and writes a
bare state dict that ``teacher.weights = "OUT.pth"`` loads strictly.

What maps, exactly (the same tensors, renamed):

* ResNet (``style='pytorch'``): ``backbone.X`` -> ``backbone.body.X`` (mmdet and torchvision share the names).
* FPN: ``neck.lateral_convs.i.conv`` -> ``backbone.fpn.inner_blocks.i.0``, ``neck.fpn_convs.i.conv`` ->
  ``backbone.fpn.layer_blocks.i.0``; RetinaNet/FCOS extra convs ``neck.fpn_convs.n`` / ``n+1`` ->
  ``backbone.fpn.extra_blocks.p6`` / ``p7`` (n = number of FPN inputs). mmdet's RetinaNet takes P6 from C5
  (``add_extra_convs='on_input'``): set ``extra_levels_from = "c5"``; FCOS from P5 (``'on_output'``): ``"p5"``.
  Faster R-CNN's P6 is a parameter-free max-pool in both.
* RetinaNet head: ``bbox_head.{cls,reg}_convs.i.conv`` -> ``head.{classification,regression}_head.conv.i.0``,
  ``retina_reg`` -> ``regression_head.bbox_reg``, ``retina_cls`` -> ``classification_head.cls_logits`` with
  mmdet's M sigmoid columns per anchor placed in our columns 1..M of num_classes = M + 1 (column 0, never a
  positive here, gets weight 0 and bias -20). Per location both libraries order the A anchors ratio-major
  (mmdet's ``scale_major=True`` computes ``w_ratios[:, None] * scales[None, :]``, as torchvision's
  ``AnchorGenerator.generate_anchors``), both lay channels out anchor-major (``a * M + c``, ``a * 4 + j``) and
  both encode boxes with weights (1, 1, 1, 1), so no anchor permutation is needed.
* Faster R-CNN: ``rpn_head.rpn_conv / rpn_cls / rpn_reg`` -> ``rpn.head.conv.0.0 / cls_logits / bbox_pred``
  (sigmoid objectness, A per location, same order); ``roi_head.bbox_head.shared_fcs.0/1`` ->
  ``roi_heads.box_head.fc6/fc7``; ``fc_cls`` [M + 1, 1024] with the background LAST -> ``box_predictor.cls_score``
  [M + 1, 1024] with the background at column 0 (rows rotated); ``fc_reg`` [4M, 1024] (class-specific) ->
  ``box_predictor.bbox_pred`` [4(M + 1), 1024], class c's rows to c + 1, the background's 4 rows zero. mmdet's
  RoI box coder stds (0.1, 0.1, 0.2, 0.2) equal torchvision's weights (10, 10, 5, 5), and its RoI level rule
  (finest_scale 56) equals torchvision's LevelMapper (224 at level 4).

What does not map, or computes differently (listed in each report):

* FCOS head: ``conv_reg`` (mmdet: per-level learnable ``scales``, exp() or relu() x stride decoding) and
  ``conv_centerness`` (mmdet's default ``centerness_on_reg=False`` puts it on the classification tower;
  torchvision's FCOS on the regression tower) have no torchvision equivalent: ``regression_head.bbox_reg`` and
  ``bbox_ctrness`` stay at their initialisation, ``scales`` are unused. The towers (conv + GroupNorm; mmdet's
  bias-free convs get a zero bias) and ``conv_cls`` map. mmdet's FCOS configs also use a caffe-style ResNet
  (stride on the bottleneck's 1x1 conv1, BGR input in 0..255 with std 1): the weights load by name into the
  pytorch-style ResNet but compute a different function. A converted FCOS is therefore partial (``main`` needs
  ``--allow-partial``) and is a starting point for fine-tuning, not the published teacher.
* RetinaNet: mmdet applies no ReLU between P6 and P7 (``relu_before_extra_convs=False``); set ``p7_relu =
  false``. Anchor sizes: torchvision truncates the octave scales to integers (int(32 x 2^(1/3)) = 40, not 40.3)
  and rounds the base anchors; mmdet keeps floats. Small box differences, no weight can absorb them.
* Faster R-CNN: mmdet's RoIAlign is ``aligned=True, sampling_ratio=0``; torchvision's MultiScaleRoIAlign is
  ``aligned=False, sampling_ratio=2`` (a half-pixel shift and a fixed 2x2 sampling grid), and torchvision rounds
  the RPN base anchors. The fc6 inputs differ slightly.
* All: mmdet keeps the backbone BatchNorm statistics frozen (``norm_eval=True``; pytorch-style configs still train
  the affine, caffe-style ones do not): use ``norm = "frozen_batchnorm"`` (torchvision's choice, which freezes the
  affine too). Image resizing (cv2 vs ``F.interpolate``) differs in the last bits.

Conversion refuses (``ConversionError``, one line) a checkpoint whose shapes do not fit the config (depth,
FPN width, P6 source, class count M != num_classes - 1, GroupNorm head or not).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .models import DetectorConfig, build_architecture

__all__ = ["UNUSED_LOGIT_BIAS", "ConversionError", "ConversionReport", "convert_mmdet", "main"]

#: Bias of our sigmoid column 0 (no mmdet counterpart, never a positive): sigmoid(-20) = 2e-9.
UNUSED_LOGIT_BIAS = -20.0


class ConversionError(ValueError):
    """An mmdet checkpoint that does not fit the config; one line."""


@dataclass
class ConversionReport:
    """What :func:`convert_mmdet` did. ``kept_at_init`` lists our tensors with no mmdet source (partial)."""

    arch: str
    source_keys: int = 0
    copied: int = 0
    rearranged: dict[str, str] = field(default_factory=dict)  # our key -> how its rows were built
    kept_at_init: dict[str, str] = field(default_factory=dict)  # our key -> why it has no source
    unused: dict[str, str] = field(default_factory=dict)  # mmdet key -> why it was not used
    differences: list[str] = field(default_factory=list)  # computation differences weights cannot fix

    @property
    def complete(self) -> bool:
        return not self.kept_at_init

    def lines(self) -> list[str]:
        out = [
            f"mmdet -> torchvision {self.arch}: {self.source_keys} mmdet tensors, {self.copied} copied by name, "
            f"{len(self.rearranged)} rearranged, {len(self.kept_at_init)} of ours left at initialisation, "
            f"{len(self.unused)} mmdet tensors unused"
        ]
        out += [f"  rearranged {k}: {why}" for k, why in self.rearranged.items()]
        out += [f"  NOT CONVERTED (initialisation kept) {k}: {why}" for k, why in self.kept_at_init.items()]
        out += [f"  unused mmdet {k}: {why}" for k, why in self.unused.items()]
        out += [f"  differs: {note}" for note in self.differences]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _unwrap(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    return {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}


def _rename(key: str, cfg: DetectorConfig, levels: int) -> str | None:
    """Our name for mmdet's ``key`` when the tensor is copied as it is; None when it is not."""
    if key.startswith("backbone."):
        return "backbone.body." + key[len("backbone.") :]
    m = re.fullmatch(r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", key)
    if m:
        return f"backbone.fpn.inner_blocks.{m[1]}.0.{m[2]}"
    m = re.fullmatch(r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", key)
    if m:
        i = int(m[1])
        if i < levels:
            return f"backbone.fpn.layer_blocks.{i}.0.{m[2]}"
        extra = {levels: "p6", levels + 1: "p7"}.get(i)
        return f"backbone.fpn.extra_blocks.{extra}.{m[2]}" if extra and cfg.arch != "faster_rcnn" else None
    if cfg.arch == "retinanet":
        m = re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)", key)
        if m:
            branch = "classification_head" if m[1] == "cls" else "regression_head"
            return f"head.{branch}.conv.{m[2]}.{0 if m[3] == 'conv' else 1}.{m[4]}"
        if key.startswith("bbox_head.retina_reg."):
            return "head.regression_head.bbox_reg." + key.rsplit(".", 1)[1]
    if cfg.arch == "fcos":
        m = re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)", key)
        if m:  # torchvision's FCOS tower: Conv2d, GroupNorm, ReLU per block -> indices 3i, 3i + 1
            branch = "classification_head" if m[1] == "cls" else "regression_head"
            return f"head.{branch}.conv.{3 * int(m[2]) + (0 if m[3] == 'conv' else 1)}.{m[4]}"
    if cfg.arch == "faster_rcnn":
        rpn = {"rpn_conv": "conv.0.0", "rpn_cls": "cls_logits", "rpn_reg": "bbox_pred"}
        m = re.fullmatch(r"rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.(weight|bias)", key)
        if m:
            return f"rpn.head.{rpn[m[1]]}.{m[2]}"
        m = re.fullmatch(r"roi_head\.bbox_head\.shared_fcs\.([01])\.(weight|bias)", key)
        if m:
            return f"roi_heads.box_head.{'fc6' if m[1] == '0' else 'fc7'}.{m[2]}"
    return None


def _sigmoid_columns(src: Tensor, anchors: int, num_classes: int, key: str) -> Tensor:
    # [A * M, ...] (mmdet, anchor-major) -> [A * (M + 1), ...] with column 0 of every anchor unused
    rows = src.shape[0]
    if rows % anchors:
        raise ConversionError(f"{key}: {rows} rows are not a multiple of the {anchors} anchors per location")
    classes = rows // anchors
    if classes != num_classes - 1:
        raise ConversionError(
            f"{key}: mmdet has {classes} classes, so num_classes must be {classes + 1} (columns 1..{classes}; "
            f"column 0 unused), got {num_classes}"
        )
    src = src.reshape(anchors, classes, *src.shape[1:])
    out = src.new_zeros(anchors, num_classes, *src.shape[2:])
    out[:, 1:] = src
    if src.dim() == 2:  # bias
        out[:, 0] = UNUSED_LOGIT_BIAS
    return out.reshape(anchors * num_classes, *src.shape[2:])


def _head_special(key: str, src: Tensor, cfg: DetectorConfig, anchors: int) -> tuple[str, Tensor, str] | None:
    """(our key, tensor, how) for the tensors whose rows move: classifiers with a column shift."""
    kind = key.rsplit(".", 1)[1]
    if cfg.arch == "retinanet" and key.startswith("bbox_head.retina_cls."):
        how = f"mmdet's {src.shape[0] // anchors} sigmoid columns x {anchors} anchors -> our columns 1.. (0 unused)"
        return f"head.classification_head.cls_logits.{kind}", _sigmoid_columns(src, anchors, cfg.num_classes, key), how
    if cfg.arch == "fcos" and key.startswith("bbox_head.conv_cls."):
        how = "mmdet's sigmoid columns -> our columns 1.., column 0 unused"
        return f"head.classification_head.cls_logits.{kind}", _sigmoid_columns(src, 1, cfg.num_classes, key), how
    if cfg.arch == "faster_rcnn" and key.startswith("roi_head.bbox_head.fc_cls."):
        classes = src.shape[0] - 1
        if classes != cfg.num_classes - 1:
            raise ConversionError(
                f"{key}: mmdet has {classes} classes + background, so num_classes must be {classes + 1}, "
                f"got {cfg.num_classes}"
            )
        out = torch.cat([src[classes:], src[:classes]])  # background from the last row to row 0
        return f"roi_heads.box_predictor.cls_score.{kind}", out, "background moved from mmdet's last column to 0"
    if cfg.arch == "faster_rcnn" and key.startswith("roi_head.bbox_head.fc_reg."):
        if src.shape[0] != 4 * (cfg.num_classes - 1):
            raise ConversionError(
                f"{key}: {src.shape[0]} rows; expected class-specific regression of 4 x {cfg.num_classes - 1} "
                "(reg_class_agnostic mmdet heads do not map onto FastRCNNPredictor)"
            )
        out = torch.cat([src.new_zeros(4, *src.shape[1:]), src])  # class c -> c + 1; background rows zero
        return f"roi_heads.box_predictor.bbox_pred.{kind}", out, "class c's 4 rows -> c + 1, background's rows zero"
    return None


def _preflight(source: Mapping[str, Tensor], cfg: DetectorConfig) -> None:
    if cfg.arch == "retinanet":
        gn = any(re.match(r"bbox_head\.cls_convs\.\d+\.gn\.", k) for k in source)
        if gn != cfg.head_group_norm:
            raise ConversionError(
                f"the mmdet RetinaNet head has {'GroupNorm' if gn else 'no norm'}: set head_group_norm = "
                f"{'true' if gn else 'false'}"
            )
    if cfg.arch == "faster_rcnn" and not any(k.startswith("rpn_head.") for k in source):
        raise ConversionError("arch = faster_rcnn but the checkpoint has no rpn_head.* (not a Faster R-CNN)")
    if cfg.arch in ("retinanet", "fcos") and any(k.startswith("rpn_head.") for k in source):
        raise ConversionError(f"arch = {cfg.arch} but the checkpoint has rpn_head.* (a two-stage detector)")


def _differences(cfg: DetectorConfig) -> list[str]:
    notes = []
    if cfg.norm != "frozen_batchnorm":
        notes.append('mmdet freezes the backbone BatchNorm statistics (norm_eval): use norm = "frozen_batchnorm"')
    if cfg.arch == "retinanet":
        if cfg.p7_relu:
            notes.append("torchvision applies ReLU(P6) before the P7 conv, mmdet's RetinaNet not: set p7_relu = false")
        notes.append(
            "anchor sizes: torchvision truncates the octave scales to integers and rounds base anchors, "
            "mmdet keeps floats (same order: ratio-major, scales inner)"
        )
    if cfg.arch == "faster_rcnn":
        notes.append(
            "RoIAlign: mmdet aligned=True, sampling_ratio=0; torchvision MultiScaleRoIAlign aligned=False, "
            "sampling_ratio=2 (fc6 inputs differ slightly); torchvision rounds the RPN base anchors"
        )
    if cfg.arch == "fcos":
        notes.append(
            "mmdet's FCOS ResNets are caffe-style (stride on the bottleneck's 1x1 conv1, BGR 0..255 input with "
            "std 1): copied by name into a pytorch-style ResNet they compute a different function"
        )
        notes.append("mmdet's centerness (default) is on the classification tower, torchvision's on the regression one")
    return notes


def convert_mmdet(state_dict: Mapping[str, Tensor], cfg: DetectorConfig) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert an mmdet 2.x ResNet-FPN RetinaNet / FCOS / Faster R-CNN state dict (or checkpoint with a
    ``state_dict``) for the model ``cfg`` describes.

    Returns the converted state dict, which loads with ``strict=True`` into ``build_model(cfg)`` (tensors with no
    mmdet source keep a fresh initialisation and are listed in ``report.kept_at_init``), and the report (see the
    module docstring for what maps). Raises :class:`ConversionError` when shapes do not fit ``cfg``.
    """
    if not isinstance(cfg, DetectorConfig):
        raise ConversionError(f"mmdet conversion is for detectors, got a {type(cfg).__name__}")
    source = _unwrap(state_dict)
    _preflight(source, cfg)
    bare = dataclasses.replace(cfg, weights="", backbone_weights="")
    own = build_architecture(bare).state_dict()
    levels = len(cfg.returned_layers)
    anchors = cfg.anchor_generator().num_anchors_per_location()[0] if cfg.arch != "fcos" else 1
    report = ConversionReport(arch=f"{cfg.arch} {cfg.backbone}", source_keys=len(source))
    out = dict(own)
    filled: set[str] = set()
    mismatched: list[str] = []
    for key, tensor in source.items():
        special = _head_special(key, tensor, cfg, anchors)
        if special is not None:
            ours, tensor, how = special
            report.rearranged[ours] = how
        else:
            ours = _rename(key, cfg, levels)
            if ours is None:
                fcos_only = cfg.arch == "fcos" and re.match(r"bbox_head\.(conv_reg|conv_centerness|scales)\.", key)
                report.unused[key] = "no torchvision counterpart" + (" (see the differences)" if fcos_only else "")
                continue
        if ours not in own:
            if not key.endswith("num_batches_tracked"):  # FrozenBatchNorm2d keeps no counter
                report.unused[key] = f"-> {ours}, which our model does not have"
            continue
        if tuple(tensor.shape) != tuple(own[ours].shape):
            mismatched.append(f"{key} {list(tensor.shape)} -> {ours} {list(own[ours].shape)}")
            continue
        out[ours] = tensor.to(own[ours].dtype).clone()
        filled.add(ours)
        if special is None:
            report.copied += 1
    if mismatched:
        raise ConversionError(
            f"{len(mismatched)} shapes do not fit {report.arch} (depth, width, fpn_channels, extra_levels_from?): "
            + "; ".join(mismatched[:3])
        )
    for ours in own:
        if ours in filled or ours.endswith("num_batches_tracked"):
            continue
        if cfg.arch == "fcos" and re.fullmatch(r"head\.\w+_head\.conv\.\d+\.bias", ours):
            out[ours] = torch.zeros_like(own[ours])  # mmdet's GN-head convs have no bias: a zero bias is the same
            report.rearranged[ours] = "zero (mmdet's conv before GroupNorm has no bias)"
        elif ours.startswith("head.regression_head.bbox_reg") and cfg.arch == "fcos":
            report.kept_at_init[ours] = "mmdet's conv_reg decodes with per-level scales (exp or relu x stride)"
        elif ours.startswith("head.regression_head.bbox_ctrness"):
            report.kept_at_init[ours] = "mmdet's conv_centerness sits on the classification tower"
        else:
            report.kept_at_init[ours] = "no mmdet tensor maps here"
    report.differences = _differences(cfg)
    return out, report


def main(argv: list[str] | None = None) -> int:
    """``maskd-bench convert-mmdet IN.pth OUT.pth --manifest M --role teacher``: 0 written, 1 partial (refused
    without ``--allow-partial``), 2 bad input."""
    from .manifest import ManifestError, load_manifest
    from .weights import WeightsError, load_state_dict_file

    parser = argparse.ArgumentParser(
        prog="maskd-bench convert-mmdet",
        description="convert an mmdet 2.x ResNet-FPN detector checkpoint into a state dict for a manifest's model",
    )
    parser.add_argument("input", type=Path, help="the mmdet checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="where to write the converted state dict")
    parser.add_argument("--manifest", required=True, help="a manifest path or shipped name")
    parser.add_argument("--role", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="manifest override")
    parser.add_argument(
        "--allow-partial", action="store_true", help="write even if some of our tensors have no mmdet source"
    )
    args = parser.parse_args(argv)
    # The manifest may already name OUT as this role's weights: the file need not exist (or fit) yet.
    sets = [*args.set, f'{args.role}.weights=""', f'{args.role}.backbone_weights=""']
    try:
        cfg = getattr(load_manifest(args.manifest, sets=sets, check_data=False), args.role)
        converted, report = convert_mmdet(load_state_dict_file(args.input), cfg)
    except (ManifestError, WeightsError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    if not report.complete and not args.allow_partial:
        print(
            f"error: {len(report.kept_at_init)} tensors have no mmdet source; nothing written "
            "(--allow-partial writes them at their initialisation)",
            file=sys.stderr,
        )
        return 1
    build_architecture(cfg).load_state_dict(converted, strict=True)  # a failure here is a bug: traceback
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, args.output)
    print(f'wrote {args.output}; set {args.role}.weights = "{args.output}" in the manifest')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
