"""Stage 1: learning the receptive tokens on the frozen teacher.

Official code: hunto/MasKD @ b5af34fe343f ``mmdetection/maskd.py`` (``MaskModule.forward_train``) and
``mmdetection/maskd_hook.py`` (``MasKDHook``). The hook replaces every FPN output F of the frozen teacher by the
weighted sum of its masked copies, ``F_hat = sum_t w_t (M_t * F)``, and adds the Dice diversity term of each level
to the teacher's own task loss: ``objective = task_loss(F_hat) + dice_weight * sum_levels dice(M)``.
The official weight of the Dice term is 1 (hard-wired); ``dice_weight`` exposes it for ablations.

What the training code must do around this module (as the hook does): freeze every teacher parameter, keep the
teacher's BatchNorm layers in eval mode, and optimise only this module's parameters (Adam, lr 0.01, weight decay
1e-3, cosine to 1e-6 in the official detection configs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .loss import as_feature_list
from .tokens import Impl, ReceptiveTokens, dice_coeff


class MaskLearningOutput(NamedTuple):
    """``features``: the masked features, one [N, C, H, W] per level; ``dice``: [levels] Dice terms;
    ``masks``: the token masks, one [N, T, H, W] per level."""

    features: list[Tensor]
    dice: Tensor
    masks: list[Tensor]


class MaskLearning(nn.Module):
    """Receptive tokens for every distilled level, trained on the frozen teacher (stage 1).

    State_dict keys are ``mask_modules.{level}.mask_token`` and ``mask_modules.{level}.prob.{0,2}.*``, the keys
    :meth:`maskd.MasKDLoss.load_tokens` expects, so a stage-1 checkpoint loads into the stage-2 loss unchanged.

    Args:
        channels: C of each level (``[256] * 5`` for a RetinaNet FPN; ``[19]`` for Cityscapes logits).
        num_tokens: T (6 for detection, 8 for segmentation in the official code).
        weight_head: weight the masked copies per image (detection: True; segmentation: False).
        dice_weight: weight of the Dice term in :meth:`objective` (official: 1).
        impl: ``"fast"`` folds the masks before multiplying the features; ``"literal"`` materialises
            [N, T, C, H, W] as the official code does.

    Forward:
        ``forward(teacher_feats)`` with a tensor or a sequence of [N, C, H, W] tensors -> :class:`MaskLearningOutput`.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_tokens: int = 6,
        weight_head: bool = True,
        dice_weight: float = 1.0,
        impl: Impl = "fast",
    ) -> None:
        super().__init__()
        if isinstance(channels, int):
            channels = [channels]
        self.channels = list(channels)
        self.num_tokens = num_tokens
        self.dice_weight = dice_weight
        self.impl = impl
        self.mask_modules = nn.ModuleList(ReceptiveTokens(c, num_tokens, weight_head) for c in self.channels)

    def forward(self, teacher_feats: Tensor | Sequence[Tensor]) -> MaskLearningOutput:
        feats = as_feature_list(teacher_feats, "teacher_feats")
        if len(feats) != len(self.mask_modules):
            raise ValueError(
                f"teacher_feats has {len(feats)} levels but MaskLearning was built for {len(self.mask_modules)}"
            )
        outs, dices, masks = [], [], []
        for level, (tokens, f) in enumerate(zip(self.mask_modules, feats)):
            if f.dim() != 4 or f.shape[1] != tokens.channels:
                raise ValueError(
                    f"teacher_feats[{level}] has shape {tuple(f.shape)}, expected (N, {tokens.channels}, H, W)"
                )
            out, level_masks = tokens.mask_features(f, impl=self.impl)
            outs.append(out)
            masks.append(level_masks)
            dices.append(dice_coeff(level_masks.flatten(2)))
        return MaskLearningOutput(outs, torch.stack(dices), masks)

    def objective(self, task_loss: Tensor, output: MaskLearningOutput) -> Tensor:
        """Stage-1 objective: ``task_loss + dice_weight * sum_levels dice``."""
        return task_loss + self.dice_weight * output.dice.sum()
