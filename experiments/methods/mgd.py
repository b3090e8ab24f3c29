"""MGD (Yang et al., ECCV 2022): mask a random share of the student's feature pixels, regenerate the teacher's
full feature from what is left with a small conv block, and penalise the squared error (yzd-v/MGD ``FeatureLoss``).

Official settings (yzd-v/MGD ``det/configs/distillers/mgd``): ``alpha_mgd = 2e-5, lambda_mgd = 0.65`` (the masked
share) per FPN level, one generation block per level; segmentation ``lambda_mgd = 0.75``. The random mask is
drawn from this run's own generator (seeded by the student's seed), never from the global RNG, so a run's draws
are a function of its seed and do not disturb anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baselines.mgd import MGDLevels

from ..engine.fields import knob
from .registry import Distillation, DistillBatch, DistillContext, MethodSpec, register

SEED_STRIDE = 1_000_003  # keeps the mask stream of seed s apart from every other use of s


@dataclass(frozen=True)
class MGDCfg:
    alpha_mgd: float = knob(2e-5, ge=0)
    lambda_mgd: float = knob(0.65, ge=0, lt=1)  # the MASKED share of pixels
    features: list[str] = knob(default_factory=list, unique=True)  # empty: distill.features


class MGDDistillation(Distillation):
    def __init__(self, ctx: DistillContext) -> None:
        super().__init__()
        c = ctx.config
        self.names = ctx.features
        self.loss = MGDLevels(
            ctx.student_channels, ctx.teacher_channels, alpha_mgd=c.alpha_mgd, lambda_mgd=c.lambda_mgd
        )
        self.generator = torch.Generator().manual_seed(SEED_STRIDE * ctx.seed + 17)

    def forward(self, student, teacher, batch: DistillBatch):
        levels = self.loss.forward_levels(list(student), list(teacher), generator=self.generator)
        return dict(zip(self.names, levels, strict=True))


SPEC = register(
    MethodSpec(
        name="mgd",
        title="MGD",
        order=50,
        config=MGDCfg,
        weight_knob="alpha_mgd",
        build=MGDDistillation,
        summary="random pixel masking of the student, a conv block regenerates the teacher feature, per level",
        official="alpha_mgd 2e-5, lambda_mgd 0.65 per FPN level (yzd-v/MGD det configs); 0.75 for segmentation",
    )
)
