"""What the real-data kinds share: their common ``[data]`` keys, the official segmentation transforms (CIRKD, which
MasKD's segmentation code uses), and the cheap file checks.

Every random draw is torch's (``torch.randint`` here, and the v2 transforms'), so a sample's augmentation is a
function of the seeds the loader sets; nothing reads Python's ``random`` or numpy's global generator.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..engine.fields import Problem, knob

IGNORE_INDEX = 255
#: The ImageNet mean as uint8 RGB: segmentation crops are padded with it, which is 0 after the normalisation in
#: :func:`experiments.tasks.segmentation.normalise` (CIRKD pads with 0 after subtracting its mean).
MEAN_FILL = (124, 116, 104)


@dataclass(frozen=True)
class RealData:
    """``[data]`` keys of every kind read from disk."""

    root: str = ""  # the data set's directory (``~`` expanded; relative paths from the working directory)
    limit_train: int = knob(0, ge=0)  # 0 = every training image; else the first N (sorted), e.g. for a smoke run
    limit_val: int = knob(0, ge=0)  # the same for validation
    workers: int = knob(2, ge=0)  # DataLoader worker processes


def root_of(cfg) -> Path:
    return Path(cfg.root).expanduser()


def root_problems(cfg, layout: str) -> list[Problem]:
    """``data.root`` is an existing directory."""
    if not cfg.root:
        return [Problem("data.root", cfg.root, f"the directory of the data set ({layout})")]
    if not root_of(cfg).is_dir():
        return [Problem("data.root", cfg.root, f"an existing directory ({layout}); it does not exist")]
    return []


def pair_problems(
    pairs: list[tuple[Path, Path]],
    where: str,
    key: str,
    value: Any,
    root: Path,
    mask_word: str = "mask",
    modes: tuple[str, ...] = (),
) -> list[Problem]:
    """Each image has its label map, of the image's size (and one of ``modes``, if given): read from the PNG/JPEG
    headers only."""
    if not pairs:
        return [Problem(key, value, f"a layout with images in {where}; there are none")]
    missing = [m for _, m in pairs if not m.is_file()]
    if missing:
        return [
            Problem(
                key,
                value,
                f"a layout where every image of {where} has its {mask_word}: {len(missing)} of {len(pairs)} lack "
                f"theirs, e.g. {_rel(missing[0], root)}",
            )
        ]
    for image, mask in pairs:
        try:
            with Image.open(image) as im, Image.open(mask) as lab:
                image_size, mask_size, mode = im.size, lab.size, lab.mode
        except OSError as exc:
            return [Problem(key, value, f"readable images and {mask_word}s ({_rel(image, root)}: {exc})")]
        if modes and mode not in modes:
            return [Problem(key, value, f"single-channel {mask_word}s of class indices ({_rel(mask, root)} is {mode})")]
        if image_size != mask_size:
            return [
                Problem(
                    key,
                    value,
                    f"{mask_word}s of their image's size: {_rel(mask, root)} is {mask_size[0]}x{mask_size[1]}, "
                    f"its image {image_size[0]}x{image_size[1]} (width x height)",
                )
            ]
    return []


def crop_problems(cfg) -> list[Problem]:
    out = []
    if len(cfg.crop_size) != 2:
        out.append(Problem("data.crop_size", cfg.crop_size, "[height, width]"))
    if len(cfg.scale_range) != 2 or cfg.scale_range[0] > cfg.scale_range[1]:
        out.append(Problem("data.scale_range", cfg.scale_range, "[low, high] with low <= high"))
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def limited(items: list, limit: int) -> list:
    return items[:limit] if limit else items


_SAID: set[str] = set()


def say_once(line: str) -> None:
    """Print ``line`` to stderr the first time this process says it."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ segmentation transforms
class RandomScale(v2.Transform):
    """CIRKD's ``generate_scale_label``: the whole image scaled by one of ``low, low + 0.1, ..., high`` (uniform;
    0.5..2.0 gives its 16 factors), bilinear without antialiasing (cv2 ``INTER_LINEAR``); masks nearest."""

    def __init__(self, low: float, high: float, step: float = 0.1) -> None:
        super().__init__()
        self.low, self.step = float(low), float(step)
        self.steps = max(0, round((float(high) - self.low) / self.step))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + self.step * int(torch.randint(0, self.steps + 1, ()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=False)


class PadBottomRight(v2.Transform):
    """CIRKD's padding before the crop: bottom and right only, to at least ``size`` = (height, width); images with
    the mean colour, masks with 255."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else list(MEAN_FILL)
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


class ScaleImages(v2.Transform):
    """Resize images (not masks) by ``factor``: inference at a lower resolution, scored on the full labels."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        height, width = inpt.shape[-2:]
        size = [max(1, round(height * self.factor)), max(1, round(width * self.factor))]
        return F.resize(inpt, size, antialias=True)


class LabelMap:
    """Label-map values through a 256-entry table (uint8 -> uint8); ``[1, H, W]`` masks become ``[H, W]``."""

    def __init__(self, table: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.table = torch.as_tensor(table, dtype=torch.uint8)
        self.valid = None if valid is None else torch.as_tensor(valid, dtype=torch.bool)

    def __call__(self, image: Any, mask: Any) -> tuple[Any, Any]:
        values = torch.as_tensor(mask).as_subclass(torch.Tensor).to(torch.long)
        if values.ndim == 3:
            values = values[0]
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= len(self.table)):
            raise ValueError(f"mask values outside 0..{len(self.table) - 1}")
        if self.valid is not None and not bool(self.valid[values].all()):
            bad = sorted(set(values[~self.valid[values]].unique().tolist()))
            raise ValueError(f"mask values {bad} are neither a class index nor {IGNORE_INDEX}")
        return image, tv_tensors.Mask(self.table[values])


_TO_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True)


def segmentation_transforms(cfg, train: bool, labels: LabelMap) -> v2.Compose:
    """Training (CIRKD/MasKD): random scale of the full image, pad to the crop, random crop ``crop_size``,
    horizontal flip. Evaluation: the full image (optionally resized by ``eval_scale``, labels untouched). Out:
    a float32 image in [0, 1] ``[3, H, W]`` and an int64 mask ``[H, W]`` (255 ignored)."""
    steps: list[Any] = [v2.ToImage(), labels]
    if train:
        crop = (int(cfg.crop_size[0]), int(cfg.crop_size[1]))
        steps += [
            RandomScale(*cfg.scale_range),
            PadBottomRight(crop),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(0.5),
        ]
    elif cfg.eval_scale != 1.0:
        steps.append(ScaleImages(cfg.eval_scale))
    return v2.Compose([*steps, _TO_FLOAT])
