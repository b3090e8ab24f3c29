"""Run profiles: the same manifest at another size. ``smoke`` runs every stage of any shipped manifest in minutes.

A profile is a set of manifest overrides computed from the manifest itself (its data kind and what it enables),
applied *before* the user's ``--set`` values, so ``--set`` still wins. ``default`` changes nothing. The smoke
profile keeps the manifest's models, methods, losses and optimisers and shrinks only what sets the cost: run
lengths, batch, input size, the number of images and seeds. Numbers from it mean nothing; it answers "does this
manifest run here, end to end, on this data".

Weight files named by the manifest (``teacher.weights``, ``*.backbone_weights``) are kept when they resolve on
this machine and dropped, with one line saying so, when they do not: a smoke run must not need downloads.
"""

from __future__ import annotations

import sys
from typing import Any

from .manifest import _merge, _read, parse_override, resolve_path

PROFILES = ("default", "smoke")

#: Optimizer steps of every training stage in the smoke profile.
SMOKE_STEPS = 4

#: Per data kind: the ``[data]`` values of the smoke profile (keys the kind does not have are left out).
SMOKE_DATA: dict[str, dict[str, Any]] = {
    # a few generated scenes (the embedded *_smoke manifests use the same sizes)
    "embedded": {"num_train": 16, "num_val": 8},
    # COCO: 128-pixel short side instead of 800, a handful of images
    "coco": {"image_size": 128, "max_size": 192, "limit_train": 8, "limit_val": 4, "workers": 0},
    # Cityscapes / own folder: 64x128 crops, evaluation on a handful of images at a quarter of the resolution
    "cityscapes": {"crop_size": [64, 128], "limit_train": 4, "limit_val": 2, "eval_scale": 0.125, "workers": 0},
    "folder": {"crop_size": [64, 64], "limit_train": 4, "limit_val": 2, "workers": 0},
}


def _raw(name: str, sets: list[str] | None) -> dict[str, Any]:
    data, _ = _read(resolve_path(name))
    for text in sets or []:
        data = _merge(data, parse_override(text))
    return data


def _smoke_train(section: dict[str, Any], steps: int) -> dict[str, Any]:
    # Batches of 2 images on one device: BatchNorm in training and PKD's per-channel std need 2 values at a
    # 1x1 map. Under torchrun, --set *.batch_size=4 keeps 2 per device on two processes.
    out: dict[str, Any] = {"iterations": steps, "batch_size": 2, "log_every": 1}
    if "warmup_iters" in section:
        out["warmup_iters"] = min(int(section["warmup_iters"]), 1)
    if "batch_per_device" in section:
        out["batch_per_device"] = 0  # the whole batch (or an even split over torchrun's processes)
    if section.get("checkpoint_every"):
        out["checkpoint_every"] = 2
    return out


def _data_keys(kind: str) -> set[str]:
    import dataclasses

    from ..datasets import get_kind  # the data kinds' config fields

    return {f.name for f in dataclasses.fields(get_kind(kind).config)}


def _weights_note(role: str, key: str, spec: str) -> str | None:
    """None when ``spec`` resolves to a file here; else why not."""
    from .weights import WeightsError, resolve_weights

    try:
        resolve_weights(spec)
    except WeightsError as exc:
        return (
            f"smoke: {role}.{key} = {spec!r} is not on this machine ({exc}); this smoke run starts from random weights"
        )
    return None


def profile_overrides(name: str, profile: str, sets: list[str] | None = None) -> dict[str, Any]:
    """The manifest overrides (nested dict) of ``profile`` for manifest ``name`` with the user's ``sets``."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    if profile == "default":
        return {}
    raw = _raw(name, sets)
    seeds = raw.get("protocol", {}).get("seeds") or [0]
    out: dict[str, Any] = {"protocol": {"seeds": [seeds[0]]}}
    for section in ("teacher_train", "student_train"):
        out[section] = _smoke_train(raw.get(section, {}), SMOKE_STEPS)
    tokens = raw.get("tokens", {})
    out["tokens"] = {"iterations": 2, "batch_size": 2}
    if tokens.get("checkpoint_every"):
        out["tokens"]["checkpoint_every"] = 1
    maskd = raw.get("maskd", {})
    out["maskd"] = {}
    if maskd.get("custom_mask", True):
        out["maskd"]["custom_mask_warmup"] = min(int(maskd.get("custom_mask_warmup", 2)), 2)
    if maskd.get("area_eps") is None:
        # The official detection loss divides by the mask area with no epsilon: an untrained teacher's tokens can
        # give masks that underflow to exactly 0, and 0 / 0 is NaN. The segmentation variant's own 1e-5 (what
        # None means there) keeps the smoke run finite in both variants.
        out["maskd"]["area_eps"] = 1e-5
    kind = raw.get("data", {}).get("kind", "embedded")
    allowed = _data_keys(kind)
    out["data"] = {k: v for k, v in SMOKE_DATA.get(kind, {}).items() if k in allowed}
    if kind != "embedded" and "multiscale_short" in allowed and raw.get("data", {}).get("multiscale_short"):
        out["data"]["multiscale_short"] = [96, 128]
    for role in ("teacher", "student"):
        kept = []
        for key in ("weights", "backbone_weights"):
            spec = raw.get(role, {}).get(key, "")
            note = _weights_note(role, key, spec) if spec else None
            if note:
                print(note, file=sys.stderr, flush=True)
                out.setdefault(role, {})[key] = ""
            elif spec:
                kept.append(key)
        if not kept and str(raw.get(role, {}).get("backbone", "")).startswith("resnet"):
            # random weights: residual blocks start as the identity, so an untrained deep teacher's features keep
            # a sane scale (see SegmenterConfig/DetectorConfig.zero_init_residual)
            out.setdefault(role, {})["zero_init_residual"] = True
    return out
