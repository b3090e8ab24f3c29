"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022), in the form the official code computes it.

This reproduces the authors' ``FeatureLoss(student_channels, teacher_channels, name, alpha_mgd=2e-5,
lambda_mgd=0.65)`` of yzd-v/MGD @ 2c9da0b28625 (``det/mmdet/distillation/losses/mgd.py``; the segmentation copy
differs only in the class default ``lambda_mgd=0.75``); ``shared/reference/README.md`` §4b is the specification
and the golden cases ``tests/data/reference/*mgd*`` pin it.

Shape shorthand: ``N`` batch, ``Cs``/``Ct`` student/teacher channels, ``H, W`` feature-map size of one level,
``S``/``T`` student/teacher features, ``U`` a uniform draw in ``[0, 1)``.

Per level (paper Eq. 1-3; ``λ`` = ``lambda_mgd`` is the *masked* fraction, ``α`` = ``alpha_mgd``)::

    S'   = align(S) if Cs != Ct else S                        align: Conv2d(Cs, Ct, 1)
    U    ~ Uniform[0, 1) of shape [N, 1, H, W]                 one draw per call and level
    M    = where(U > 1 − λ, 0, 1)                              0 = masked; the same mask for every channel
    G    = generation(S' ⊙ M)                                  Conv3x3(Ct, Ct) → ReLU → Conv3x3(Ct, Ct), padding 1
    loss = α · Σ_{n,c,h,w} (G − T)² / N                        MSELoss(reduction='sum') divided by N only

Detection configs distil the 5 FPN outputs with ``α = 2e-5, λ = 0.65``, one ``FeatureLoss`` (own align and
generation block) per level, summed (:class:`MGDLevels`); the student is initialised from the teacher.

Oddities of the official code (README §4b) and what this module does about them:

1. The draw comes from the global RNG inside ``forward`` (``torch.rand((N, 1, H, W)).to(device)``): here it
   never does. ``forward`` takes the draw itself (``rand=``, ``[N, 1, H, W]``) or a ``torch.Generator``
   (``generator=``) to draw it from, on the generator's device (so a CPU generator gives the same mask on any
   device, as the official CPU draw does) in float64 for float64 features and float32 otherwise (the official
   default dtype); giving neither is a ``ValueError``. The golden cases store the draw as ``rand``.
2. ``where(U > 1 − λ, 0, 1)`` is an integer tensor that ``S' ⊙ M`` promotes to the features' dtype.
3. All convs keep PyTorch's default init, drawn from the global RNG at construction in definition order
   (``align`` first, then ``generation``), so a seeded construction matches the official one.
4. Every reduction divides by ``N`` only, so the loss scales with ``Ct·H·W`` (hence ``α = 2e-5``).
5. The teacher is not detached (the distiller runs it under ``no_grad``); ``align`` and ``generation`` are
   trained with the student.

Where this module departs from the official code: bad shapes and channel counts raise a one-line
``ValueError`` naming the tensors (the official code only asserts equal ``(H, W)``).

Two implementations, held equal by ``tests/test_mgd.py``: ``impl="literal"`` follows the official
``get_dis_loss`` step by step (integer ``where`` mask, ``torch.mul``, ``nn.MSELoss(reduction='sum') / N``, then
``· α``); ``impl="fast"`` (default) builds the mask directly in the features' dtype and folds ``α / N`` into one
scalar after ``F.mse_loss(reduction='sum')``. The two convs dominate the cost, so the gain is small; the fast form
exists to keep the integer mask and its promotion out of the training path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._levels import pair_levels

__all__ = ["MGDLevels", "MGDLoss", "mgd_mask"]

_IMPLS = ("literal", "fast")


def mgd_mask(rand: Tensor, lambda_mgd: float) -> Tensor:
    """Official mask ``where(rand > 1 − lambda_mgd, 0, 1)``: 1 keeps a pixel, 0 masks it (``int64``, as official)."""
    return torch.where(rand > 1 - lambda_mgd, 0, 1)


def _check_feats(feats: Tensor, name: str, channels: int, channels_arg: str) -> None:
    if not isinstance(feats, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(feats).__name__}")
    if feats.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {feats.dtype}")
    if feats.shape[1] != channels:
        raise ValueError(
            f"{name} has {feats.shape[1]} channels (shape {tuple(feats.shape)}), the loss was built for "
            f"{channels_arg}={channels}"
        )


def _channels(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_hyper(alpha_mgd: float, lambda_mgd: float, impl: str) -> None:
    if not 0.0 <= lambda_mgd <= 1.0:
        raise ValueError(f"lambda_mgd (the masked fraction) must be in [0, 1], got {lambda_mgd}")
    if not (alpha_mgd >= 0.0 and alpha_mgd != float("inf")):
        raise ValueError(f"alpha_mgd must be finite and >= 0, got {alpha_mgd}")
    if impl not in _IMPLS:
        raise ValueError(f"impl = {impl!r}, expected one of {_IMPLS}")


class MGDLoss(nn.Module):
    """MGD loss of one feature level: the official ``FeatureLoss`` (module docstring), the draw passed in.

    State-dict keys are the official ones: ``align.weight``, ``align.bias`` (only when ``Cs != Ct``),
    ``generation.0.{weight,bias}``, ``generation.2.{weight,bias}``.

    Args:
        student_channels: ``Cs``.
        teacher_channels: ``Ct``.
        alpha_mgd: loss weight ``α`` (official default and detection configs: 2e-5).
        lambda_mgd: masked fraction ``λ`` (detection: 0.65; the segmentation class default: 0.75).
        impl: ``"fast"`` (default) or ``"literal"``; same values to rounding.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha_mgd: float = 2e-5,
        lambda_mgd: float = 0.65,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        self.student_channels = _channels(student_channels, "student_channels")
        self.teacher_channels = _channels(teacher_channels, "teacher_channels")
        _check_hyper(alpha_mgd, lambda_mgd, impl)
        self.alpha_mgd = float(alpha_mgd)
        self.lambda_mgd = float(lambda_mgd)
        self.impl = impl
        # Definition order = official order of default-init RNG draws: align first, then generation.
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.align = None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"alpha_mgd={self.alpha_mgd}, lambda_mgd={self.lambda_mgd}, impl={self.impl!r}"
        )

    def forward(
        self,
        student_feats: Tensor,
        teacher_feats: Tensor,
        *,
        rand: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_mask: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``α · Σ (generation(align(S) ⊙ M) − T)² / N`` for one level.

        Args:
            student_feats: ``[N, Cs, H, W]``.
            teacher_feats: ``[N, Ct, H, W]``.
            rand: the uniform draw ``U``, ``[N, 1, H, W]`` (moved to the features' device), or
            generator: a ``torch.Generator`` to draw ``U`` from (module docstring, oddity 1). Exactly one of the two.
            return_mask: also return the mask ``M`` (``[N, 1, H, W]``, 1 = kept, in the features' dtype).

        Returns:
            0-dim loss tensor, or ``(loss, mask)`` if ``return_mask``.

        Raises:
            ValueError: neither or both of ``rand`` / ``generator``, or bad shapes, channels or dtypes.
        """
        loss, mask = self._level(
            student_feats, teacher_feats, rand, generator, "student_feats", "teacher_feats", "rand"
        )
        return (loss, mask) if return_mask else loss

    # ------------------------------------------------------------------------------------------ internals
    def _level(
        self,
        student: Tensor,
        teacher: Tensor,
        rand: Tensor | None,
        generator: torch.Generator | None,
        s_name: str,
        t_name: str,
        r_name: str,
    ) -> tuple[Tensor, Tensor]:
        _check_feats(student, s_name, self.student_channels, "student_channels")
        _check_feats(teacher, t_name, self.teacher_channels, "teacher_channels")
        n, _, h, w = teacher.shape
        if student.shape[0] != n or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"{s_name} has shape {tuple(student.shape)} but {t_name} has shape {tuple(teacher.shape)}; "
                "MGD needs the same N, H, W"
            )
        rand = self._uniform(rand, generator, (n, 1, h, w), teacher, r_name)
        compute = self._literal if self.impl == "literal" else self._fast
        return compute(student, teacher, rand)

    @staticmethod
    def _uniform(
        rand: Tensor | None, generator: torch.Generator | None, shape: tuple, like: Tensor, r_name: str
    ) -> Tensor:
        if rand is not None and generator is not None:
            raise ValueError(f"pass either {r_name} or generator, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            draw = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
            return draw.to(like.device)
        if rand is None:
            raise ValueError(
                f"MGD needs its random draw: pass {r_name}= (uniform [N, 1, H, W] = {list(shape)}) or generator= "
                "(a torch.Generator); it never draws from the global RNG"
            )
        if not isinstance(rand, Tensor):
            raise ValueError(f"{r_name} must be a tensor, got {type(rand).__name__}")
        if tuple(rand.shape) != tuple(shape):
            raise ValueError(f"{r_name} has shape {tuple(rand.shape)}, expected [N, 1, H, W] = {tuple(shape)}")
        if not rand.is_floating_point():
            raise ValueError(f"{r_name} must be a floating-point tensor of uniform draws, got {rand.dtype}")
        return rand.to(like.device)

    def _literal(self, student: Tensor, teacher: Tensor, rand: Tensor) -> tuple[Tensor, Tensor]:
        """Official ``forward`` + ``get_dis_loss``, step by step."""
        if self.align is not None:
            student = self.align(student)
        n = teacher.shape[0]
        mat = mgd_mask(rand, self.lambda_mgd)  # int64 [N, 1, H, W]
        masked_fea = torch.mul(student, mat)  # promoted to the features' dtype
        new_fea = self.generation(masked_fea)
        dis_loss = nn.MSELoss(reduction="sum")(new_fea, teacher) / n
        return dis_loss * self.alpha_mgd, mat.to(masked_fea.dtype)

    def _fast(self, student: Tensor, teacher: Tensor, rand: Tensor) -> tuple[Tensor, Tensor]:
        if self.align is not None:
            student = self.align(student)
        # ~(U > 1 − λ) rather than U <= 1 − λ, so that a NaN draw keeps the pixel exactly as the official where.
        mask = (~(rand > 1 - self.lambda_mgd)).to(student.dtype)
        new_fea = self.generation(student * mask)
        return F.mse_loss(new_fea, teacher, reduction="sum") * (self.alpha_mgd / teacher.shape[0]), mask


class MGDLevels(nn.Module):
    """MGD over several FPN levels: one :class:`MGDLoss` per level (own ``align`` / ``generation``), summed.

    State-dict keys: ``levels.<i>.`` + the :class:`MGDLoss` keys.

    Args:
        student_channels: per-level ``Cs``.
        teacher_channels: per-level ``Ct`` (same length).
        alpha_mgd, lambda_mgd, impl: as :class:`MGDLoss`, for every level.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        alpha_mgd: float = 2e-5,
        lambda_mgd: float = 0.65,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        for name, chans in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(chans, (int, str)) or not isinstance(chans, Sequence) or len(chans) == 0:
                raise ValueError(f"{name} must be a non-empty sequence of ints (one per level), got {chans!r}")
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student_channels has {len(student_channels)} levels but teacher_channels has {len(teacher_channels)}"
            )
        _check_hyper(alpha_mgd, lambda_mgd, impl)
        self.levels = nn.ModuleList(
            MGDLoss(cs, ct, alpha_mgd, lambda_mgd, impl) for cs, ct in zip(student_channels, teacher_channels)
        )

    def forward(
        self,
        student_feats: Tensor | Sequence[Tensor],
        teacher_feats: Tensor | Sequence[Tensor],
        *,
        rand: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        return_masks: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Sum over levels of :class:`MGDLoss`; arguments as :meth:`forward_levels`.

        Returns a 0-dim tensor, or ``(loss, masks)`` if ``return_masks``.
        """
        losses, masks = self._run(student_feats, teacher_feats, rand, generator)
        total = losses[0]
        for level in losses[1:]:
            total = total + level
        return (total, masks) if return_masks else total

    def forward_levels(
        self,
        student_feats: Tensor | Sequence[Tensor],
        teacher_feats: Tensor | Sequence[Tensor],
        *,
        rand: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        return_masks: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Per-level losses (0-dim tensors, level order) that :meth:`forward` sums.

        Args:
            student_feats, teacher_feats: sequences of one ``[N, C_l, H_l, W_l]`` tensor per level (a single
                tensor each when the loss has one level).
            rand: one ``[N, 1, H_l, W_l]`` uniform draw per level, or
            generator: one ``torch.Generator``, drawn from level by level in order. Exactly one of the two.
            return_masks: also return the per-level masks ``[N, 1, H_l, W_l]``.
        """
        losses, masks = self._run(student_feats, teacher_feats, rand, generator)
        return (losses, masks) if return_masks else losses

    def _run(self, student_feats, teacher_feats, rand, generator) -> tuple[list[Tensor], list[Tensor]]:
        pairs = pair_levels(student_feats, teacher_feats, num_levels=len(self.levels))
        if rand is None and generator is None:
            raise ValueError(
                "MGD needs its random draws: pass rand= (one uniform [N, 1, H, W] tensor per level) or generator= "
                "(a torch.Generator); it never draws from the global RNG"
            )
        if rand is not None and generator is not None:
            raise ValueError("pass either rand or generator, not both")
        if rand is not None:
            if isinstance(rand, Tensor):
                rand = [rand]
            if not isinstance(rand, Sequence) or len(rand) != len(self.levels):
                got = f"{len(rand)} draws" if isinstance(rand, Sequence) else type(rand).__name__
                raise ValueError(f"rand has {got}, expected one [N, 1, H, W] tensor per level ({len(self.levels)})")
        losses, masks = [], []
        for i, (level, (s_name, t_name, s, t)) in enumerate(zip(self.levels, pairs)):
            loss, mask = level._level(s, t, None if rand is None else rand[i], generator, s_name, t_name, f"rand[{i}]")
            losses.append(loss)
            masks.append(mask)
        return losses, masks
