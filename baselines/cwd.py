"""Channel-wise distillation (CWD, Shu et al., ICCV 2021), in the form the original code computes it.

Shape shorthand: ``N`` batch, ``C`` channels, ``H, W`` feature-map size, ``τ`` temperature.

Each channel map of a dense prediction or feature, ``y[n, c] ∈ R^{H·W}``, is turned into a distribution over
its ``H·W`` locations with a temperature softmax, ``φ(y)_i = exp(y_i/τ) / Σ_j exp(y_j/τ)``, and the student's
distribution is pulled towards the teacher's with a KL divergence (``S`` student, ``T`` teacher)::

    L_cwd = loss_weight · τ²/(N·C) · Σ_{n,c} Σ_{i=1}^{H·W} φ(T_{n,c})_i · log(φ(T_{n,c})_i / φ(S_{n,c})_i)

Normalisation: the per-channel KL is *summed* over locations and *averaged* over the ``N·C`` channel maps (not
over ``N·C·H·W`` elements), then scaled by ``τ²`` (the usual gradient-magnitude correction of soft-target KD).

Variants this module covers:

* **mmrazor** ``ChannelWiseDivergence(tau, loss_weight)`` (open-mmlab/mmrazor, identical copy in hunto/MasKD):
  the formula above with ``log_softmax``; the teacher is *not* detached (harmless in practice because the
  teacher forward runs under ``no_grad``); it reshapes with ``.view`` so it needs contiguous input; one loss
  instance per FPN level, summed by the distiller. ``channel_wise_divergence`` is this literal form (minus
  ``loss_weight``), and ``ChannelWiseDivergence(detach_teacher=False)`` reproduces it exactly.
* **TorchDistiller** ``CriterionCWD(norm_type='channel', divergence='kl', temperature=τ)`` (the authors'
  segmentation code): mathematically identical, but it detaches the teacher and takes ``log(softmax(·))``
  instead of ``log_softmax`` (less stable: ``-inf`` for extreme logits). ``ChannelWiseDivergence()`` (default
  ``detach_teacher=True``) gives its value and its gradients while keeping the stable ``log_softmax``.

Config values seen upstream: mmrazor FPN configs (Faster R-CNN / RetinaNet) ``tau=1, loss_weight=10`` on each
of the 5 FPN levels; mmrazor PSPNet Cityscapes logits ``tau=1, loss_weight=5``; TorchDistiller usage example
(``exp_cwd.sh channel kl 3 4``) ``loss_weight=3, tau=4``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._levels import pair_levels

__all__ = ["ChannelWiseDivergence", "channel_wise_divergence"]


def _check_pair(student: Tensor, teacher: Tensor, s_name: str, t_name: str) -> None:
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise ValueError(
            f"{s_name} and {t_name} must be tensors, got {type(student).__name__} and {type(teacher).__name__}"
        )
    if student.dim() != 4:
        raise ValueError(f"{s_name} must be 4-D [N, C, H, W], got shape {tuple(student.shape)}")
    if teacher.dim() != 4:
        raise ValueError(f"{t_name} must be 4-D [N, C, H, W], got shape {tuple(teacher.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{s_name} has shape {tuple(student.shape)} but {t_name} has shape {tuple(teacher.shape)}; "
            "CWD needs identical [N, C, H, W] (align the channels first)"
        )


def channel_wise_divergence(student_feats: Tensor, teacher_feats: Tensor, tau: float = 1.0) -> Tensor:
    """Unweighted CWD of one level: ``τ²/(N·C) · Σ_{n,c} KL(φ(T_{n,c}/τ) ‖ φ(S_{n,c}/τ))``.

    Literal mmrazor form: ``softmax``/``log_softmax`` over the ``H·W`` locations of each channel, summed KL,
    divided by ``N·C``, times ``τ²``. The teacher is **not** detached here (as in mmrazor); detach it yourself
    or use :class:`ChannelWiseDivergence`. Unlike mmrazor it uses ``reshape``, so non-contiguous input is
    fine.

    Args:
        student_feats: ``[N, C, H, W]`` student logits/features.
        teacher_feats: ``[N, C, H, W]`` teacher logits/features, same shape.
        tau: softmax temperature ``τ > 0``.

    Returns:
        0-dim tensor (multiply by the loss weight yourself).

    Raises:
        ValueError: if the inputs are not 4-D tensors of identical shape, or ``tau <= 0``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_pair(student_feats, teacher_feats, "student_feats", "teacher_feats")
    n, c, h, w = student_feats.shape
    s = student_feats.reshape(n * c, h * w) / tau
    t = teacher_feats.reshape(n * c, h * w) / tau
    p_t = F.softmax(t, dim=1)
    # Σ p_T (log p_T − log p_S), same term grouping as mmrazor.
    kl_sum = torch.sum(p_t * F.log_softmax(t, dim=1) - p_t * F.log_softmax(s, dim=1))
    return kl_sum * (tau**2) / (c * n)


class ChannelWiseDivergence(nn.Module):
    """CWD loss over one feature map or a sequence of FPN levels (levels summed).

    ``forward(S, T) = loss_weight · Σ_l channel_wise_divergence(S_l, sg(T_l), tau)``, where ``S_l, T_l`` are
    ``[N, C_l, H_l, W_l]`` and ``sg`` (stop-gradient) applies only when ``detach_teacher=True``.

    The per-level normalisation is ``τ²/(N·C_l)`` (see the module docstring); the ``loss_weight`` is applied
    to every level, which equals mmrazor's detection configs (one ``ChannelWiseDivergence(tau, loss_weight)``
    instance per FPN level, summed by the distiller).

    Args:
        tau: temperature (mmrazor/TorchDistiller default 1.0).
        loss_weight: weight applied to every level (mmrazor FPN configs: 10; PSPNet logits: 5;
            TorchDistiller example: 3 with ``tau=4``).
        detach_teacher: detach the teacher features (default, as TorchDistiller ``CriterionCWD``). ``False``
            reproduces mmrazor exactly, where the gradient would flow into the teacher if it required grad.
    """

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0, detach_teacher: bool = True) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.loss_weight = float(loss_weight)
        self.detach_teacher = bool(detach_teacher)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}, detach_teacher={self.detach_teacher}"

    def forward(self, student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor]) -> Tensor:
        """Args: one ``[N, C, H, W]`` tensor each, or equally long sequences of per-level tensors.

        Returns a 0-dim tensor. Raises ``ValueError`` on mismatched types, level counts or shapes.
        """
        pairs = pair_levels(student_feats, teacher_feats)
        total: Tensor | None = None
        for s_name, t_name, s, t in pairs:
            _check_pair(s, t, s_name, t_name)
            if self.detach_teacher:
                t = t.detach()
            level = channel_wise_divergence(s, t, self.tau)
            total = level if total is None else total + level
        assert total is not None
        return self.loss_weight * total
