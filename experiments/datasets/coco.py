"""``coco``: object detection on any directory in the COCO-2017 layout, read with pycocotools through
``torchvision.datasets.CocoDetection`` and ``wrap_dataset_for_transforms_v2``::

    root/train2017/  root/val2017/  root/annotations/instances_{train,val}2017.json   (each path a [data] key)

Categories come from the annotation file: its K category ids, sorted, become the contiguous labels 1..K (the model
has K + 1 outputs, column 0 unused, as the embedded detectors); evaluation maps labels back to the file's category
ids and keeps the file's image ids, and runs against the original val file, so COCOeval treats crowd boxes itself.
Training targets drop crowd boxes (``iscrowd = 1``) and degenerate ones (zero or negative width or height once
clipped to the image; the count is printed once); images without boxes stay, with empty targets.

Transforms (``torchvision.transforms.v2``, boxes as ``tv_tensors.BoundingBoxes``): training = keep-ratio resize to
a short side of ``image_size`` with the long side at most ``max_size`` (mmdet's ``img_scale=(1333, 800)``), or a
short side drawn from ``multiscale_short = [low, high]`` (mmdet's ``multiscale_mode="range"``), then a horizontal
flip with p = 0.5. Evaluation: none; the detector's own transform resizes and maps boxes back to the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..engine.fields import Problem, knob
from ._common import RealData, limited, root_of, root_problems, say_once
from .registry import DataKind, register

SPLITS = ("train", "val")
LAYOUT = "train2017/, val2017/, annotations/instances_{train,val}2017.json"
#: bump when :func:`summary` changes what it stores
SUMMARY_VERSION = 1


@dataclass(frozen=True)
class CocoConfig(RealData):
    kind: ClassVar[str] = "coco"
    train_images: str = "train2017"  # relative to root
    val_images: str = "val2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_annotations: str = "annotations/instances_val2017.json"
    image_size: int = knob(800, ge=1)  # training short side (mmdet 1333x800); also the model's min_size
    max_size: int = knob(1333, ge=1)  # long-side cap; also the model's max_size
    # [] = fixed short side; [low, high] = a short side drawn uniformly from low..high (FCOS multi-scale: 640, 800)
    multiscale_short: list[int] = knob(default_factory=list, ge=1)


@dataclass(frozen=True)
class CocoTruth:
    """What detection evaluation needs of a COCO file: the file, and the category id of each label 1..K."""

    annotations: Path
    category_ids: tuple[int, ...]


# ------------------------------------------------------------------------------------------ annotation summaries
def usable_boxes(boxes: np.ndarray, crowd: np.ndarray, width: Any, height: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, degenerate)`` masks of XYXY ``boxes`` [n, 4] on images of ``width`` x ``height`` (numbers or [n]):
    degenerate = zero or negative width or height once clipped to the image; kept = neither crowd nor degenerate."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(boxes),))
    h = np.broadcast_to(np.asarray(height, dtype=np.float64), (len(boxes),))
    x1, x2 = np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 2], 0, w)
    y1, y2 = np.clip(boxes[:, 1], 0, h), np.clip(boxes[:, 3], 0, h)
    degenerate = (x2 <= x1) | (y2 <= y1)
    crowd = np.asarray(crowd, dtype=bool)
    return ~crowd & ~degenerate, degenerate & ~crowd


def _parse(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"it has no {key!r} list")
    images = {int(im["id"]): im for im in data["images"]}
    categories = sorted({int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}.items())
    known = {c for c, _ in categories}
    boxes, crowd, sizes, unknown = [], [], [], []
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append((x, y, x + w, y + h))
        crowd.append(bool(ann.get("iscrowd", 0)))
        image = images.get(int(ann["image_id"]), {})
        sizes.append((float(image.get("width", np.inf)), float(image.get("height", np.inf))))
        if int(ann["category_id"]) not in known:
            unknown.append(int(ann["category_id"]))
    size_arr = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    _, degenerate = usable_boxes(np.asarray(boxes), np.asarray(crowd, dtype=bool), size_arr[:, 0], size_arr[:, 1])
    return {
        "file_names": [str(images[i]["file_name"]) for i in sorted(images)],
        "category_ids": [c for c, _ in categories],
        "category_names": [n for _, n in categories],
        "num_annotations": len(boxes),
        "crowd": int(sum(crowd)),
        "degenerate": int(degenerate.sum()),
        "unknown_categories": [len(unknown), unknown[0] if unknown else None],
    }


_SUMMARIES: dict[str, dict[str, Any]] = {}


def summary(path: Path) -> dict[str, Any]:
    """What the checks and the label mapping need of an annotation file (or ``{"error": why}``), remembered in this
    process and in the cache by the file's path, size and modification time: a 450 MB ``instances_train2017.json``
    is parsed once, not at every manifest load."""
    from ..engine.paths import cache_root

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{SUMMARY_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    if key in _SUMMARIES:
        return _SUMMARIES[key]
    stored = cache_root() / "datasets" / f"coco-{key}.json"
    try:
        found = json.loads(stored.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        try:
            found = _parse(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError | TypeError) else str(exc)
            found = {"error": f"{path.name}: {why}".splitlines()[0]}
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(found), encoding="utf-8")
        os.replace(tmp, stored)
    _SUMMARIES[key] = found
    return found


# ------------------------------------------------------------------------------------------ data sets
class CocoTargets:
    """The wrapped ``CocoDetection`` target made a training target: crowd and degenerate boxes dropped, category
    ids mapped to the labels 1..K, empty ``[0, 4]`` boxes for images without any. A class so workers can pickle it."""

    def __init__(self, label_of: dict[int, int]) -> None:
        self.label_of = label_of

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        width, height = image.size
        out = {"image_id": target["image_id"]}
        if "boxes" not in target:
            out["boxes"] = tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(height, width))
            out["labels"] = torch.zeros((0,), dtype=torch.int64)
            return image, out
        boxes = target["boxes"]
        crowd = np.asarray(target["iscrowd"], dtype=bool)
        keep, _ = usable_boxes(boxes.as_subclass(torch.Tensor).double().numpy(), crowd, width, height)
        keep = torch.from_numpy(keep)
        kept = F.clamp_bounding_boxes(boxes).as_subclass(torch.Tensor)[keep]
        out["boxes"] = tv_tensors.wrap(kept, like=boxes)
        out["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64)
        return image, out


_TO_FLOAT = v2.ToDtype(
    {tv_tensors.Image: torch.float32, tv_tensors.BoundingBoxes: torch.float32, "others": None}, scale=True
)


def transforms(cfg: CocoConfig, train: bool, label_of: dict[int, int]) -> v2.Compose:
    steps: list[Any] = [CocoTargets(label_of), v2.ToImage()]
    if train:
        # Multi-scale: the detector's own transform draws the short side per image from the range (its
        # ``min_size`` is the range, see DetectorConfig.multiscale_short); resizing here as well would resize twice.
        if not cfg.multiscale_short:
            steps.append(v2.Resize(cfg.image_size, max_size=cfg.max_size))
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose([*steps, _TO_FLOAT])


def _dataset(cfg: CocoConfig, split: str, label_of: dict[int, int], train: bool, limit: int):
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    root = root_of(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints at every construction
        dataset = CocoDetection(
            str(root / getattr(cfg, f"{split}_images")),
            str(root / getattr(cfg, f"{split}_annotations")),
            transforms=transforms(cfg, train, label_of),
        )
    dataset.ids = limited(dataset.ids, limit)  # sorted image ids
    return wrap_dataset_for_transforms_v2(dataset, target_keys=("image_id", "boxes", "labels", "iscrowd"))


class Coco(DataKind):
    name = "coco"
    config = CocoConfig
    tasks = frozenset({"detection"})
    eval_batch_size = 8

    def check(self, cfg, task):
        problems = root_problems(cfg, LAYOUT)
        if cfg.max_size <= cfg.image_size:
            problems.append(Problem("data.max_size", cfg.max_size, f"> data.image_size ({cfg.image_size})"))
        scales = cfg.multiscale_short
        if scales and (len(scales) != 2 or scales[0] > scales[1] or scales[1] >= cfg.max_size):
            problems.append(
                Problem("data.multiscale_short", scales, "[] or [low, high] with low <= high < data.max_size")
            )
        if problems:
            return problems
        root = root_of(cfg)
        found = {}
        for split in SPLITS:
            ann_key, image_key = f"data.{split}_annotations", f"data.{split}_images"
            ann_value, image_value = getattr(cfg, f"{split}_annotations"), getattr(cfg, f"{split}_images")
            ann, image_dir = root / ann_value, root / image_value
            if not ann.is_file():
                problems.append(
                    Problem(ann_key, ann_value, f"a COCO instances JSON under data.root ({ann} is missing)")
                )
                continue
            if not image_dir.is_dir():
                problems.append(
                    Problem(image_key, image_value, f"a directory of images under data.root ({image_dir} is missing)")
                )
                continue
            info = summary(ann)
            if "error" in info:
                problems.append(Problem(ann_key, ann_value, f"a readable COCO instances JSON ({info['error']})"))
                continue
            problems += _file_problems(info, ann_key, ann_value, image_dir, image_value)
            found[split] = info
        if not problems and found["train"]["category_ids"] != found["val"]["category_ids"]:
            problems.append(
                Problem(
                    "data.val_annotations",
                    cfg.val_annotations,
                    f"the categories of data.train_annotations (ids {_ids(found['train'])}; "
                    f"it has {_ids(found['val'])})",
                )
            )
        return problems

    def num_classes(self, cfg, task):
        return len(summary(root_of(cfg) / cfg.train_annotations)["category_ids"]) + 1

    def datasets(self, cfg, task):
        train_file = root_of(cfg) / cfg.train_annotations
        info = summary(train_file)
        if info["degenerate"]:
            say_once(
                f"coco: {info['degenerate']} degenerate boxes (zero or negative width or height inside the image) "
                f"dropped from the training targets of {train_file}"
            )
        category_ids = tuple(info["category_ids"])
        label_of = {c: i + 1 for i, c in enumerate(category_ids)}
        train = _dataset(cfg, "train", label_of, True, cfg.limit_train)
        val = _dataset(cfg, "val", label_of, False, cfg.limit_val)
        return train, val, CocoTruth(root_of(cfg) / cfg.val_annotations, category_ids)

    def stride_keys(self, cfg):
        return {"data.image_size": cfg.image_size}

    def describe(self, cfg):
        scale = f"short side {cfg.image_size}" if not cfg.multiscale_short else f"short side {cfg.multiscale_short}"
        return f"COCO layout at {cfg.root}: training images resized to {scale}, long side <= {cfg.max_size}"


def _ids(info: dict[str, Any]) -> str:
    ids = info["category_ids"]
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def _file_problems(info, key: str, value: str, image_dir: Path, image_value: str) -> list[Problem]:
    names = info["file_names"]
    if not names:
        return [Problem(key, value, "an annotation file listing at least one image (it lists none)")]
    if not info["category_ids"]:
        return [Problem(key, value, "an annotation file with categories (it lists none)")]
    unknown, example = info["unknown_categories"]
    if unknown:
        return [
            Problem(
                key,
                value,
                f"annotations whose category_id is a listed category ({unknown} name others, e.g. {example})",
            )
        ]
    present = set(os.listdir(image_dir))
    missing = [n for n in names if n not in present and not (image_dir / n).is_file()]
    if missing:
        return [
            Problem(
                key,
                value,
                f"annotations whose images exist: {len(missing)} of the {len(names)} images it names are not in "
                f"{image_value}/, e.g. {missing[0]}",
            )
        ]
    return []


KIND = register(Coco())
