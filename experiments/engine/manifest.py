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

from ..methods import registry as method_registry
from ..tasks import get_task, tasks
from .data import SceneConfig
from .fields import Problem, knob, range_problems
from .models import DetectorConfig, SegmenterConfig

ModelConfig = DetectorConfig | SegmenterConfig
MANIFEST_DIR = Path(__file__).resolve().parents[1] / "manifests"

Task = Literal["detection", "segmentation"]


def method_choices() -> list[str]:
    """``baseline`` and every registered distillation method, in table order."""
    return ["baseline", *method_registry.method_names()]


class ManifestError(ValueError):
    """A manifest that cannot run: the message names where the value came from, the key and what is allowed."""


@dataclass(frozen=True)
class Protocol:
    seeds: list[int] = knob(default_factory=lambda: [0, 1, 2], nonempty=True, unique=True, ge=0)
    checkpoint: Literal["last"] = "last"  # the last checkpoint is reported; no selection on validation
    eval_split: Literal["val"] = "val"


@dataclass(frozen=True)
class Train:
    iterations: int = knob(600, ge=1)
    batch_size: int = knob(8, ge=1)
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = knob(0.01, gt=0)
    momentum: float = knob(0.9, ge=0, lt=1)
    weight_decay: float = knob(1e-4, ge=0)
    schedule: Literal["cosine", "poly", "step", "constant"] = "cosine"
    min_lr: float = knob(0.0, ge=0)
    warmup_iters: int = knob(0, ge=0)  # must also be shorter than the run (checked with the manifest)
    grad_clip: float = knob(0.0, ge=0)  # 0 = no clipping
    log_every: int = knob(10, ge=1)


@dataclass(frozen=True)
class Tokens:
    """Stage 1: receptive-token learning on the frozen teacher."""

    num_tokens: int = knob(6, ge=1)
    weight_head: bool = True
    dice_weight: float = knob(1.0, ge=0)
    iterations: int = knob(200, ge=1)
    batch_size: int = knob(8, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = knob(0.01, gt=0)
    weight_decay: float = knob(1e-3, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    min_lr: float = knob(1e-6, ge=0)
    momentum: float = knob(0.9, ge=0, lt=1)


@dataclass(frozen=True)
class Distill:
    """Which declared features (``experiments.engine.models.feature_info`` names) are distilled."""

    features: list[str] = knob(default_factory=lambda: ["P3", "P4", "P5", "P6", "P7"], nonempty=True, unique=True)
    align: bool = True  # a trainable 1x1 conv per level on the student side (MasKD/FitNet configs)


@dataclass(frozen=True)
class Manifest:
    name: str
    task: Task
    paper_row: str
    description: str = ""
    methods: list[str] = field(default_factory=method_choices)
    protocol: Protocol = field(default_factory=Protocol)
    data: SceneConfig = field(default_factory=SceneConfig)
    teacher: ModelConfig = field(default_factory=DetectorConfig)
    student: ModelConfig = field(default_factory=DetectorConfig)
    teacher_train: Train = field(default_factory=Train)
    student_train: Train = field(default_factory=Train)
    tokens: Tokens = field(default_factory=Tokens)
    distill: Distill = field(default_factory=Distill)
    #: one section per registered method (``[maskd]``, ``[fgd]``, ...): its config dataclass
    method_configs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was loaded from (set by the loader, not written in manifests)

    def __getattr__(self, name: str) -> Any:  # ``m.maskd``: the method's section
        configs = self.__dict__.get("method_configs")
        if configs is not None and name in configs:
            return configs[name]
        if configs is not None and name in method_registry.methods():
            return method_registry.get(name).config()
        raise AttributeError(f"manifest has no section {name!r}")

    def features_for(self, method: str) -> list[str]:
        cfg = self.method_configs.get(method) if method != "baseline" else None
        own = list(getattr(cfg, "features", []) or []) if cfg is not None else []
        return own or list(self.distill.features)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("source")
        configs = out.pop("method_configs")
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
        for name in method_registry.method_names():
            out[name] = dataclasses.asdict(configs.get(name) or method_registry.get(name).config())
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


def _where(origins: dict[str, str], key: str, default: str) -> str:
    """Where the value of ``key`` (or of anything inside section ``key``) was written."""
    if key in origins:
        return origins[key]
    inside = [w for k, w in origins.items() if k.startswith(key + ".")]
    return inside[-1] if inside else default


def _build(cls: type, data: dict[str, Any], prefix: str, where: str, origins: dict[str, str] | None = None) -> Any:
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "method_configs")]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        here = _where(origins, full, where)
        if key not in names:
            raise ManifestError(
                f"unknown key {full!r} in {here}; allowed in {prefix or 'the top level'}: {', '.join(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = _build(tp, value, full, here, origins)
        else:
            kwargs[key] = _convert(value, tp, full, here)
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


def _leaf_origins(data: dict[str, Any], where: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_leaf_origins(value, where, full))
        out[full] = where
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged data of ``path`` and its bases, and for every key the file that set it."""
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
    origins = _leaf_origins(data, path.name)
    if base is None:
        return data, origins
    if not isinstance(base, str):
        raise ManifestError(f"base must be a file name in {path.name}, got {base!r}")
    base_data, base_origins = _read(path.parent / base, (*seen, path))
    return _merge(base_data, data), {**base_origins, **origins}


def resolve_path(name: str | Path) -> Path:
    """A path, or the name of a shipped manifest (with or without ``.toml``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = MANIFEST_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.is_file():
        return shipped
    raise ManifestError(f"manifest {name} not found (shipped: {', '.join(shipped_manifests())})")


def load_manifest(name: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> Manifest:
    """Read, merge with its bases, apply ``overrides`` (a nested dict) and ``sets`` (``key=value`` texts, as
    ``--set`` gives them), check every key, type, range and cross-field rule (:func:`validate`). Any problem is
    a :class:`ManifestError` naming where the value came from (file or ``--set``), before any work."""
    path = resolve_path(name)
    data, origins = _read(path)
    if overrides:
        data = _merge(data, overrides)
        origins.update(_leaf_origins(overrides, "an override"))
    for text in sets or []:
        override = parse_override(text)
        data = _merge(data, override)
        origins.update(_leaf_origins(override, f"--set {text}"))
    task_name = data.get("task")
    known = tasks()
    if task_name not in known:
        raise ManifestError(
            f"{_where(origins, 'task', path.name)}: task = {task_name!r}; allowed: {', '.join(map(repr, known))}"
        )
    task = get_task(task_name)
    model_cls = task.model_config
    # method sections: one per registered method, each checked against its plug-in's config type
    specs = method_registry.methods()
    method_configs = {}
    for method, spec in specs.items():
        section = data.pop(method, {})
        here = _where(origins, method, path.name)
        if not isinstance(section, dict):
            raise ManifestError(f"{method} must be a table in {here}, got {type(section).__name__}")
        method_configs[method] = _build(spec.config, section, method, here, origins)
    models = {}
    image_size = data.get("data", {}).get("image_size", SceneConfig().image_size)
    for role in ("teacher", "student"):
        section = dict(data.pop(role, {}))
        if "image_size" in {f.name for f in dataclasses.fields(model_cls)}:
            if section.setdefault("image_size", image_size) != image_size:
                raise ManifestError(
                    f"{_where(origins, role + '.image_size', path.name)}: {role}.image_size = "
                    f"{section['image_size']} differs from data.image_size = {image_size}"
                )
        models[role] = _build(model_cls, section, role, _where(origins, role, path.name), origins)
    manifest = _build(Manifest, data, "", path.name, origins)
    manifest = dataclasses.replace(manifest, source=str(path), method_configs=method_configs, **models)
    problems = validate(manifest)
    if problems:
        first = problems[0]
        raise ManifestError(first.message(_where(origins, first.key, path.name)))
    return manifest


# ------------------------------------------------------------------------------------------ validation
def validate(m: Manifest) -> list[Problem]:
    """Every value ``m`` cannot run with, checked before any work: declared field ranges, then the cross-field
    rules of the manifest, its task and its methods (features the models have, channels, image sizes)."""
    problems: list[Problem] = []
    for section in ("protocol", "teacher_train", "student_train", "tokens", "distill"):
        problems += range_problems(getattr(m, section), section)
    specs = method_registry.methods()
    for method, cfg in m.method_configs.items():
        problems += range_problems(cfg, method)
    for section in ("teacher_train", "student_train"):
        train = getattr(m, section)
        if train.warmup_iters >= train.iterations:
            problems.append(
                Problem(f"{section}.warmup_iters", train.warmup_iters, f"< {section}.iterations ({train.iterations})")
            )
    choices = method_choices()
    if not m.methods:
        problems.append(Problem("methods", m.methods, f"a non-empty list of {', '.join(choices)}"))
    if len(set(m.methods)) != len(m.methods):
        problems.append(Problem("methods", m.methods, "each method once"))
    task = get_task(m.task)
    for method in m.methods:
        if method not in choices:
            problems.append(Problem("methods", method, ", ".join(choices)))
            continue
        if method == "baseline":
            continue
        spec = specs[method]
        if m.task not in spec.tasks or not spec.needs <= task.capabilities:
            why = f"needs {', '.join(sorted(spec.needs))}" if spec.needs else "is not defined"
            problems.append(
                Problem(
                    "methods",
                    method,
                    f"methods that apply to {m.task} ({method} {why} for {m.task}): "
                    + ", ".join(n for n, s in specs.items() if m.task in s.tasks and s.needs <= task.capabilities),
                )
            )
            continue
        problems += _feature_problems(m, method, task)
        problems += spec.checks(m)
    for role in ("teacher", "student"):
        stride = task.input_stride(getattr(m, role))
        if m.data.image_size % stride:
            problems.append(
                Problem("data.image_size", m.data.image_size, f"a multiple of {stride} (the {role} model's stride)")
            )
    return problems


def _feature_problems(m: Manifest, method: str, task) -> list[Problem]:
    """The method's features exist in both models (declared and present in the built model), with equal
    channels where the method has no align conv."""
    names = m.features_for(method)
    key = f"{method}.features" if list(getattr(m, method).features) else "distill.features"
    out = []
    info = {role: task.features(getattr(m, role)) for role in ("teacher", "student")}
    for role in ("teacher", "student"):
        for name in names:
            if name not in info[role]:
                return [Problem(key, names, f"features of the {role} model: {', '.join(info[role])}")]
        built = _module_names(getattr(m, role), task)
        for name in names:
            if info[role][name].module not in built:
                return [Problem(key, name, f"a feature whose module exists in the built {role} model")]
    if method_registry.get(method).equal_channels(m):
        for name in names:
            s, t = info["student"][name].channels, info["teacher"][name].channels
            if s != t:
                out.append(
                    Problem(
                        key,
                        names,
                        f"features with equal student and teacher channels for {method} without align convs "
                        f"({name}: student {s}, teacher {t})",
                    )
                )
                break
    return out


_BUILT: dict[str, frozenset[str]] = {}


def _module_names(cfg, task) -> frozenset[str]:
    """Names of the modules of the model ``cfg`` builds (built once per config on the CPU, then remembered)."""
    key = digest(dataclasses.asdict(cfg))
    if key not in _BUILT:
        _BUILT[key] = frozenset(name for name, _ in task.build_model(cfg).named_modules())
    return _BUILT[key]


def shipped_manifests() -> list[str]:
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.toml"))


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` (value in TOML syntax, bare words as strings) -> nested dict."""
    if "=" not in text:
        raise ManifestError(f"--set {text}: must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ManifestError(f"--set {text}: empty key part in {key!r}")
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
