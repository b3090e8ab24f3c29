"""``folder``: semantic segmentation on a user's own images, in the plainest layout::

    root/images/{train,val}/<name>.png|jpg|jpeg      RGB (or grey) images
    root/masks/{train,val}/<name>.png                single-channel class indices 0..K-1; 255 ignored

The class names are ``data.classes`` (mask value k is ``classes[k]``). The transforms are the Cityscapes kind's
(CIRKD/MasKD): random scale, padding where the crop is larger than the image, random crop, flip; evaluation on the
whole image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from ..engine.fields import Problem, knob
from ._common import (
    IGNORE_INDEX,
    LabelMap,
    RealData,
    crop_problems,
    limited,
    pair_problems,
    root_of,
    root_problems,
    segmentation_transforms,
)
from .registry import DataKind, register

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT = "images/{train,val}/NAME.png|jpg, masks/{train,val}/NAME.png"
MASK_MODES = ("L", "P", "1", "I", "I;16")  # single-channel PNG modes


@dataclass(frozen=True)
class FolderConfig(RealData):
    kind: ClassVar[str] = "folder"
    classes: list[str] = field(default_factory=list)  # required: mask value k is classes[k]
    crop_size: list[int] = knob(default_factory=lambda: [512, 512], ge=1)  # [height, width]
    scale_range: list[float] = knob(default_factory=lambda: [0.5, 2.0], gt=0)
    eval_scale: float = knob(1.0, gt=0)  # 1 = whole images at full resolution


def _pairs(cfg, split: str) -> list[tuple[Path, Path]]:
    root = root_of(cfg)
    images = sorted(p for p in (root / "images" / split).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, root / "masks" / split / f"{p.stem}.png") for p in images]


class FolderSegmentation(torch.utils.data.Dataset):
    """``(image, mask)`` pairs of files through a v2 joint transform."""

    def __init__(self, pairs: list[tuple[Path, Path]], transforms) -> None:
        self.pairs = pairs
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(mask_path) as lab:
            mask = tv_tensors.Mask(torch.from_numpy(np.array(lab).astype(np.int64)))
        try:
            return self.transforms(image, mask)
        except ValueError as exc:
            raise ValueError(f"{mask_path}: {exc}") from None


class Folder(DataKind):
    name = "folder"
    config = FolderConfig
    tasks = frozenset({"segmentation"})

    def check(self, cfg, task):
        problems = []
        if not cfg.classes:
            problems.append(
                Problem("data.classes", cfg.classes, "a non-empty list of class names (mask value k is classes[k])")
            )
        elif len(cfg.classes) >= IGNORE_INDEX:
            problems.append(Problem("data.classes", f"{len(cfg.classes)} names", f"fewer than {IGNORE_INDEX} classes"))
        problems += root_problems(cfg, LAYOUT) + crop_problems(cfg)
        if problems:
            return problems
        root = root_of(cfg)
        for split in SPLITS:
            for sub in ("images", "masks"):
                if not (root / sub / split).is_dir():
                    return [Problem("data.root", cfg.root, f"a folder layout ({LAYOUT}); {sub}/{split}/ is missing")]
            problems += pair_problems(
                _pairs(cfg, split), f"images/{split}/", "data.root", cfg.root, root, modes=MASK_MODES
            )
        return problems

    def num_classes(self, cfg, task):
        return len(cfg.classes)

    def datasets(self, cfg, task):
        k = len(cfg.classes)
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        table[:k] = np.arange(k)
        valid = np.zeros(256, dtype=bool)
        valid[:k] = valid[IGNORE_INDEX] = True
        labels = LabelMap(table, valid)
        sets = []
        for split, train, limit in (("train", True, cfg.limit_train), ("val", False, cfg.limit_val)):
            transforms = segmentation_transforms(cfg, train, labels)
            sets.append(FolderSegmentation(limited(_pairs(cfg, split), limit), transforms))
        return sets[0], sets[1], None

    def stride_keys(self, cfg):
        return {"data.crop_size": list(cfg.crop_size)}

    def describe(self, cfg):
        h, w = cfg.crop_size
        return f"images and masks at {cfg.root} ({len(cfg.classes)} classes): training crops of {h}x{w}, whole images"


KIND = register(Folder())
