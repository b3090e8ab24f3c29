"""MasKD: masked distillation with receptive tokens (Huang et al., ICLR 2023), in plain PyTorch.

- :class:`ReceptiveTokens`, :func:`dice_coeff` -- tokens, masks, weight head, diversity term (``tokens.py``);
- :class:`MaskLearning` -- stage 1, learning the tokens on the frozen teacher (``mask_learning.py``);
- :class:`MasKDLoss` -- stage 2, the masked reconstruction loss for the student (``loss.py``).

This package imports torch only: no I/O, no configuration files, no tracking.
"""

from .loss import VARIANTS, MasKDLoss
from .mask_learning import MaskLearning, MaskLearningOutput
from .tokens import ReceptiveTokens, dice_coeff

__all__ = ["VARIANTS", "MasKDLoss", "MaskLearning", "MaskLearningOutput", "ReceptiveTokens", "dice_coeff"]
