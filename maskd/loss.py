"""Stage 2: the masked reconstruction loss that trains the student (MasKD paper Eq. 9-10).

Shape shorthand: N batch, C channels, H x W feature map, T tokens, L = H * W, one entry per FPN level in lists.

Per level, with student feature S, teacher feature F (both [N, C, H, W]) and teacher masks M ([N, T, H, W])::

    L[n, t, c] = sum_hw (M * S - M * F)^2 / (sum_hw M + area_eps)             # M enters squared, area linearly
    level      = mean_n sum_t w[n, t] mean_c L[n, t, c]     (weight head: w = softmax_t(prob(F)))
               = mean_{n, t, c} L[n, t, c]                   (no weight head)
    loss       = loss_weight * scale * sum_levels level     # levels are summed, not averaged

After ``custom_mask_warmup`` steps the masks are customised to the student: ``M <- M * sg(masks(S))``
(the same tokens applied to the student feature, without gradient).

Official code: hunto/MasKD @ b5af34fe343f ``mmrazor/mmrazor/models/losses/maskd.py`` (detection) and
``segmentation/losses/maskd.py`` (segmentation: ``area_eps = 1e-5``, ``scale = 0.5``, one module, no head, no
customisation). Differences from that code, all deliberate and visible:

- No hidden state. The official loss counts its own calls in ``self._iter`` (not checkpointed, so a resumed run
  restarts the warm-up); here the training step is an argument, ``loss(s, t, step=...)``, and the student masks
  switch on when ``step >= custom_mask_warmup`` (the official test, with ``_iter`` = the step before the call).
- Frozen tokens. The official tokens and weight head receive gradients from this loss and stay fixed only
  because the configs give them ``lr_mult=0`` (detection) or leave them out of the optimizer (segmentation).
  Here ``frozen=True`` (default) calls ``requires_grad_(False)`` on them and computes masks and weights under
  ``torch.no_grad()``; ``frozen=False`` lets gradients reach them as in the official code.
- The teacher features are detached (``detach_teacher=True``); the official code relies on the teacher running
  under ``no_grad``.
- ``mask_power``: the official code multiplies both features by M, so the squared error carries M^2 while the
  area normaliser is linear in M (``mask_power=2``, default). ``mask_power=1`` uses M / sum(M), a proper
  mask-weighted mean; it is offered for ablations and is not what the authors ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from .tokens import Impl, ReceptiveTokens

Variant = Literal["detection", "segmentation"]

#: ``area_eps`` and ``scale`` of the two official variants.
VARIANTS: dict[str, dict[str, float]] = {
    "detection": {"area_eps": 0.0, "scale": 1.0},
    "segmentation": {"area_eps": 1e-5, "scale": 0.5},
}


def as_feature_list(feats: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """A tensor is one level; a list or tuple is one tensor per level (as the official losses accept)."""
    if isinstance(feats, Tensor):
        return [feats]
    if not isinstance(feats, Sequence) or not all(isinstance(f, Tensor) for f in feats):
        raise ValueError(f"{name} must be a tensor or a sequence of tensors, got {type(feats).__name__}")
    return list(feats)


def check_level_pairs(student: list[Tensor], teacher: list[Tensor], num_levels: int | None = None) -> None:
    """Raise a one-line ValueError unless student and teacher levels pair up with equal 4-d shapes."""
    if len(student) != len(teacher):
        raise ValueError(f"student_feats has {len(student)} levels but teacher_feats has {len(teacher)}")
    if num_levels is not None and len(student) != num_levels:
        raise ValueError(f"student_feats has {len(student)} levels but the loss was built for {num_levels}")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.dim() != 4:
            raise ValueError(f"student_feats[{i}] has shape {tuple(s.shape)}, expected (N, C, H, W)")
        if s.shape != t.shape:
            raise ValueError(
                f"student_feats[{i}] has shape {tuple(s.shape)} but teacher_feats[{i}] has shape {tuple(t.shape)}"
            )


def check_fixed_masks(masks: Sequence[Tensor], student: list[Tensor]) -> None:
    """Raise a one-line ValueError unless ``masks`` holds one [N, T, H, W] per student level."""
    if len(masks) != len(student):
        raise ValueError(f"masks has {len(masks)} levels but student_feats has {len(student)}")
    for i, (m, s) in enumerate(zip(masks, student)):
        if m.dim() != 4 or m.shape[0] != s.shape[0] or m.shape[2:] != s.shape[2:]:
            raise ValueError(
                f"masks[{i}] has shape {tuple(m.shape)}, expected ({s.shape[0]}, T, {s.shape[2]}, {s.shape[3]})"
            )


class MasKDLoss(nn.Module):
    """Masked distillation loss over a list of feature levels (one set of receptive tokens per level).

    Args:
        channels: C of each distilled level, e.g. ``[256] * 5`` for the five RetinaNet FPN levels.
        num_tokens: T (official detection configs: 6; segmentation: 8).
        weight_head: weight each mask per image by the token head (official ``weight_mask``; detection: True).
        custom_mask: multiply the teacher masks by the student's own masks once ``step >= custom_mask_warmup``.
        custom_mask_warmup: first step with customised masks (RetinaNet R101->R50 config: 7000).
        loss_weight: lambda (RetinaNet: 7, FCOS: 10, Faster R-CNN: 1).
        variant: ``"detection"`` (no epsilon, scale 1) or ``"segmentation"`` (+1e-5 in the area, factor 0.5).
        area_eps, scale: override the variant's values.
        frozen: freeze tokens and head (``requires_grad_(False)``) and compute them without autograd.
        detach_teacher: detach the teacher features.
        impl: ``"fast"`` (contracts channels first, [N, L] work per token) or ``"literal"`` (the official
            computation: the full [N, T, C, H, W] masked features and the head's 3x3 convolution in full).
        mask_power: 2 as the official code (M^2 / sum M); 1 for the mask-weighted mean variant.

    Forward:
        ``loss(student_feats, teacher_feats, step=None)``: each a [N, C, H, W] tensor or a sequence of them, one
        per level, student already mapped to the teacher's channels (the official configs apply a trainable 1x1
        align conv per level outside the loss). ``step`` is required when ``custom_mask`` is on. Returns a scalar.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_tokens: int = 6,
        weight_head: bool = True,
        custom_mask: bool = True,
        custom_mask_warmup: int = 1000,
        loss_weight: float = 1.0,
        variant: Variant = "detection",
        area_eps: float | None = None,
        scale: float | None = None,
        frozen: bool = True,
        detach_teacher: bool = True,
        impl: Impl = "fast",
        mask_power: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(channels, int):
            channels = [channels]
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if impl not in ("fast", "literal"):
            raise ValueError(f"impl must be 'fast' or 'literal', got {impl!r}")
        if mask_power not in (1, 2):
            raise ValueError(f"mask_power must be 1 or 2, got {mask_power!r}")
        if custom_mask_warmup < 0:
            raise ValueError(f"custom_mask_warmup must be >= 0, got {custom_mask_warmup}")
        self.channels = list(channels)
        self.num_tokens = num_tokens
        self.weight_head = weight_head
        self.custom_mask = custom_mask
        self.custom_mask_warmup = custom_mask_warmup
        self.loss_weight = loss_weight
        self.variant = variant
        self.area_eps = VARIANTS[variant]["area_eps"] if area_eps is None else area_eps
        self.scale = VARIANTS[variant]["scale"] if scale is None else scale
        self.detach_teacher = detach_teacher
        self.impl = impl
        self.mask_power = mask_power
        self.mask_modules = nn.ModuleList(ReceptiveTokens(c, num_tokens, weight_head) for c in self.channels)
        self.frozen = frozen
        if frozen:
            self.mask_modules.requires_grad_(False)

    # ------------------------------------------------------------------ tokens
    def load_tokens(self, checkpoint: Mapping[str, Tensor]) -> None:
        """Load receptive tokens from a stage-1 checkpoint (a state_dict, or a dict with a ``state_dict`` key).

        As the official ``init_weights(pretrained)``: keys containing ``mask_modules`` are kept and everything
        before that substring is stripped (so a whole-detector checkpoint works); the single-module key
        ``mask_module.`` of the official segmentation code maps to level 0. Loading is strict; a missing,
        unexpected or wrongly shaped tensor raises a one-line ValueError naming it.
        """
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping):
            raise ValueError(f"token checkpoint must be a mapping of tensors, got {type(checkpoint).__name__}")
        tokens: dict[str, Tensor] = {}
        for key, value in state.items():
            if "mask_modules" in key:
                tokens[key[key.find("mask_modules") :]] = value
            elif key.startswith("mask_module."):
                tokens["mask_modules.0." + key[len("mask_module.") :]] = value
            elif key == "mask_token" or key.startswith("prob."):  # a single MaskModule state_dict
                tokens["mask_modules.0." + key] = value
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tokens))
        unexpected = sorted(set(tokens) - set(expected))
        if missing:
            raise ValueError(
                f"token checkpoint lacks {missing[0]} (and {len(missing) - 1} more); it holds {sorted(tokens)[:4]}"
            )
        if unexpected:
            raise ValueError(
                f"token checkpoint has unexpected tensor {unexpected[0]} with shape "
                f"{tuple(tokens[unexpected[0]].shape)} for a loss with {len(self.channels)} levels"
            )
        for key, value in tokens.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"token checkpoint tensor {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
        self.load_state_dict(tokens, strict=True)

    def customised(self, step: int | None) -> bool:
        """Whether the student-mask customisation is active at ``step``."""
        if not self.custom_mask:
            return False
        if step is None:
            raise ValueError("MasKDLoss(custom_mask=True) needs the training step: call loss(s, t, step=...)")
        return step >= self.custom_mask_warmup

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        student_feats: Tensor | Sequence[Tensor],
        teacher_feats: Tensor | Sequence[Tensor],
        step: int | None = None,
        masks: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``masks``: optional fixed masks, one [N, T', H, W] per level, used instead of the tokens' (no weight
        head, no customisation): the ablation of learned against hand-made masks (e.g. ground-truth boxes)."""
        total = None
        for level_loss in self.levels(student_feats, teacher_feats, step, masks):
            total = level_loss if total is None else total + level_loss
        return self.loss_weight * self.scale * total

    def levels(
        self,
        student_feats: Tensor | Sequence[Tensor],
        teacher_feats: Tensor | Sequence[Tensor],
        step: int | None = None,
        masks: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """The loss of each level before ``loss_weight`` and ``scale`` (``forward`` is their weighted sum)."""
        student = as_feature_list(student_feats, "student_feats")
        teacher = as_feature_list(teacher_feats, "teacher_feats")
        check_level_pairs(student, teacher, len(self.mask_modules))
        if masks is not None:
            check_fixed_masks(masks, student)
        customised = self.customised(step) if masks is None else False
        out = []
        for level, (tokens, s, t) in enumerate(zip(self.mask_modules, student, teacher)):
            if self.detach_teacher:
                t = t.detach()
            if masks is None:
                out.append(self.level_loss(tokens, s, t, customised, level))
            else:
                fixed = masks[level].to(s.dtype)
                out.append((self._literal if self.impl == "literal" else self._fast)(fixed, None, s, t))
        return out

    def level_loss(
        self, tokens: ReceptiveTokens, student: Tensor, teacher: Tensor, customised: bool, level: int = 0
    ) -> Tensor:
        """The loss of one level before ``loss_weight`` and ``scale``."""
        grad_ctx = torch.no_grad() if self.frozen else nullcontext()
        with grad_ctx:
            masks = tokens.masks(teacher, name=f"teacher_feats[{level}]")  # [N, T, H, W]
            if customised:
                with torch.no_grad():  # the student's own masks are a stop-gradient factor
                    student_masks = tokens.masks(student.detach(), name=f"student_feats[{level}]")
                masks = masks * student_masks
            weights = (
                tokens.token_weights(teacher, impl=self.impl, name=f"teacher_feats[{level}]")
                if tokens.has_weight_head
                else None
            )  # [N, T]
        if self.impl == "literal":
            return self._literal(masks, weights, student, teacher)
        return self._fast(masks, weights, student, teacher)

    def _literal(self, masks: Tensor, weights: Tensor | None, student: Tensor, teacher: Tensor) -> Tensor:
        """The official computation, with the full [N, T, C, H, W] masked features."""
        m = masks.unsqueeze(2)  # [N, T, 1, H, W]
        if self.mask_power == 2:
            sq = (m * student.unsqueeze(1) - m * teacher.unsqueeze(1)).pow(2)  # [N, T, C, H, W]
        else:
            sq = m * (student.unsqueeze(1) - teacher.unsqueeze(1)).pow(2)
        per_token_channel = sq.sum((3, 4)) / (masks.sum((2, 3)).unsqueeze(-1) + self.area_eps)  # [N, T, C]
        if weights is None:
            return per_token_channel.mean()
        return (per_token_channel.mean(-1) * weights).sum(-1).mean()

    def _fast(self, masks: Tensor, weights: Tensor | None, student: Tensor, teacher: Tensor) -> Tensor:
        """Equal to ``_literal``: sum the squared error over channels first, then one [N, T] x [T, L] contraction.

        ``sum_t coef[n,t] / area[n,t] * sum_c sum_hw M^p[n,t,hw] D^2[n,c,hw]
          = sum_hw (sum_t coef[n,t] / area[n,t] * M^p[n,t,hw]) * (sum_c D^2[n,c,hw])``
        with coef = w / C (weight head) or 1 / (T C).
        """
        n, c, h, w = student.shape
        num_tokens = masks.shape[1]
        # Mask statistics in at least float32, so bf16/fp16 inputs do not lose the small areas.
        stat_dtype = torch.promote_types(masks.dtype, torch.float32)
        flat_masks = masks.reshape(n, num_tokens, h * w).to(stat_dtype)
        area = flat_masks.sum(-1) + self.area_eps  # [N, T]
        coef = (
            weights.to(stat_dtype) / c
            if weights is not None
            else flat_masks.new_full((n, num_tokens), 1.0 / (num_tokens * c))
        )
        pixel_weights = torch.einsum("nt,ntl->nl", coef / area, flat_masks.pow(self.mask_power))  # [N, L]
        pixel_weights = pixel_weights.reshape(n, 1, h, w).to(student.dtype)
        if pixel_weights.requires_grad:  # unfrozen tokens: let autograd reach them through the weights
            return (pixel_weights * (student - teacher).pow(2)).sum() / n
        return _WeightedSquaredError.apply(student, teacher, pixel_weights) / n


class _WeightedSquaredError(torch.autograd.Function):
    """``sum_{n,c,h,w} P[n,h,w] (S - F)^2`` for constant pixel weights P, with one full-size temporary.

    Forward keeps ``D = S - F`` and reduces it over channels with a norm (no second full-size tensor);
    backward turns the saved ``D`` into the gradient ``2 P D`` in place. Autograd on the plain expression would
    allocate and traverse three more full-size tensors, which dominates the time on the CPU. As the buffer is
    reused, this graph supports a single backward pass (``retain_graph=True`` then raises).
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, pixel_weights: Tensor) -> Tensor:
        diff = student - teacher  # [N, C, H, W]
        sq_norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True).square()  # [N, 1, H, W]
        ctx.save_for_backward(diff, pixel_weights)
        ctx.used = False
        return (sq_norm * pixel_weights).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.used:
            raise RuntimeError("MasKDLoss(impl='fast', frozen=True) supports one backward pass per forward")
        ctx.used = True
        diff, pixel_weights = ctx.saved_tensors
        grad = diff.mul_(pixel_weights * (2 * grad_out))  # reuses D's buffer
        grad_student = grad if ctx.needs_input_grad[0] else None
        grad_teacher = (-grad if grad_student is not None else grad.neg_()) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None
