"""``cityscapes``: semantic segmentation on a directory in the Cityscapes layout, read by
``torchvision.datasets.Cityscapes(root, split, mode="fine", target_type="semantic")``::

    root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

The 34 label ids become the 19 train ids of the official mapping (torchvision's ``Cityscapes.classes``); every
other id (``train_id`` 255 or -1) becomes 255, ignored by the loss and the metric. Training transforms are CIRKD's,
which MasKD's segmentation code uses: random scale 0.5-2.0 of the full image, padding, a random 512x1024 crop, a
horizontal flip; evaluation is on the whole full-resolution image (MasKD validates on 1024x2048 images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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
LAYOUT = "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_labelIds.png"


@dataclass(frozen=True)
class CityscapesConfig(RealData):
    kind: ClassVar[str] = "cityscapes"
    crop_size: list[int] = knob(default_factory=lambda: [512, 1024], ge=1)  # [height, width]: CIRKD/MasKD
    scale_range: list[float] = knob(default_factory=lambda: [0.5, 2.0], gt=0)  # CIRKD: 0.5, 0.6, ..., 2.0
    # 1 = the official evaluation on full-resolution images; < 1 resizes the image (not the labels) for inference
    eval_scale: float = knob(1.0, gt=0)


def train_id_table() -> np.ndarray:
    """``labelId -> trainId`` as a 256-entry uint8 table (torchvision's ``Cityscapes.classes``; -1 and 255 -> 255)."""
    from torchvision.datasets import Cityscapes

    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for cls in Cityscapes.classes:
        if 0 <= cls.id < 256 and 0 <= cls.train_id < IGNORE_INDEX:
            table[cls.id] = cls.train_id
    return table


def _pairs(cfg, split: str):
    root = root_of(cfg)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    return [
        (p, root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        for p in images
    ]


class Cityscapes(DataKind):
    name = "cityscapes"
    config = CityscapesConfig
    tasks = frozenset({"segmentation"})

    def check(self, cfg, task):
        problems = root_problems(cfg, LAYOUT) + crop_problems(cfg)
        if problems:
            return problems
        root = root_of(cfg)
        for split in SPLITS:
            for sub in ("leftImg8bit", "gtFine"):
                if not (root / sub / split).is_dir():
                    return [
                        Problem("data.root", cfg.root, f"a Cityscapes layout ({LAYOUT}); {sub}/{split}/ is missing")
                    ]
            problems += pair_problems(_pairs(cfg, split), f"leftImg8bit/{split}/", "data.root", cfg.root, root)
        return problems

    def num_classes(self, cfg, task):
        return 19

    def datasets(self, cfg, task):
        labels = LabelMap(train_id_table())
        train = _dataset(cfg, "train", segmentation_transforms(cfg, True, labels), cfg.limit_train)
        val = _dataset(cfg, "val", segmentation_transforms(cfg, False, labels), cfg.limit_val)
        return train, val, None

    def stride_keys(self, cfg):
        return {"data.crop_size": list(cfg.crop_size)}

    def describe(self, cfg):
        h, w = cfg.crop_size
        scale = "full" if cfg.eval_scale == 1.0 else f"x{cfg.eval_scale:g}"
        return f"Cityscapes (fine) at {cfg.root}: training crops of {h}x{w}, evaluation on {scale}-resolution images"


def _dataset(cfg, split: str, transforms, limit: int):
    from torchvision.datasets import Cityscapes as TorchCityscapes
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    dataset = TorchCityscapes(
        str(root_of(cfg)), split=split, mode="fine", target_type="semantic", transforms=transforms
    )
    # torchvision lists files in os.listdir order: sort, so that the data order is the seed's on every file system
    order = limited(sorted(range(len(dataset.images)), key=dataset.images.__getitem__), limit)
    dataset.images = [dataset.images[i] for i in order]
    dataset.targets = [dataset.targets[i] for i in order]
    return wrap_dataset_for_transforms_v2(dataset)


KIND = register(Cityscapes())
