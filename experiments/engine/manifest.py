"""Manifests: typed, strict, small changes to a base.

A manifest is a TOML file. ``base = "other.toml"`` (relative to the file) names the manifest it changes; tables
are merged key by key, so a child states only what differs, with a comment saying why (STYLE.md item 8). Every
key is checked against the dataclasses below before anything runs: an unknown key or a wrong type raises
:class:`ManifestError` naming the key, the file and the allowed keys.

The resolved manifest flattens to ``section.key`` strings for MLflow params, and each stage hashes the part of it
that determines its result (:func:`stage_hash`), which is how finished runs are found again and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .data import SceneConfig
from .models import DetectorConfig, SegmenterConfig

ModelConfig = DetectorConfig | SegmenterConfig
MANIFEST_DIR = Path(__file__).resolve().parents[1] / "manifests"

Task = Literal["detection", "segmentation"]
Method = Literal["baseline", "fitnet", "cwd", "fgd", "maskd"]
METHODS: tuple[str, ...] = typing.get_args(Method)


class ManifestError(ValueError):
    """A manifest that cannot run: the message names the key and the file."""


@dataclass(frozen=True)
class Protocol:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    checkpoint: Literal["last"] = "last"  # the last checkpoint is reported; no selection on validation
    eval_split: Literal["val"] = "val"


@dataclass(frozen=True)
class Train:
    iterations: int = 600
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "poly", "step", "constant"] = "cosine"
    min_lr: float = 0.0
    warmup_iters: int = 0
    grad_clip: float = 0.0  # 0 = no clipping
    log_every: int = 10


@dataclass(frozen=True)
class Tokens:
    """Stage 1: receptive-token learning on the frozen teacher."""

    num_tokens: int = 6
    weight_head: bool = True
    dice_weight: float = 1.0
    iterations: int = 200
    batch_size: int = 8
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 0.01
    weight_decay: float = 1e-3
    schedule: Literal["cosine", "poly"] = "cosine"
    min_lr: float = 1e-6
    momentum: float = 0.9


@dataclass(frozen=True)
class Distill:
    """Which declared features (``experiments.engine.models.feature_info`` names) are distilled."""

    features: list[str] = field(default_factory=lambda: ["P3", "P4", "P5", "P6", "P7"])
    align: bool = True  # a trainable 1x1 conv per level on the student side (MasKD/FitNet configs)


@dataclass(frozen=True)
class FitNetCfg:
    loss_weight: float = 1.0
    features: list[str] = field(default_factory=list)  # empty: Distill.features


@dataclass(frozen=True)
class CWDCfg:
    tau: float = 1.0
    loss_weight: float = 10.0
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FGDCfg:
    temp: float = 0.5
    alpha_fgd: float = 1e-3
    beta_fgd: float = 5e-4
    gamma_fgd: float = 5e-4
    lambda_fgd: float = 5e-6
    weight_scale: float = 1.0  # multiplies alpha..lambda; see the manifests for why it is not 1 here
    box_scale: Literal["unpadded", "padded"] = "unpadded"
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MasKDCfg:
    loss_weight: float = 7.0
    custom_mask: bool = True
    custom_mask_warmup: int = 50
    variant: Literal["detection", "segmentation"] = "detection"
    area_eps: float | None = None  # None: the variant's (detection 0, as the official code; segmentation 1e-5)
    mask_power: int = 2
    # learned: stage-1 tokens; untrained: the official token init; uniform: every pixel 0.5; gt_box: two fixed
    # masks per level, the union of the ground-truth boxes and its complement (FGD's box geometry), detection only
    masks: Literal["learned", "untrained", "uniform", "gt_box"] = "learned"
    features: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    name: str
    task: Task
    paper_row: str
    description: str = ""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    protocol: Protocol = field(default_factory=Protocol)
    data: SceneConfig = field(default_factory=SceneConfig)
    teacher: ModelConfig = field(default_factory=DetectorConfig)
    student: ModelConfig = field(default_factory=DetectorConfig)
    teacher_train: Train = field(default_factory=Train)
    student_train: Train = field(default_factory=Train)
    tokens: Tokens = field(default_factory=Tokens)
    distill: Distill = field(default_factory=Distill)
    fitnet: FitNetCfg = field(default_factory=FitNetCfg)
    cwd: CWDCfg = field(default_factory=CWDCfg)
    fgd: FGDCfg = field(default_factory=FGDCfg)
    maskd: MasKDCfg = field(default_factory=MasKDCfg)
    source: str = ""  # the file it was loaded from (set by the loader, not written in manifests)

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ManifestError(
                    f"methods: unknown method {m!r} in {self.source or self.name}; allowed: {', '.join(METHODS)}"
                )
        if self.task == "segmentation" and "fgd" in self.methods:
            raise ManifestError(f"methods: fgd needs boxes and applies to detection only ({self.source or self.name})")
        if self.task == "segmentation" and self.maskd.masks == "gt_box":
            raise ManifestError(
                f"maskd.masks = 'gt_box' needs boxes and applies to detection only ({self.source or self.name})"
            )
        if not self.protocol.seeds:
            raise ManifestError(f"protocol.seeds is empty in {self.source or self.name}")

    def features_for(self, method: str) -> list[str]:
        own = getattr(self, method).features if method in ("fitnet", "cwd", "fgd", "maskd") else []
        return list(own) or list(self.distill.features)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def flat(self) -> dict[str, str]:
        """``section.key -> str`` for MLflow params."""
        return flatten(self.to_dict())


# ------------------------------------------------------------------------------------------ strict parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(f"{key} must be a table in {where}, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ManifestError(f"{key} = {value!r} in {where}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, list):
            raise ManifestError(f"{key} must be a list in {where}, got {type(value).__name__} {value!r}")
        items = [_convert(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType) and all(dataclasses.is_dataclass(o) for o in typing.get_args(tp)):
        raise ManifestError(f"{key}: internal error, ambiguous section type {tp}")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, where)
            except ManifestError:
                continue
        raise ManifestError(f"{key} = {value!r} in {where} matches none of {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(f"{key} must be a number in {where}, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{key} must be an integer in {where}, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ManifestError(f"{key} must be {_type_name(tp)} in {where}, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ManifestError(
                f"unknown key {full!r} in {where}; allowed in {prefix or 'the top level'}: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], full, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ManifestError(f"{where} lacks required key {prefix + '.' if prefix else ''}{missing[0]}")
    try:
        return cls(**kwargs)
    except ManifestError:
        raise
    except (ValueError, TypeError) as exc:  # the section's own validation (e.g. SceneConfig.__post_init__)
        raise ManifestError(f"{prefix or 'manifest'} in {where}: {exc}") from None


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ManifestError(f"base cycle: {' -> '.join(p.name for p in (*seen, path))}")
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found" + (f" (base of {seen[-1].name})" if seen else ""))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path.name}: {exc}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ManifestError(f"base must be a file name in {path.name}, got {base!r}")
    return _merge(_read(path.parent / base, (*seen, path)), data)


def resolve_path(name: str | Path) -> Path:
    """A path, or the name of a shipped manifest (with or without ``.toml``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = MANIFEST_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.is_file():
        return shipped
    raise ManifestError(f"manifest {name} not found (shipped: {', '.join(shipped_manifests())})")


def load_manifest(name: str | Path, overrides: dict[str, Any] | None = None) -> Manifest:
    """Read, merge with its bases, apply ``overrides`` (a nested dict) and check every key and type."""
    path = resolve_path(name)
    data = _read(path)
    if overrides:
        data = _merge(data, overrides)
    # teacher/student are DetectorConfig or SegmenterConfig depending on the task; data.image_size is shared.
    task = data.get("task")
    model_cls = {"detection": DetectorConfig, "segmentation": SegmenterConfig}.get(task)
    if model_cls is None:
        raise ManifestError(f"task = {task!r} in {path.name}; allowed: 'detection', 'segmentation'")
    models = {}
    image_size = data.get("data", {}).get("image_size", SceneConfig().image_size)
    for role in ("teacher", "student"):
        section = dict(data.pop(role, {}))
        if model_cls is DetectorConfig:
            if section.setdefault("image_size", image_size) != image_size:
                raise ManifestError(
                    f"{role}.image_size = {section['image_size']} in {path.name} differs from "
                    f"data.image_size = {image_size}"
                )
        models[role] = _build(model_cls, section, role, path.name)
    manifest = _build(Manifest, data, "", path.name)
    return dataclasses.replace(manifest, source=str(path), **models)


def shipped_manifests() -> list[str]:
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.toml"))


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` (value in TOML syntax, bare words as strings) -> nested dict."""
    if "=" not in text:
        raise ManifestError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------ flatten, hash
def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
