"""Pretrained starts for the embedded benchmark: the stand-in for the paper's ImageNet initialisation.

The paper's teachers and students start from ImageNet-pretrained backbones. The embedded models are thin ResNets
(width 16, 32, 64) for which no ImageNet file exists, and nothing is downloaded here, so this stage pretrains
each backbone body on a small classification task built from the same real MNIST digits as the scenes
(:mod:`experiments.engine.data`): 10 classes, one digit per ``image_size`` image, pasted at a random size,
position and colour on the scenes' textured background with their clutter. Training images draw only the scenes'
train digits (``digit_pool(cfg, "train")``); the held-out top-1 is measured on one image of each val digit
(``digit_pool(cfg, "val")``), digits no training image contains (never on a test split's digits).

The classifier is the role's ResNet body (its ``backbone`` and ``width``; BatchNorm, no dilation) + global
average pooling + a linear layer, trained with AdamW, a linear warm-up and a cosine schedule. Image ``i`` is a
function of the seed and ``i`` alone (one NumPy ``Generator`` per image), the batch order of the seed, and the
weights of ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`: the result is deterministic and the
caller's random state is left as it was, so a stage computes the same whether the file was cached or not.

The body's state dict is cached once per :func:`pretrain_spec` (``cache_root()/pretrained/<digest>.pt``, written
atomically with its sha256, computed under a file lock so concurrent stages compute it once) with its metrics
beside it (``<digest>.json``). :func:`load_pretrained` loads it into a built detector's or segmenter's body as an
ImageNet file would be (:mod:`experiments.engine.weights`): the dilated segmentation body takes the same tensors
(dilation changes no shape) and a stage the body leaves out is dropped; every tensor of the body must be given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoints as ckpt
from .data import (
    SceneConfig,
    _add_clutter,
    _background,
    _glyphs,
    _log_uniform,
    _paste,
    _pick_colour,
    _render_glyph,
    digit_pool,
    load_mnist,
)
from .locks import claim_timeout, file_lock
from .models import build_resnet_body
from .paths import cache_root
from .runtime import device

__all__ = ["load_pretrained", "pretrain_metrics", "pretrain_spec", "pretrained_backbone"]

#: Bump when the images, the classifier or the training loop change, so that old cached bodies are not reused.
VERSION = 1
#: This module, relative to the source root: its code (and the computing code it imports) is part of the cache key.
CODE = "experiments/engine/pretrain.py"
#: Side of the pasted digit (``sqrt(w * h)`` of its ink box), as a share of ``image_size``, drawn log-uniformly
#: (at most ``image_size - 2`` px): a centred-object classification task, as ImageNet's.
DIGIT_SHARE = (0.3, 1.0)
#: The scene fields that make the images besides the digit pools (the pretraining has its own size and seed).
LOOK_FIELDS = (
    "texture_strength",
    "texture_octaves",
    "stripe_strength",
    "clutter",
    "clutter_contrast",
    "digit_contrast",
    "noise_std",
    "aspect_jitter",
)
#: The normalisation both tasks apply to their inputs (torchvision's detector transform; segmentation.normalise).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 10
EVAL_BATCH = 200


# ------------------------------------------------------------------------------------------ what makes the weights
def pretrain_spec(manifest, role: str) -> dict[str, Any] | None:
    """Everything that determines ``role``'s pretrained body (JSON-able), for its cache file and stage hashes; None
    when ``pretrain.enabled`` is false. The body's ``backbone`` and ``width`` make its shapes; the detection or
    segmentation head around it, its dilation and its norm do not change the pretrained tensors, so a ResNet-10
    at width 16 is pretrained once for both tasks."""
    p = manifest.pretrain
    if not p.enabled:
        return None
    scenes = manifest.data
    if not isinstance(scenes, SceneConfig):
        raise ValueError(f"pretrain needs the embedded scenes (data.kind = 'embedded'), not {type(scenes).__name__}")
    cfg = getattr(manifest, role)
    spec = {
        "version": VERSION,
        "pretrain": dataclasses.asdict(p),
        "body": {"backbone": cfg.backbone, "width": cfg.width},
        "scenes": {"train_digits_per_class": scenes.train_digits_per_class}
        | {k: getattr(scenes, k) for k in LOOK_FIELDS},
    }
    if getattr(scenes, "num_test", 0):  # a test split halves the held-out digits: only val's are measured on
        spec["scenes"]["test_split"] = True
    return json.loads(json.dumps(spec))  # tuples as lists: the dict equals its JSON round trip


def _digest(spec: dict[str, Any]) -> str:
    """The cache key: the spec and the code that computes the body (this module and what it imports), so that a
    change of either pretrains again."""
    from .fingerprint import files_fingerprint
    from .manifest import digest  # manifest.py imports the training code, which imports this module

    return digest({"spec": spec, "code": files_fingerprint([CODE])[0]})


def _paths(spec: dict[str, Any]) -> tuple[Path, Path]:
    folder = cache_root() / "pretrained"
    key = _digest(spec)
    return folder / f"{key}.pt", folder / f"{key}.json"


# ------------------------------------------------------------------------------------------ images
def _look(spec: dict[str, Any]) -> SceneConfig:
    """The scenes' rendering settings (those ``spec`` holds) at the pretraining size, digits sized by
    :data:`DIGIT_SHARE`: the images are a function of the spec alone."""
    size = spec["pretrain"]["image_size"]
    low, high = max(4.0, DIGIT_SHARE[0] * size), min(DIGIT_SHARE[1] * size, size - 2.0)
    scenes = dict(spec["scenes"])
    if scenes.pop("test_split", False):
        scenes["num_test"] = 1  # digit_pool(look, "val") is then val's half of the held-out digits, as the scenes'
    return SceneConfig(**scenes, image_size=size, digit_size_px=(low, high))


def render_digit(look: SceneConfig, pool: np.ndarray, rng: np.random.Generator, index: int | None = None):
    """One classification image: (uint8 [S, S, 3], digit class). The MNIST digit is row ``index``, or one drawn
    from ``pool`` with ``rng``; the clutter comes from ``pool`` too (the same split, as in the scenes)."""
    _, labels = load_mnist()
    size = look.image_size
    canvas = _background(rng, look)
    _add_clutter(rng, look, canvas, pool)
    if index is None:
        index = int(pool[rng.integers(len(pool))])
    digit_size = _log_uniform(rng, *look.digit_size_px)
    aspect = math.exp(rng.uniform(-look.aspect_jitter, look.aspect_jitter))
    alpha = _render_glyph(_glyphs()[index], digit_size, aspect, size)
    if alpha.size:
        h, w = alpha.shape
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        colour = _pick_colour(rng, canvas[y0 : y0 + h, x0 : x0 + w], look.digit_contrast)
        _paste(canvas, alpha, colour, x0, y0)
    canvas += rng.normal(0.0, look.noise_std, size=canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), int(labels[index])


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def _batch(look: SceneConfig, pool: np.ndarray, seed: int, split: int, indices, digits=None) -> tuple[Tensor, Tensor]:
    """Images ``indices`` of ``split`` (0 train, 1 held-out) as a normalised [N, 3, S, S] float batch and labels."""
    images, labels = [], []
    for k, i in enumerate(indices):
        image, label = render_digit(look, pool, _image_rng(seed, split, int(i)), None if digits is None else digits[k])
        images.append(image)
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x, torch.tensor(labels, dtype=torch.int64)


def _order(seed: int, num_images: int, step: int, batch_size: int) -> np.ndarray:
    """The train image indices of ``step``: consecutive slices of a fresh permutation per epoch."""
    epochs, offsets = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), num_images)
    perms = {
        int(e): np.random.default_rng(np.random.SeedSequence([seed, 2, int(e)])).permutation(num_images)
        for e in np.unique(epochs)
    }
    return np.array([perms[int(e)][o] for e, o in zip(epochs, offsets, strict=True)])


# ------------------------------------------------------------------------------------------ the classifier
class DigitClassifier(nn.Module):
    """A backbone body + global average pooling + linear: [N, 3, S, S] -> logits [N, 10]."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))


def _lr_factor(step: int, p) -> float:
    """Linear warm-up from 0.001, then cosine to 0 (as :func:`~.training.lr_factor`)."""
    if p.warmup_iters and step < p.warmup_iters:
        return 0.001 + (1 - 0.001) * step / p.warmup_iters
    return 0.5 * (1 + math.cos(math.pi * min(step / max(p.iterations, 1), 1.0)))


def _train(spec: dict[str, Any], label: str, progress: bool) -> tuple[dict, dict]:
    """Pretrain the body ``spec`` names; returns (body state dict on the CPU, metrics)."""
    p = SimpleNamespace(**spec["pretrain"])
    begin = time.perf_counter()
    look = _look(spec)
    train_pool, val_pool = digit_pool(look, "train"), digit_pool(look, "val")
    dev = device()
    # enable_grad: a caller may hold no_grad (calibration measures the untrained student's losses under it)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(p.seed)
        body = build_resnet_body(spec["body"]["backbone"], width=spec["body"]["width"])
        model = DigitClassifier(body, body.stage_channels[3]).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, p))
        model.train()
        losses: list[float] = []
        bar = tqdm(range(p.iterations), desc=label, disable=not progress, dynamic_ncols=True, leave=False)
        for step in bar:
            x, y = _batch(look, train_pool, p.seed, 0, _order(p.seed, p.num_images, step, p.batch_size))
            loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: loss is {loss.item()} at step {step}; lower pretrain.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        top1 = _held_out_top1(model, look, val_pool, p.seed, dev)
    tail = losses[-max(1, len(losses) // 10) :]  # the last tenth of the run
    metrics = {"top1": top1, "train_loss": sum(tail) / len(tail), "wall_time_s": time.perf_counter() - begin}
    return {k: v.detach().to("cpu", copy=True) for k, v in body.state_dict().items()}, metrics


@torch.no_grad()
def _held_out_top1(model: nn.Module, look: SceneConfig, val_pool: np.ndarray, seed: int, dev) -> float:
    """Top-1 (%) on one image of each held-out digit (``digit_pool(cfg, "val")``)."""
    model.eval()
    correct = 0
    for start in range(0, len(val_pool), EVAL_BATCH):
        indices = range(start, min(start + EVAL_BATCH, len(val_pool)))
        x, y = _batch(look, val_pool, seed, 1, indices, digits=[int(val_pool[i]) for i in indices])
        correct += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
    return 100.0 * correct / len(val_pool)


# ------------------------------------------------------------------------------------------ the cache
def _read(spec: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, float]] | None:
    """The cached body and metrics of ``spec``; None when absent or unreadable (then it is computed again)."""
    weights, metrics = _paths(spec)
    if not (weights.is_file() and metrics.is_file()):
        return None
    try:
        return ckpt.load_checked(weights), json.loads(metrics.read_text())["metrics"]
    except (ckpt.CheckpointError, OSError, ValueError, KeyError):
        return None


def _cached(manifest, role: str, progress: bool) -> tuple[dict[str, Tensor], dict[str, float]]:
    spec = pretrain_spec(manifest, role)
    if spec is None:
        raise ValueError("pretrain.enabled is false: there is no pretrained backbone")
    found = _read(spec)
    if found is not None:
        return found
    weights, metrics_path = _paths(spec)
    body = f"{spec['body']['backbone']} width {spec['body']['width']}"
    label = f"pretrain/{role} ({body})"
    waiting = f"{label}: waiting for another process computing {weights.name}"
    with file_lock(weights.with_suffix(".lock"), timeout=claim_timeout(), waiting=waiting):
        found = _read(spec)  # another process may have computed it meanwhile
        if found is not None:
            return found
        state, metrics = _train(spec, label, progress)
        # the metrics first: the weights file is what says the stage is done
        ckpt.write_text_atomic(metrics_path, json.dumps({"spec": spec, "metrics": metrics}, indent=2) + "\n")
        ckpt.save_atomic(state, weights)
    return state, metrics


def pretrained_backbone(manifest, role: str, progress: bool = True) -> dict[str, Tensor]:
    """The pretrained state dict of ``role``'s ResNet body (``conv1`` ... ``layer4``), computed once and cached."""
    return _cached(manifest, role, progress)[0]


def pretrain_metrics(manifest, role: str) -> dict[str, float]:
    """``top1`` (held-out, %), ``train_loss`` (mean of the last tenth of the steps) and ``seconds`` (wall time of
    the computation) of ``role``'s pretraining (computed first if it is not cached)."""
    return _cached(manifest, role, progress=False)[1]


def load_pretrained(model: nn.Module, manifest, role: str, progress: bool = True) -> dict[str, float]:
    """Load ``role``'s pretrained body into ``model`` (a built detector or segmenter of ``manifest.<role>``), strict
    on the body's tensors; returns ``pretrain/<role>/<metric>`` for the run's metrics. Nothing when disabled."""
    if pretrain_spec(manifest, role) is None:
        return {}
    from .weights import WeightsError, _backbone_body, _body_key_map, _describe, _problems

    state, metrics = _cached(manifest, role, progress)
    cfg = getattr(manifest, role)
    name, body = _backbone_body(model, cfg)
    key_map = _body_key_map(cfg, {n for n, _ in body.named_children()})
    mapped = {new: value for key, value in state.items() if (new := key_map(key)) is not None}
    own = body.state_dict()
    problem = _problems(f"the pretrained {role} body", own, mapped, f"the backbone body ({name}) of {_describe(cfg)}")
    if problem:
        raise WeightsError(problem)
    chosen = {k: v for k, v in mapped.items() if k in own}  # a FrozenBatchNorm2d body has no counters
    # strict=False only because num_batches_tracked may be absent; every other key was checked above
    body.load_state_dict(chosen, strict=False)
    loaded = body.state_dict()
    if not all(torch.equal(loaded[k].cpu(), v) for k, v in chosen.items()):
        raise RuntimeError(f"the pretrained {role} body did not load into {name}")  # a bug, never a user error
    return {f"pretrain/{role}/{k}": float(v) for k, v in metrics.items()}
