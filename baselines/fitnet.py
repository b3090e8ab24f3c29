"""FitNet-style feature-imitation losses (Romero et al., ICLR 2015), in three upstream forms.

Shape shorthand: ``N`` batch, ``C_s``/``C_t`` student/teacher channels, ``H, W`` feature-map size, ``l`` an
FPN level. ``sg(·)`` is stop-gradient: every loss here detaches the teacher (upstream the teacher runs under
``no_grad``, so the values and student gradients are the same as the originals').

Paper equation (hint loss with a regressor ``r``)::

    L_hint = ½ ‖ F^T − r(F^S) ‖²

which the dense-prediction KD literature (MasKD §5.4 of ``shared/paper_tables.md``) uses as

    L = λ · Σ_l 1/(N·C_t·H_l·W_l) · ‖ Conv1x1_l(F^S_l) − F^T_l ‖²

The three classes differ in the regressor and, above all, in the normalisation:

* :class:`FitNetMSE` — the MasKD repo's "mimic" baseline (hunto/MasKD ``mmrazor/.../losses/mse.py`` with the
  ``SingleTeacherDistiller`` align convs): a trainable 1×1 ``nn.Conv2d(C_s, C_t, 1)`` per level (PyTorch
  default init), element-wise **mean** per level, levels **summed**, times ``loss_weight`` (1 in the mimic
  configs).
* :class:`MdistillerFitNet` — mdistiller's classification FitNet: ``ConvReg`` = conv (chosen from the spatial
  sizes) → ``BatchNorm2d(C_t)`` (batch statistics in train mode) → ReLU, element-wise **mean**, times
  ``feat_weight`` (100 in mdistiller). One hint layer, no levels.
* :class:`MmrazorL2Loss` — mmrazor 1.x ``L2Loss`` (the FitNets configs use ``loss_weight=10``): each sample is
  flattened and divided by its L2 norm, then the **sum** of squared differences is divided by ``N`` (not by
  the number of elements). No regressor inside; pair it with your own connector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._levels import pair_levels

__all__ = ["FitNetMSE", "MdistillerFitNet", "MmrazorL2Loss"]


def _channel_list(value: int | Sequence[int], name: str) -> list[int] | None:
    """``int`` -> None (broadcastable); sequence of positive ints -> list."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a sequence of ints, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return None
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{name} must be an int or a non-empty sequence of ints, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}[{i}] must be a positive int, got {v!r}")
        out.append(int(v))
    return out


def _require_4d(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean((pred − target)²)``; written out so mixed dtypes under autocast promote instead of failing."""
    return (pred - target).pow(2).mean()


class FitNetMSE(nn.Module):
    """MasKD-repo "mimic" FitNet: ``loss_weight · Σ_l mean((align_l(S_l) − sg(T_l))²)``.

    ``S_l``: ``[N, C_s,l, H_l, W_l]``; ``T_l``: ``[N, C_t,l, H_l, W_l]``;
    ``align_l = nn.Conv2d(C_s,l, C_t,l, 1)`` (PyTorch default init: kaiming_uniform(a=√5) weight,
    U(±1/√C_s) bias), trained with the student. The mean is over the ``N·C_t·H_l·W_l`` elements of each level
    (``nn.MSELoss()``), the levels are summed (not averaged).

    Args:
        student_channels: ``C_s`` per level (an int for one level, or broadcast over ``teacher_channels``'s
            levels).
        teacher_channels: ``C_t`` per level (same rules).
        loss_weight: ``λ`` (1.0 in the MasKD mimic configs).
        align: build the 1×1 align convs (``self.align``, an ``nn.ModuleList``, keys ``"<l>.weight"``).
            ``False`` uses identity (requires ``C_s == C_t``), i.e. the bare MasKD ``MSELoss``.

    ``forward(student_feats, teacher_feats)`` takes one tensor each (one level) or equally long sequences, and
    returns a 0-dim tensor. ``ValueError`` names the offending tensor on channel, shape or level-count
    mismatch.
    """

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        loss_weight: float = 1.0,
        align: bool = True,
    ) -> None:
        super().__init__()
        s_list = _channel_list(student_channels, "student_channels")
        t_list = _channel_list(teacher_channels, "teacher_channels")
        if s_list is None and t_list is None:
            s_list, t_list = [int(student_channels)], [int(teacher_channels)]  # type: ignore[arg-type]
        elif s_list is None:
            s_list = [int(student_channels)] * len(t_list)  # type: ignore[arg-type]
        elif t_list is None:
            t_list = [int(teacher_channels)] * len(s_list)  # type: ignore[arg-type]
        assert s_list is not None and t_list is not None
        if len(s_list) != len(t_list):
            raise ValueError(f"student_channels has {len(s_list)} levels but teacher_channels has {len(t_list)}")
        if not align:
            for i, (cs, ct) in enumerate(zip(s_list, t_list, strict=True)):
                if cs != ct:
                    raise ValueError(
                        f"align=False needs equal channels, but level {i} has student {cs} and teacher {ct}"
                    )
        self.student_channels = tuple(s_list)
        self.teacher_channels = tuple(t_list)
        self.num_levels = len(s_list)
        self.loss_weight = float(loss_weight)
        self.use_align = bool(align)
        if self.use_align:
            self.align = nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in zip(s_list, t_list, strict=True))
        else:
            self.align = nn.ModuleList(nn.Identity() for _ in s_list)

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"loss_weight={self.loss_weight}"
        )

    def forward(self, student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor]) -> Tensor:
        pairs = pair_levels(student_feats, teacher_feats, self.num_levels)
        total: Tensor | None = None
        for lvl, (s_name, t_name, s, t) in enumerate(pairs):
            _require_4d(s, s_name)
            _require_4d(t, t_name)
            cs, ct = self.student_channels[lvl], self.teacher_channels[lvl]
            what = "the align conv expects" if self.use_align else "expected"
            if s.shape[1] != cs:
                raise ValueError(f"{s_name} has {s.shape[1]} channels, {what} {cs}")
            if t.shape[1] != ct:
                raise ValueError(f"{t_name} has {t.shape[1]} channels, expected {ct}")
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise ValueError(
                    f"{s_name} has shape {tuple(s.shape)} but {t_name} has shape {tuple(t.shape)}; "
                    "batch and spatial sizes must match"
                )
            level = _mse(self.align[lvl](s), t.detach())
            total = level if total is None else total + level
        assert total is not None
        return self.loss_weight * total


def _chw(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise ValueError(f"{name} must be (N, C, H, W) or (C, H, W) with positive sizes, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


class MdistillerFitNet(nn.Module):
    """mdistiller FitNet: ``feat_weight · mean((relu(bn(conv(S))) − sg(T))²)``.

    ``S``: ``[N, C_s, H_s, W_s]``; ``T``: ``[N, C_t, H_t, W_t]``. The regressor is mdistiller's ``ConvReg``;
    its conv is chosen from the *heights* only, in this order:

    * ``H_s == 2·H_t``: ``Conv2d(C_s, C_t, 3, stride=2, padding=1)``;
    * ``2·H_s == H_t``: ``ConvTranspose2d(C_s, C_t, 4, stride=2, padding=1)``;
    * ``H_s >= H_t``: ``Conv2d(C_s, C_t, (1+H_s−H_t, 1+W_s−W_t))`` (1×1 for equal sizes);
    * otherwise ``ValueError`` (mdistiller raises ``NotImplemented``, itself a ``TypeError``).

    then ``BatchNorm2d(C_t)`` (train mode: batch statistics, as mdistiller trains it; eval mode: running
    statistics) and, with ``use_relu``, a ReLU. Normalisation: mean over ``N·C_t·H_t·W_t`` elements
    (``F.mse_loss``), times ``feat_weight`` (``FITNET.LOSS.FEAT_WEIGHT = 100``). Unlike :class:`FitNetMSE`,
    the regressor has BN+ReLU, the weight is 100 and there is a single hint layer.

    Submodules ``conv`` and ``bn`` give mdistiller's state_dict keys (``conv.weight``, ``conv.bias``,
    ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``).

    Args:
        student_shape: ``(N, C_s, H_s, W_s)`` or ``(C_s, H_s, W_s)`` (``N`` ignored).
        teacher_shape: ``(N, C_t, H_t, W_t)`` or ``(C_t, H_t, W_t)``.
        feat_weight: loss weight (mdistiller default 100).
        use_relu: apply the ReLU after BN (mdistiller default ``True``).
    """

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        feat_weight: float = 100.0,
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        s_c, s_h, s_w = _chw(student_shape, "student_shape")
        t_c, t_h, t_w = _chw(teacher_shape, "teacher_shape")
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            if s_w < t_w:
                raise ValueError(
                    f"student width {s_w} < teacher width {t_w} with student height {s_h} >= teacher height "
                    f"{t_h}: ConvReg's kernel (1+H_s-H_t, 1+W_s-W_t) would be empty"
                )
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"unsupported sizes for ConvReg: student height {s_h}, teacher height {t_h} (needs "
                "H_s == 2*H_t, 2*H_s == H_t or H_s >= H_t)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.student_channels = s_c
        self.teacher_channels = t_c
        self.feat_weight = float(feat_weight)
        self.use_relu = bool(use_relu)

    def extra_repr(self) -> str:
        return f"feat_weight={self.feat_weight}, use_relu={self.use_relu}"

    def regress(self, student_feats: Tensor) -> Tensor:
        """``ConvReg(S)``: ``[N, C_s, H_s, W_s] -> [N, C_t, H', W']``."""
        x = self.bn(self.conv(student_feats))
        return F.relu(x) if self.use_relu else x

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        if not isinstance(student_feats, Tensor) or not isinstance(teacher_feats, Tensor):
            raise ValueError(
                "student_feats and teacher_feats must be tensors, got "
                f"{type(student_feats).__name__} and {type(teacher_feats).__name__}"
            )
        _require_4d(student_feats, "student_feats")
        _require_4d(teacher_feats, "teacher_feats")
        if student_feats.shape[1] != self.student_channels:
            raise ValueError(
                f"student_feats has {student_feats.shape[1]} channels, the regressor conv expects "
                f"{self.student_channels}"
            )
        if teacher_feats.shape[1] != self.teacher_channels:
            raise ValueError(f"teacher_feats has {teacher_feats.shape[1]} channels, expected {self.teacher_channels}")
        reg = self.regress(student_feats)
        if reg.shape != teacher_feats.shape:
            raise ValueError(
                f"regressed student_feats has shape {tuple(reg.shape)} (from {tuple(student_feats.shape)}) "
                f"but teacher_feats has shape {tuple(teacher_feats.shape)}"
            )
        return self.feat_weight * _mse(reg, teacher_feats.detach())


class MmrazorL2Loss(nn.Module):
    """mmrazor 1.x ``L2Loss``: ``loss_weight · Σ(ŝ − t̂)² / N`` with per-sample L2-normalised features.

    ``S, T``: ``[N, ...]`` of identical shape (``[N, C, H, W]`` or ``[N, C]``).

    * ``normalize=True``: each sample is flattened, ``x̂ = x / ‖x‖₂ · mult``. ``mult`` is ignored otherwise
      (the features are used as they are, unflattened).
    * The reduction is the **sum** of squared differences, divided by ``N`` (``div_element=False``, the
      default) or by the element count ``S.numel()`` (``div_element=True``); with ``dist=True`` it is instead
      ``sqrt(Σ(ŝ − t̂)²)`` (``torch.dist(p=2)``, no division; its gradient is NaN when ``ŝ == t̂``).
    * Finally times ``loss_weight`` (10 in mmrazor's FitNets configs).

    With ``normalize=True`` this is not FitNet's MSE: the loss is bounded (≤ 4·mult²·loss_weight) and
    scale-free.

    Literal behaviour kept: the norm has no epsilon, so an all-zero sample gives ``0/0 = NaN``. ``eps > 0``
    clamps the norm from below (``x / max(‖x‖₂, eps)``, as ``F.normalize``) for a safe variant. The teacher is
    detached (upstream it has no grad anyway). Input may be non-contiguous (``reshape`` instead of ``view``).
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        normalize: bool = True,
        mult: float = 1.0,
        div_element: bool = False,
        dist: bool = False,
        eps: float = 0.0,
    ) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.loss_weight = float(loss_weight)
        self.normalize = bool(normalize)
        self.mult = float(mult)
        self.div_element = bool(div_element)
        self.dist = bool(dist)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return (
            f"loss_weight={self.loss_weight}, normalize={self.normalize}, mult={self.mult}, "
            f"div_element={self.div_element}, dist={self.dist}, eps={self.eps}"
        )

    def normalize_feature(self, feature: Tensor) -> Tensor:
        """``[N, ...] -> [N, D]``: flatten each sample and scale it to L2 norm ``mult``."""
        flat = feature.reshape(feature.shape[0], -1)
        norm = torch.linalg.vector_norm(flat, ord=2, dim=1, keepdim=True)
        if self.eps > 0:
            norm = norm.clamp_min(self.eps)
        return flat / norm * self.mult

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        if not isinstance(student_feats, Tensor) or not isinstance(teacher_feats, Tensor):
            raise ValueError(
                "student_feats and teacher_feats must be tensors, got "
                f"{type(student_feats).__name__} and {type(teacher_feats).__name__}"
            )
        if student_feats.dim() < 2:
            raise ValueError(f"student_feats must be at least 2-D [N, ...], got {tuple(student_feats.shape)}")
        if student_feats.shape != teacher_feats.shape:
            raise ValueError(
                f"student_feats has shape {tuple(student_feats.shape)} but teacher_feats has shape "
                f"{tuple(teacher_feats.shape)}"
            )
        s, t = student_feats, teacher_feats.detach()
        if self.normalize:
            s, t = self.normalize_feature(s), self.normalize_feature(t)
        loss = torch.sum((s - t).pow(2))
        if self.dist:
            loss = torch.sqrt(loss)
        elif self.div_element:
            loss = loss / s.numel()
        else:
            loss = loss / s.shape[0]
        return self.loss_weight * loss
