"""Receptive tokens, the masks they produce, their weight head and the Dice diversity term.

Shape shorthand used throughout ``maskd``::

    N  batch size            C  feature channels        H, W  feature-map size
    T  number of tokens      L  H * W (flattened pixels)

A receptive token ``E_t`` (a C-vector) looks at every pixel of a feature map ``F`` and marks it with
``M_t = sigmoid(E_t . F)`` (paper Eq. 1; ``MaskModule.forward_mask`` in hunto/MasKD @ b5af34fe343f).
The optional weight head gives each mask an image-level weight ``w = softmax_t(conv1x1(GAP(conv3x3(F))))``
(``MaskModule.forward_prob``). The head has *no* nonlinearity between its layers, so it is an affine map of the
per-image window sums of ``F``; the fast form below uses that instead of running the 3x3 convolution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Impl = Literal["fast", "literal"]


def _check_features(features: Tensor, channels: int, name: str) -> None:
    if features.dim() != 4:
        raise ValueError(f"{name} has shape {tuple(features.shape)}, expected (N, C, H, W)")
    if features.shape[1] != channels:
        raise ValueError(
            f"{name} has shape {tuple(features.shape)} with {features.shape[1]} channels, "
            f"but the receptive tokens have {channels} channels"
        )


class ReceptiveTokens(nn.Module):
    """T receptive tokens for one feature level, with the optional per-mask weight head.

    Parameters (state_dict keys as in the official ``MaskModule``, so its checkpoints load unchanged):

    - ``mask_token``: [T, C], initialised N(0, 0.01^2) (the official ``randn(T, C).normal_(0, 0.01)``;
      the discarded ``randn`` draw is kept so a seeded construction consumes the RNG like the original).
    - ``prob.0`` Conv2d(C, C, 3, padding=1), ``prob.1`` AdaptiveAvgPool2d(1), ``prob.2`` Conv2d(C, T, 1):
      only if ``weight_head``; weights N(0, 2 / (k*k*out_channels)) (fan-out), biases 0.

    Args:
        channels: C, channels of the feature map the tokens look at.
        num_tokens: T.
        weight_head: build the per-mask weight head (``weight_mask=True`` in the official code).
    """

    def __init__(self, channels: int, num_tokens: int = 6, weight_head: bool = False) -> None:
        super().__init__()
        if channels < 1 or num_tokens < 1:
            raise ValueError(f"channels={channels} and num_tokens={num_tokens} must both be >= 1")
        self.channels = channels
        self.num_tokens = num_tokens
        self.mask_token = nn.Parameter(torch.randn(num_tokens, channels).normal_(0, 0.01))
        self.prob: nn.Sequential | None = None
        if weight_head:
            self.prob = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, 1),
            )
            for layer in (self.prob[0], self.prob[2]):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    @property
    def has_weight_head(self) -> bool:
        return self.prob is not None

    def masks(self, features: Tensor, name: str = "features") -> Tensor:
        """Soft masks ``M[n, t, h, w] = sigmoid(sum_c E[t, c] F[n, c, h, w])``.

        Args:
            features: F, [N, C, H, W]. Need not be contiguous (the official ``view`` required it).
        Returns:
            [N, T, H, W].
        """
        _check_features(features, self.channels, name)
        n, c, h, w = features.shape
        logits = torch.matmul(self.mask_token, features.reshape(n, c, h * w))  # [N, T, L]
        return torch.sigmoid(logits).reshape(n, self.num_tokens, h, w)

    def token_weights(self, features: Tensor, impl: Impl = "fast", name: str = "features") -> Tensor:
        """Per-image mask weights ``softmax_t(prob(F))``, [N, T] (the official ``forward_prob`` flattened).

        ``literal`` runs the head as the official code does: a full 3x3 convolution, the average pool, the 1x1
        convolution. ``fast`` uses linearity: the average over output pixels of a zero-padded 3x3 convolution
        is, for each kernel tap (ky, kx), the sum of the input over the window that tap sees, divided by H*W.
        Those nine window sums are the total sum minus one border row and/or column, so the head costs one
        pass over F plus an [N, C*9] x [C*9, C] product.
        """
        if self.prob is None:
            raise ValueError("token_weights() needs the weight head: build with weight_head=True")
        _check_features(features, self.channels, name)
        if impl == "literal":
            return torch.softmax(self.prob(features).flatten(1), dim=1)
        if impl != "fast":
            raise ValueError(f"impl must be 'fast' or 'literal', got {impl!r}")
        conv3, conv1 = self.prob[0], self.prob[2]
        n, c, h, w = features.shape
        window_sums = _padded_3x3_window_sums(features)  # [N, C, 3, 3]
        pooled = torch.einsum("nckl,ockl->no", window_sums, conv3.weight.to(features.dtype)) / (h * w)
        pooled = pooled + conv3.bias.to(features.dtype)
        logits = pooled @ conv1.weight.to(features.dtype).flatten(1).t() + conv1.bias.to(features.dtype)
        return torch.softmax(logits, dim=1)

    def mask_features(self, features: Tensor, impl: Impl = "fast") -> tuple[Tensor, Tensor]:
        """Stage-1 masked features and the token masks (official ``MaskModule.forward_train``).

        ``out = sum_t F * M_t`` (times ``w_t`` with the weight head). Without the head, ``out`` can reach T*F:
        the official code does not normalise it. ``fast`` folds the masks first (``F * sum_t w_t M_t``) instead of
        materialising [N, T, C, H, W].

        Returns:
            (out [N, C, H, W], masks [N, T, H, W]).
        """
        masks = self.masks(features)
        weights = self.token_weights(features, impl=impl) if self.prob is not None else None
        if impl == "literal":
            per_token = features.unsqueeze(1) * masks.unsqueeze(2)  # [N, T, C, H, W]
            if weights is not None:
                per_token = per_token * weights[:, :, None, None, None]
            return per_token.sum(1), masks
        if impl != "fast":
            raise ValueError(f"impl must be 'fast' or 'literal', got {impl!r}")
        folded = masks if weights is None else masks * weights[:, :, None, None]
        return features * folded.sum(1, keepdim=True), masks


def _padded_3x3_window_sums(x: Tensor) -> Tensor:
    """For a 3x3 convolution with padding 1, the sum over all output pixels of the input under each tap.

    Tap ky = 0 reads input rows 0..H-2 (the last row is never under it), ky = 1 all rows, ky = 2 rows 1..H-1;
    the same for columns. So ``S[..., ky, kx] = total - row_excluded(ky) - col_excluded(kx) + corner(ky, kx)``.
    Exact for any H, W >= 1 (with H == 1 the excluded row is the whole map and the terms cancel to 0).

    Args:
        x: [N, C, H, W].
    Returns:
        [N, C, 3, 3].
    """
    zeros = x.new_zeros(x.shape[:2])
    total = x.sum((2, 3))
    rows = torch.stack([x[:, :, -1, :].sum(-1), zeros, x[:, :, 0, :].sum(-1)], dim=-1)  # excluded row per ky
    cols = torch.stack([x[:, :, :, -1].sum(-1), zeros, x[:, :, :, 0].sum(-1)], dim=-1)  # excluded col per kx
    # The pixel counted in both the excluded row and the excluded column, added back once.
    corner_row = [x[:, :, -1, :], None, x[:, :, 0, :]]
    corners = torch.stack(
        [
            torch.stack(
                [
                    row[..., -1] if row is not None else zeros,
                    zeros,
                    row[..., 0] if row is not None else zeros,
                ],
                dim=-1,
            )
            for row in corner_row
        ],
        dim=-2,
    )  # [N, C, 3, 3]
    return total[..., None, None] - rows[..., :, None] - cols[..., None, :] + corners


def dice_coeff(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Token diversity term: mean pairwise soft Dice between different token masks (minimised).

    Official ``dice_coeff`` (identical in the three hunto/MasKD copies)::

        a[b, i, j] = sum_l P[b, i, l] P[b, j, l]        s[b, i] = sum_l P[b, i, l]^2
        d[b, i, j] = 2 a[b, i, j] / ((s[b, j] + eps) + (s[b, i] + eps))

    averaged over the B*T*(T-1) off-diagonal entries (each unordered pair counted twice; no "1 -").
    With T == 1 there are no pairs and the official code divides 0 by 0; here the result is 0.

    Args:
        masks: P, [B, T, L] (masks flattened over pixels).
    Returns:
        scalar.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks has shape {tuple(masks.shape)}, expected (B, T, L)")
    b, t, _ = masks.shape
    if t < 2:
        return masks.sum() * 0.0
    inter = torch.matmul(masks, masks.transpose(1, 2))  # [B, T, T]
    sq = masks.pow(2).sum(-1)  # [B, T]
    dice = 2 * inter / ((sq[:, None, :] + eps) + (sq[:, :, None] + eps))
    off_diag = 1.0 - torch.eye(t, dtype=dice.dtype, device=dice.device)
    return (dice * off_diag).sum() / (b * t * (t - 1))


def fan_out_std(kernel: int, out_channels: int) -> float:
    """Standard deviation of the weight head's fan-out normal init (for documentation and tests)."""
    return math.sqrt(2.0 / (kernel * kernel * out_channels))
