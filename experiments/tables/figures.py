"""Figures: the receptive-token mask grid (the paper's Figure 1) and metric-vs-knob plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def mask_grid_png(
    images: torch.Tensor,
    masks: Sequence[torch.Tensor],
    level_names: Sequence[str],
    path: Path,
    title: str = "",
    max_images: int = 2,
) -> Path:
    """One row per (image, level): the image, then each token's mask upsampled to the image.

    Args:
        images: [n, 3, H, W] in [0, 1].
        masks: one [n, T, h, w] tensor per level, values in (0, 1).
    """
    n = min(images.shape[0], max_images)
    tokens = max(m.shape[1] for m in masks)
    rows = n * len(masks)
    fig, axes = plt.subplots(rows, tokens + 1, figsize=(1.6 * (tokens + 1), 1.6 * rows), squeeze=False)
    size = images.shape[-2:]
    for i in range(n):
        image = images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        for j, (level, m) in enumerate(zip(level_names, masks)):
            r = i * len(masks) + j
            axes[r][0].imshow(image)
            axes[r][0].set_ylabel(f"img {i}\n{level}", fontsize=7)
            up = F.interpolate(m[i : i + 1].float(), size=size, mode="nearest")[0]
            for t in range(tokens):
                ax = axes[r][t + 1]
                if t < m.shape[1]:
                    ax.imshow(up[t].cpu().numpy(), vmin=0, vmax=1, cmap="magma")
                    if r == 0:
                        ax.set_title(f"token {t}", fontsize=7)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
