"""Tiny data sets on disk in the layouts the real data kinds read (COCO, Cityscapes, a folder of images and masks),
written with PIL into a directory, with what the tests expect of them.

Images are small and of different sizes; each object is a filled rectangle of its category's colour on a noisy
background, so a detector or a segmenter could learn them, but the tests only need the files and their labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

#: COCO fixture: sparse category ids (3, 7, 11), to exercise the mapping to the contiguous labels 1..3
COCO_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
COLOURS = {3: (220, 40, 40), 7: (40, 200, 40), 11: (40, 40, 220)}

# (image id, file name, width, height, [(category id, [x, y, w, h], iscrowd), ...])
COCO_TRAIN = [
    (101, "000000000101.jpg", 64, 48, [(3, [4.0, 6.0, 20.0, 16.0], 0), (7, [30.0, 10.0, 24.0, 30.0], 0)]),
    (102, "000000000102.jpg", 80, 64, [(11, [0.0, 0.0, 40.0, 40.0], 1), (7, [44.0, 20.0, 30.0, 36.0], 0)]),
    (104, "000000000104.jpg", 48, 64, [(3, [10.0, 10.0, 0.0, 12.0], 0), (11, [8.0, 30.0, 28.0, 20.0], 0)]),
    (107, "000000000107.jpg", 56, 56, []),
]
COCO_VAL = [
    (201, "000000000201.jpg", 72, 56, [(3, [6.0, 8.0, 26.0, 22.0], 0), (11, [40.0, 24.0, 24.0, 26.0], 0)]),
    (203, "000000000203.jpg", 56, 80, [(7, [10.0, 12.0, 30.0, 40.0], 0), (3, [0.0, 60.0, 50.0, 18.0], 1)]),
    (205, "000000000205.jpg", 64, 64, [(11, [20.0, 20.0, 30.0, 28.0], 0)]),
]
#: what the COCO training targets keep: per image id, (labels 1..3 in file order, number of boxes)
COCO_TRAIN_KEPT = {101: [1, 2], 102: [2], 104: [3], 107: []}
COCO_DEGENERATE = 1  # image 104's zero-width box
COCO_CROWD = 1  # image 102's crowd box


def _noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    return rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)


def _coco_split(root: Path, folder: str, images, rng, first_ann_id: int) -> dict:
    (root / folder).mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    ann_id = first_ann_id
    for image_id, name, width, height, objects in images:
        pixels = _noise(rng, width, height)
        for category, (x, y, w, h), _ in objects:
            pixels[int(y) : int(y + h), int(x) : int(x + w)] = COLOURS[category]
        Image.fromarray(pixels).save(root / folder / name, quality=95)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category, box, crowd in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": float(box[2] * box[3]),
                    "iscrowd": crowd,
                    "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3]]],
                }
            )
            ann_id += 1
    return {"images": entries, "annotations": annotations, "categories": COCO_CATEGORIES}


def write_coco(root: Path) -> Path:
    """``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{train,val}2017.json``: 4 training images
    (a crowd box, a degenerate box, an image without boxes) and 3 validation images (one crowd box)."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, images, first in (("train", COCO_TRAIN, 1), ("val", COCO_VAL, 1000)):
        data = _coco_split(root, f"{split}2017", images, rng, first)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


# ------------------------------------------------------------------------------------------ Cityscapes
#: label ids drawn in the fixture and their train ids (0 unlabeled, 9 parking and 4 static are ignored: 255)
CITYSCAPES_IDS = {7: 0, 26: 13, 33: 18, 0: 255, 9: 255, 4: 255, 11: 2}
CITYSCAPES_CITIES = {"train": {"aachen": 2, "bochum": 2}, "val": {"frankfurt": 1, "lindau": 2}}
CITYSCAPES_SIZE = (64, 128)  # height, width (the real files are 1024 x 2048; the data set does not care)


def write_cityscapes(root: Path, size: tuple[int, int] = CITYSCAPES_SIZE) -> Path:
    """``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and ``gtFine/.../*_gtFine_labelIds.png``: bands of the
    label ids of :data:`CITYSCAPES_IDS`, so every image has every one of them."""
    rng = np.random.default_rng(1)
    height, width = size
    ids = list(CITYSCAPES_IDS)
    for split, cities in CITYSCAPES_CITIES.items():
        for city, count in cities.items():
            for k in range(count):
                stem = f"{city}_{k:06d}_000019"
                image_dir = root / "leftImg8bit" / split / city
                label_dir = root / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                label_dir.mkdir(parents=True, exist_ok=True)
                labels = np.zeros((height, width), dtype=np.uint8)
                band = width // len(ids)
                for j, label_id in enumerate(np.roll(ids, k)):
                    labels[:, j * band : (j + 1) * band if j < len(ids) - 1 else width] = label_id
                Image.fromarray(_noise(rng, width, height)).save(image_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(labels).save(label_dir / f"{stem}_gtFine_labelIds.png")
    return root


# ------------------------------------------------------------------------------------------ folder
FOLDER_CLASSES = ["background", "road", "car"]
# (split, name, suffix, width, height)
FOLDER_IMAGES = [
    ("train", "a", ".png", 48, 40),
    ("train", "b", ".jpg", 56, 72),
    ("train", "c", ".png", 40, 40),
    ("val", "d", ".png", 48, 32),
    ("val", "e", ".jpg", 40, 56),
]


def folder_mask(width: int, height: int) -> np.ndarray:
    """Left third class 0, middle third 1, right third 2, a 255 line across the middle."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 3 : 2 * width // 3] = 1
    mask[:, 2 * width // 3 :] = 2
    mask[height // 2, :] = 255
    return mask


def write_folder(root: Path) -> Path:
    """``images/{train,val}/NAME.png|jpg`` and ``masks/{train,val}/NAME.png`` of :data:`FOLDER_IMAGES`."""
    rng = np.random.default_rng(2)
    for split, name, suffix, width, height in FOLDER_IMAGES:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng, width, height)).save(root / "images" / split / f"{name}{suffix}")
        Image.fromarray(folder_mask(width, height)).save(root / "masks" / split / f"{name}.png")
    return root
