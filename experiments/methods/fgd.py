"""Focal and global distillation (FGD, Yang et al., CVPR 2022): foreground / background feature imitation
weighted by the teacher's attention, an attention-mask loss and a global-context (GcBlock) relation loss.

Official weights (yzd-v/FGD ``configs/distillers/fgd``, RetinaNet R101 -> R50): ``temp 0.5, alpha 1e-3,
beta 5e-4, gamma 5e-4, lambda 5e-6``. ``weight_scale`` multiplies all four (the knob calibration and tuning move).
Detection only: the foreground masks come from the ground-truth boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from baselines.fgd import FGDFeatureLoss

from ..engine.fields import knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register

PARTS = (("fg", "alpha_fgd", "fg_loss"), ("bg", "beta_fgd", "bg_loss"), ("mask", "gamma_fgd", "mask_loss"))


@dataclass(frozen=True)
class FGDCfg:
    temp: float = knob(0.5, gt=0)
    alpha_fgd: float = knob(1e-3, ge=0)
    beta_fgd: float = knob(5e-4, ge=0)
    gamma_fgd: float = knob(5e-4, ge=0)
    lambda_fgd: float = knob(5e-6, ge=0)
    weight_scale: float = knob(1.0, ge=0)  # multiplies alpha..lambda; see the manifests for why it is not 1 here
    box_scale: Literal["unpadded", "padded"] = "unpadded"
    features: list[str] = knob(default_factory=list, unique=True)


class FGDDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        c = ctx.config
        w = c.weight_scale
        self.names = ctx.features
        self.levels = nn.ModuleList(
            FGDFeatureLoss(
                s,
                t,
                temp=c.temp,
                alpha_fgd=c.alpha_fgd * w,
                beta_fgd=c.beta_fgd * w,
                gamma_fgd=c.gamma_fgd * w,
                lambda_fgd=c.lambda_fgd * w,
                box_scale=c.box_scale,
            )
            for s, t in zip(ctx.student_channels, ctx.teacher_channels)
        )

    def forward(self, student, teacher, batch: DistillBatch):
        extras = batch.extras
        boxes = [t["boxes"] for t in extras.targets]
        terms = {}
        for name, level, s, t in zip(self.names, self.levels, student, teacher):
            parts = level.components(s, t, boxes, extras.image_sizes, padded_shape=extras.batch_shape)
            for short, weight, key in PARTS:
                terms[f"{name}/{short}"] = getattr(level, weight) * parts[key]
            terms[f"{name}/relation"] = level.lambda_fgd * parts["rela_loss"]
        return terms


SPEC = register(
    MethodSpec(
        name="fgd",
        title="FGD",
        order=30,
        config=FGDCfg,
        weight_knob="weight_scale",
        build=FGDDistillation,
        summary="focal (box-masked, attention-weighted) and global (GcBlock) distillation per FPN level",
        tasks=("detection",),
        needs=frozenset({"boxes"}),
        official="temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6 (yzd-v/FGD RetinaNet configs)",
    )
)
