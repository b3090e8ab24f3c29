"""Channel-wise distillation (CWD, Shu et al., ICCV 2021): a spatial softmax per channel, KL to the teacher's.

Official weights: ``tau = 1, loss_weight = 10`` per FPN level (mmrazor FPN configs); ``tau = 1, loss_weight = 5``
on PSPNet Cityscapes logits. No align conv: student and teacher channels must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.cwd import ChannelWiseDivergence

from ..engine.fields import knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register


@dataclass(frozen=True)
class CWDCfg:
    tau: float = knob(1.0, gt=0)
    loss_weight: float = knob(10.0, ge=0)
    features: list[str] = knob(default_factory=list, unique=True)


class CWDDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        self.names = ctx.features
        self.loss = ChannelWiseDivergence(tau=ctx.config.tau, loss_weight=ctx.config.loss_weight)

    def forward(self, student, teacher, batch: DistillBatch):
        return {n: self.loss(s, t) for n, s, t in zip(self.names, student, teacher)}


SPEC = register(
    MethodSpec(
        name="cwd",
        title="CWD",
        order=20,
        config=CWDCfg,
        weight_knob="loss_weight",
        build=CWDDistillation,
        summary="channel-wise spatial-softmax KL per level",
        equal_channels=lambda m: True,
        official="tau 1, loss_weight 10 per FPN level (mmrazor); 5 on Cityscapes logits",
    )
)
