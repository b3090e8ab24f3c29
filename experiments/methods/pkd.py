"""PKD (Cao et al., NeurIPS 2022): imitate the teacher's features after standardising each channel, i.e. maximise
their Pearson correlation, with an MSE between the standardised maps (mmrazor 1.x ``PKDLoss``).

Official weight (mmrazor ``configs/distill/mmdet/pkd``): ``loss_weight = 6`` on the FPN outputs, student features
resized to the teacher's (``resize_stu = True``). No align conv: student and teacher channels must be equal.
Loss: :class:`baselines.pkd.PKDLoss`, whose ``forward_levels`` gives one term per level.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.pkd import PKDLoss

from ..engine.fields import knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register


@dataclass(frozen=True)
class PKDCfg:
    loss_weight: float = knob(6.0, ge=0)
    resize_stu: bool = True  # on a height mismatch the student is resized to the teacher (official default)
    features: list[str] = knob(default_factory=list, unique=True)  # empty: distill.features


class PKDDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        self.names = ctx.features
        self.loss = PKDLoss(loss_weight=ctx.config.loss_weight, resize_stu=ctx.config.resize_stu)

    def forward(self, student, teacher, batch: DistillBatch):
        return dict(zip(self.names, self.loss.forward_levels(list(student), list(teacher)), strict=True))


SPEC = register(
    MethodSpec(
        name="pkd",
        title="PKD",
        order=40,
        config=PKDCfg,
        weight_knob="loss_weight",
        build=PKDDistillation,
        summary="MSE between per-channel standardised features (Pearson correlation) per level",
        equal_channels=lambda m: True,
        official="loss_weight 6 on the FPN outputs (mmrazor 1.x configs/distill/mmdet/pkd)",
    )
)
