"""MasKD (Huang et al., ICLR 2023): masked feature reconstruction under the frozen receptive tokens' masks.

Official settings (hunto/MasKD ``mmrazor/configs/distill/maskd``): a trainable 1x1 align conv per FPN level,
6 tokens with the weight head, student-mask customisation after a warm-up (RetinaNet 7000, FCOS 5000 iterations),
``loss_weight`` 7 (RetinaNet) / 10 (FCOS); segmentation: 8 tokens on the logits, no head, ``lambda_kd = 1``.
The tokens come from stage 1 (``experiments.engine.tokens``) unless ``masks`` asks for another source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from baselines.fgd import fgd_box_masks
from maskd import MasKDLoss

from ..engine.fields import Problem, knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register


@dataclass(frozen=True)
class MasKDCfg:
    loss_weight: float = knob(7.0, ge=0)
    custom_mask: bool = True
    custom_mask_warmup: int = knob(50, ge=0)
    variant: Literal["detection", "segmentation"] = "detection"
    area_eps: float | None = knob(None, ge=0)  # None: the variant's (detection 0, as the official code; seg 1e-5)
    mask_power: Literal[1, 2] = 2  # 2: the official M^2 numerator; 1: the mask-weighted mean
    # learned: stage-1 tokens; untrained: the official token init; uniform: every pixel 0.5; gt_box: two fixed
    # masks per level, the union of the ground-truth boxes and its complement (FGD's box geometry), detection only
    masks: Literal["learned", "untrained", "uniform", "gt_box"] = "learned"
    features: list[str] = knob(default_factory=list, unique=True)


class MasKDDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        m, c, tk = ctx.manifest, ctx.config, ctx.manifest.tokens
        self.names, self.masks_from = ctx.features, c.masks
        s_ch, t_ch = ctx.student_channels, ctx.teacher_channels
        self.align = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(s_ch, t_ch)) if m.distill.align else None
        self.loss = MasKDLoss(
            t_ch,
            tk.num_tokens,
            weight_head=tk.weight_head and c.variant == "detection",
            custom_mask=c.custom_mask,
            custom_mask_warmup=c.custom_mask_warmup,
            loss_weight=c.loss_weight,
            variant=c.variant,
            area_eps=c.area_eps,
            mask_power=c.mask_power,
        )
        if c.masks == "learned":
            if ctx.token_state is None:
                raise ValueError("maskd with learned masks needs the stage-1 token checkpoint")
            self.loss.load_tokens(ctx.token_state)
        elif c.masks == "uniform":
            with torch.no_grad():  # sigmoid(0) = 0.5 everywhere: every pixel weighted alike
                for module in self.loss.mask_modules:
                    module.mask_token.zero_()
        # "untrained": the tokens of the official init, N(0, 0.01^2)

    def forward(self, student, teacher, batch: DistillBatch):
        aligned = [conv(s) for conv, s in zip(self.align, student)] if self.align is not None else student
        fixed = gt_box_masks(batch.extras, aligned) if self.masks_from == "gt_box" else None
        weight = self.loss.loss_weight * self.loss.scale
        levels = self.loss.levels(aligned, teacher, step=batch.step, masks=fixed)
        return {name: weight * value for name, value in zip(self.names, levels)}

    def token_masks_module(self):
        return None if self.masks_from == "gt_box" else self.loss


def gt_box_masks(extras, levels: list) -> list:
    """Two fixed masks per level for ``maskd.masks = "gt_box"``: the union of the ground-truth boxes (cells as
    FGD's box masks, official unpadded scaling) and its complement. Each is normalised by its own area in the
    MasKD loss, so objects and background count alike, as two tokens."""
    boxes = [t["boxes"] for t in extras.targets]
    out = []
    for feat in levels:
        fg, _ = fgd_box_masks(
            boxes, extras.image_sizes, tuple(feat.shape[-2:]), padded_shape=extras.batch_shape, dtype=feat.dtype
        )
        fg = (fg > 0).to(feat.dtype)
        out.append(torch.stack([fg, 1.0 - fg], dim=1))  # [N, 2, H, W]
    return out


def _checks(m) -> list[Problem]:
    c, out = m.maskd, []
    if c.custom_mask and "maskd" in m.methods and c.custom_mask_warmup >= m.student_train.iterations:
        out.append(
            Problem(
                "maskd.custom_mask_warmup",
                c.custom_mask_warmup,
                f"< student_train.iterations ({m.student_train.iterations}) while maskd.custom_mask is on "
                "(else the customisation never starts)",
            )
        )
    if c.masks == "gt_box" and m.task != "detection":
        out.append(Problem("maskd.masks", c.masks, "'learned', 'untrained' or 'uniform' for segmentation (no boxes)"))
    return out


def _hash_inputs(m) -> dict:
    if m.maskd.masks == "learned":
        return {}  # the tokens' own hash is added by the pipeline
    return {"token_setup": {"num_tokens": m.tokens.num_tokens, "weight_head": m.tokens.weight_head}}


SPEC = register(
    MethodSpec(
        name="maskd",
        title="MasKD",
        order=60,
        config=MasKDCfg,
        weight_knob="loss_weight",
        build=MasKDDistillation,
        summary="masked reconstruction under stage-1 receptive-token masks (+ align convs, weight head)",
        equal_channels=lambda m: not m.distill.align,
        uses_tokens=lambda m: m.maskd.masks == "learned",
        checks=_checks,
        hash_inputs=_hash_inputs,
        official="loss_weight 7 (RetinaNet) / 10 (FCOS), warm-up 7000 / 5000 (hunto/MasKD mmrazor configs)",
    )
)
