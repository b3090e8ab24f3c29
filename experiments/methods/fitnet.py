"""FitNet as the MasKD repository runs it ("mimic"): a trainable 1x1 align conv per level, then MSE to the teacher.

Official weight: ``loss_weight = 1`` on the five FPN levels (hunto/MasKD ``mmrazor/configs/distill/dist/
dist+mimic_*.py``). Loss: :class:`baselines.fitnet.FitNetMSE`, one per level so that each level is its own term.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from baselines.fitnet import FitNetMSE

from ..engine.fields import knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register


@dataclass(frozen=True)
class FitNetCfg:
    loss_weight: float = knob(1.0, ge=0)
    features: list[str] = knob(default_factory=list, unique=True)  # empty: distill.features


class FitNetDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        self.names = ctx.features
        self.levels = nn.ModuleList(
            FitNetMSE([s], [t], loss_weight=ctx.config.loss_weight, align=True)
            for s, t in zip(ctx.student_channels, ctx.teacher_channels)
        )

    def forward(self, student, teacher, batch: DistillBatch):
        return {n: loss([s], [t]) for n, loss, s, t in zip(self.names, self.levels, student, teacher)}


SPEC = register(
    MethodSpec(
        name="fitnet",
        title="FitNet",
        order=10,
        config=FitNetCfg,
        weight_knob="loss_weight",
        build=FitNetDistillation,
        summary="1x1 align conv + MSE per level (MasKD repo mimic)",
        official="loss_weight 1 (hunto/MasKD dist+mimic configs)",
    )
)
