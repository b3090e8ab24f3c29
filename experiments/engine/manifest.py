"""Manifests: typed, strict, small changes to a base.

A manifest is a TOML file. ``base = "other.toml"`` (relative to the file) names the manifest it changes; tables
are merged key by key, so a child states only what differs, with a comment saying why (STYLE.md item 8). Every
key is checked against the dataclasses below before anything runs: an unknown key or a wrong type raises
:class:`ManifestError` naming the key, the file and the allowed keys.

The ``[data]`` section is the config of its ``kind`` (:mod:`experiments.datasets`; ``"embedded"`` by default):
its keys, the files it names and the models' classes and input sizes are checked against that kind. A child
manifest, override or ``--set`` that changes ``data.kind`` starts the section afresh from the new kind's defaults.

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

from ..datasets import DEFAULT_KIND, get_kind, kind_names, kind_of
from ..methods import registry as method_registry
from ..tasks import get_task, tasks
from .data import SceneConfig
from .fields import Problem, knob, range_problems
from .models import DetectorConfig, SegmenterConfig, without_weight_files

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
    # What the tables report: "val", or "test" where the data have a held-out test split (every choice is then
    # made on val and only test is reported).
    eval_split: Literal["val", "test"] = "val"
    # The equal tuning budget: each method's loss weight (its plug-in's weight_knob) times each multiplier, one run
    # at tune_seed, chosen on val by the primary metric (ties: the multiplier nearest 1); [1.0]: no tuning.
    weight_grid: list[float] = knob(default_factory=lambda: [1.0], nonempty=True, unique=True, gt=0)
    tune_seed: int = knob(0, ge=0)  # if one of seeds, its run at the chosen weight is also that seed's table run


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
    # A resume checkpoint every N optimizer steps (0: never); resume is exact, so it is not in the stage hash.
    checkpoint_every: int = knob(0, ge=0)
    # batch_size is the total batch of one optimizer step; batch_per_device is one forward's share on one device
    # (0: batch_size split over the torchrun processes, the whole batch in one process).
    batch_per_device: int = knob(0, ge=0)
    # With W processes: accumulate runs batch_size / (batch_per_device x W) forwards per step; linear_lr steps on
    # batch_per_device x W images with lr x (that / batch_size) (Goyal et al.'s linear scaling rule).
    batch_scaling: Literal["accumulate", "linear_lr"] = "accumulate"
    sync_bn: bool = False  # SyncBatchNorm in the trained model with several CUDA processes (not on the CPU)


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
    checkpoint_every: int = knob(0, ge=0)  # a resume checkpoint every N steps (0: never), as Train's
    batch_per_device: int = knob(0, ge=0)  # as Train's
    batch_scaling: Literal["accumulate", "linear_lr"] = "accumulate"  # as Train's


@dataclass(frozen=True)
class Pretrain:
    """Stage 0, embedded data only: every backbone body pretrained on digit classification before the teacher and
    the student train (:mod:`experiments.engine.pretrain`), the stand-in for the paper's ImageNet initialisation."""

    enabled: bool = False
    image_size: int = knob(64, ge=16)  # one digit on the scenes' background, image_size x image_size px
    num_images: int = knob(24000, ge=1)  # training images (each a function of seed and index)
    iterations: int = knob(600, ge=1)
    batch_size: int = knob(32, ge=2)  # BatchNorm in training needs 2
    lr: float = knob(2e-3, gt=0)  # AdamW, linear warm-up then cosine to 0
    weight_decay: float = knob(1e-4, ge=0)
    warmup_iters: int = knob(30, ge=0)  # must also be shorter than the run (checked with the manifest)
    seed: int = knob(0, ge=0)


@dataclass(frozen=True)
class Distill:
    """Which declared features (``experiments.engine.models.feature_info`` names) are distilled."""

    features: list[str] = knob(default_factory=lambda: ["P3", "P4", "P5", "P6", "P7"], nonempty=True, unique=True)
    align: bool = True  # a trainable 1x1 conv per level on the student side (MasKD/FitNet configs)
    # State-dict key prefixes copied from the teacher into every distilled student before training (not the
    # baseline): the official MasKD RetinaNet configs initialise the student's neck and head from the teacher
    # (``init_cfg`` prefix neck / bbox_head), FGD calls it "inheriting". Shapes must match (checked before work).
    init_from_teacher: list[str] = knob(default_factory=list, unique=True)
    # Compute the frozen teacher's distilled features of every training image once and look them up at each step
    # (:mod:`.teacher_outputs`): bitwise the same student, without a teacher forward per step. Valid only where an
    # image's teacher features never change (no random transforms, no multi-scale teacher input): refused elsewhere.
    teacher_cache: bool = False


@dataclass(frozen=True)
class Manifest:
    name: str
    task: Task
    paper_row: str
    description: str = ""
    methods: list[str] = field(default_factory=method_choices)
    protocol: Protocol = field(default_factory=Protocol)
    #: the ``[data]`` section: the config of its ``kind`` (:mod:`experiments.datasets`), SceneConfig by default
    data: Any = field(default_factory=SceneConfig)
    teacher: ModelConfig = field(default_factory=DetectorConfig)
    student: ModelConfig = field(default_factory=DetectorConfig)
    teacher_train: Train = field(default_factory=Train)
    student_train: Train = field(default_factory=Train)
    tokens: Tokens = field(default_factory=Tokens)
    distill: Distill = field(default_factory=Distill)
    pretrain: Pretrain = field(default_factory=Pretrain)
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
        out["data"] = {"kind": getattr(self.data, "kind", DEFAULT_KIND), **out["data"]}
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
    if _data_kind(data) not in (None, _data_kind(base_data) or DEFAULT_KIND):
        base_data, base_origins = _without_data(base_data, base_origins)
    return _merge(base_data, data), {**base_origins, **origins}


def _data_kind(data: dict[str, Any]) -> Any:
    """``data.kind`` as written in ``data`` (None if it is not)."""
    section = data.get("data")
    return section.get("kind") if isinstance(section, dict) else None


def _without_data(data: dict[str, Any], origins: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` without its ``[data]`` section: the section's keys belong to another data kind. Changing
    ``data.kind`` (in a child manifest, an override or a ``--set``) starts the section afresh from the new kind's
    defaults, so that e.g. the embedded ``image_size = 128`` does not silently become COCO's short side."""
    kept = {k: w for k, w in origins.items() if k != "data" and not k.startswith("data.")}
    return {k: v for k, v in data.items() if k != "data"}, kept


def resolve_path(name: str | Path) -> Path:
    """A path, or the name of a shipped manifest (with or without ``.toml``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = MANIFEST_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.is_file():
        return shipped
    raise ManifestError(f"manifest {name} not found (shipped: {', '.join(shipped_manifests())})")


def load_manifest(
    name: str | Path,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    check_data: bool = True,
) -> Manifest:
    """Read, merge with its bases, apply ``overrides`` (a nested dict) and ``sets`` (``key=value`` texts, as
    ``--set`` gives them), check every key, type, range and cross-field rule (:func:`validate`). Any problem is
    a :class:`ManifestError` naming where the value came from (file or ``--set``), before any work.

    ``check_data=False`` leaves the data set's files (its root, annotation files, layout) and the models' weight
    files unread: for what needs the manifest but not the files (listing the shipped manifests, converting
    weights, tests of the shipped paper manifests). The models' ``num_classes``
    then comes from the data kind only where it is known without the files, else from the manifest."""
    path = resolve_path(name)
    data, origins = _read(path)
    layers = [(overrides, "an override")] if overrides else []
    layers += [(parse_override(text), f"--set {text}") for text in sets or []]
    kinds = [k for k in (_data_kind(layer) for layer, _ in layers) if k is not None]
    if kinds and kinds[-1] != (_data_kind(data) or DEFAULT_KIND):
        data, origins = _without_data(data, origins)  # the files' [data] is for another kind
    for layer, where in layers:
        data = _merge(data, layer)
        origins.update(_leaf_origins(layer, where))
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
    data_cfg, from_data = _data_section(data, origins, task_name, path.name, check_data)
    try:
        models = {}
        model_fields = {f.name for f in dataclasses.fields(model_cls)}
        for role in ("teacher", "student"):
            section = dict(data.pop(role, {}))
            for key, value in from_data.items():  # input sizes and classes follow the data
                if key in model_fields and section.setdefault(key, value) != value:
                    source = f"data.{key} = {value}" if key != "num_classes" else f"{value}, the classes of the data"
                    raise ManifestError(
                        f"{_where(origins, f'{role}.{key}', path.name)}: {role}.{key} = {section[key]} differs from "
                        f"{source} (data.kind = {data_cfg.kind!r})"
                    )
            models[role] = _build(model_cls, section, role, _where(origins, role, path.name), origins)
        manifest = _build(Manifest, data, "", path.name, origins)
        manifest = dataclasses.replace(
            manifest, source=str(path), method_configs=method_configs, data=data_cfg, **models
        )
        problems = validate(manifest, check_data)
    finally:
        _CHECKED.pop(_check_key(data_cfg, task_name), None)
    if problems:
        first = problems[0]
        raise ManifestError(first.message(_origin(origins, first.key, path.name)))
    return manifest


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    """Where ``key`` was set; a data key left at its default is blamed on what chose the data: the root for a
    path under it, else the kind."""
    if key.startswith("data.") and key not in origins:
        under_root = key.endswith(("_annotations", "_images"))
        for chosen in ("data.root", "data.kind") if under_root else ("data.kind", "data.root"):
            if chosen in origins:
                return origins[chosen]
    return _where(origins, key, default)


def _data_section(
    data: dict[str, Any], origins: dict[str, str], task: str, default: str, check_data: bool = True
) -> tuple[Any, dict]:
    """The ``[data]`` section (popped from ``data``) built as the config of its ``kind``, checked (the kind's
    files and layout) before anything else needs it; and what the model sections take from it (``image_size``,
    ``max_size``, and the kind's ``num_classes`` for data other than the embedded scenes)."""
    here = _where(origins, "data", default)
    section = data.pop("data", {})
    if not isinstance(section, dict):
        raise ManifestError(f"data must be a table in {here}, got {type(section).__name__}")
    section = dict(section)
    name = section.pop("kind", DEFAULT_KIND)
    allowed = kind_names(task)
    if name not in allowed:
        problem = Problem("data.kind", name, f"{', '.join(allowed)} (the data kinds for {task})")
        raise ManifestError(problem.message(_where(origins, "data.kind", default)))
    kind = get_kind(name)
    cfg = _build(kind.config, section, "data", here, origins)
    problems = range_problems(cfg, "data") + (kind.check(cfg, task) if check_data else [])
    if problems:
        raise ManifestError(problems[0].message(_origin(origins, problems[0].key, default)))
    _CHECKED[_check_key(cfg, task)] = []
    taken = {key: getattr(cfg, key) for key in ("image_size", "max_size", "multiscale_short") if hasattr(cfg, key)}
    if name != DEFAULT_KIND:
        try:
            taken["num_classes"] = kind.num_classes(cfg, task)
        except (OSError, ValueError, KeyError):
            if check_data:
                raise
    return cfg, taken


#: data checks already run by :func:`load_manifest`, consumed by its :func:`validate` (the checks read files)
_CHECKED: dict[str, list[Problem]] = {}


def _check_key(cfg, task: str) -> str:
    return digest([getattr(cfg, "kind", DEFAULT_KIND), task, dataclasses.asdict(cfg)])


def _data_problems(m: Manifest, check_data: bool = True) -> list[Problem]:
    """The data kind serves the task, the section's ranges, and the kind's own checks (files, layout, sizes)."""
    kind = kind_of(m.data)
    if m.task not in kind.tasks:
        return [Problem("data.kind", kind.name, f"{', '.join(kind_names(m.task))} (the data kinds for {m.task})")]
    checked = _CHECKED.pop(_check_key(m.data, m.task), None)
    if checked is not None:
        return checked
    return range_problems(m.data, "data") + (kind.check(m.data, m.task) if check_data else [])


# ------------------------------------------------------------------------------------------ validation
def validate(m: Manifest, check_data: bool = True) -> list[Problem]:
    """Every value ``m`` cannot run with, checked before any work: declared field ranges, then the cross-field
    rules of the manifest, its task and its methods (features the models have, channels, image sizes), and its
    data kind's checks of the data on disk (unless ``check_data`` is False)."""
    problems: list[Problem] = []
    for section in ("protocol", "teacher_train", "student_train", "tokens", "distill", "pretrain"):
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
    for section in ("teacher_train", "student_train", "tokens"):
        train = getattr(m, section)
        if train.batch_per_device > train.batch_size or (
            train.batch_per_device and train.batch_scaling == "accumulate" and train.batch_size % train.batch_per_device
        ):
            problems.append(
                Problem(
                    f"{section}.batch_per_device",
                    train.batch_per_device,
                    f"0 or a divisor of {section}.batch_size ({train.batch_size}) with batch_scaling = 'accumulate'",
                )
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
    if check_data:  # the weight files are read like the data's
        problems += _weights_problems(m)
    if m.distill.init_from_teacher and any(x != "baseline" for x in m.methods):
        problems += _inheritance_problems(m, task)
    data_problems = _data_problems(m, check_data)
    problems += data_problems
    sizes = kind_of(m.data).stride_keys(m.data) if not data_problems else {}
    for role in ("teacher", "student"):
        stride = task.input_stride(getattr(m, role))
        for key, value in sizes.items():
            if any(int(v) % stride for v in (value if isinstance(value, list | tuple) else [value])):
                problems.append(Problem(key, value, f"a multiple of {stride} (the {role} model's stride)"))
    # What only some data kinds offer (a test split, digit pretraining, a teacher-output cache) comes after the
    # data's own problems: a manifest moved to other data hears first what that data lacks.
    problems += _protocol_problems(m)
    problems += _pretrain_problems(m)
    if m.distill.teacher_cache:
        from .teacher_outputs import cache_problems

        problems += cache_problems(m)
    return problems


def _protocol_problems(m: Manifest) -> list[Problem]:
    problems = []
    protocol = m.protocol
    if protocol.eval_split == "test" and not kind_of(m.data).has_test_split(m.data):
        kind = getattr(m.data, "kind", DEFAULT_KIND)
        need = " (set data.num_test > 0)" if kind == DEFAULT_KIND else ""
        problems.append(Problem("protocol.eval_split", "test", f"'val': data.kind {kind!r} has no test split{need}"))
    if len(protocol.weight_grid) > 1:
        if 1.0 not in protocol.weight_grid:
            problems.append(Problem("protocol.weight_grid", protocol.weight_grid, "a list that holds 1.0"))
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


def _weights_problems(m: Manifest) -> list[Problem]:
    """Weight files (``teacher.weights``, ``student.backbone_weights``, ...) exist, load, and fit their model."""
    from .weights import check_weights

    out = []
    for role in ("teacher", "student"):
        cfg = getattr(m, role)
        for line in check_weights(cfg):
            field_name, _, why = line.partition(": ")
            out.append(
                Problem(f"{role}.{field_name}", getattr(cfg, field_name, ""), f"a file that fits the model; {why}")
            )
    return out


def _pretrain_problems(m: Manifest) -> list[Problem]:
    """``[pretrain]``, when enabled: embedded scenes, ResNet bodies, no weight file the pretrained body would
    overwrite or contradict, and a warm-up shorter than the run."""
    from .models import RESNET_LAYOUTS

    p = m.pretrain
    if not p.enabled:
        return []
    problems = []
    kind = getattr(m.data, "kind", DEFAULT_KIND)
    if kind != DEFAULT_KIND:
        why = "the digit pretraining stands in for ImageNet on the embedded scenes only; use backbone_weights"
        problems.append(Problem("pretrain.enabled", True, f"false with data.kind = {kind!r} ({why})"))
    if m.teacher.weights:
        why = "a teacher from a file is not trained, so it has no pretrained start"
        problems.append(Problem("teacher.weights", m.teacher.weights, f"'' while pretrain.enabled = true ({why})"))
    for role in ("teacher", "student"):
        cfg = getattr(m, role)
        if cfg.backbone_weights:
            why = "the pretrained digit body is the backbone's initialisation"
            problems.append(
                Problem(f"{role}.backbone_weights", cfg.backbone_weights, f"'' while pretrain.enabled = true ({why})")
            )
        if cfg.backbone not in RESNET_LAYOUTS:
            allowed = f"a ResNet ({', '.join(RESNET_LAYOUTS)}) while pretrain.enabled = true"
            problems.append(Problem(f"{role}.backbone", cfg.backbone, allowed))
    if p.warmup_iters >= p.iterations:
        problems.append(Problem("pretrain.warmup_iters", p.warmup_iters, f"< pretrain.iterations ({p.iterations})"))
    return problems


def _inheritance_problems(m: Manifest, task) -> list[Problem]:
    """Every ``distill.init_from_teacher`` prefix names tensors the teacher has and the student has too, of the
    same shapes (the teacher's neck and head copied into the student, as the official RetinaNet configs do)."""
    shapes = {role: _state_shapes(getattr(m, role), task) for role in ("teacher", "student")}
    for prefix in m.distill.init_from_teacher:
        keys = [k for k in shapes["teacher"] if k == prefix or k.startswith(prefix + ".")]
        if not keys:
            return [Problem("distill.init_from_teacher", prefix, "a prefix of the teacher's state-dict keys")]
        for key in keys:
            s, t = shapes["student"].get(key), shapes["teacher"][key]
            if s != t:
                have = "missing" if s is None else f"shape {list(s)}"
                return [
                    Problem(
                        "distill.init_from_teacher",
                        prefix,
                        f"tensors the student has in the teacher's shape ({key}: teacher {list(t)}, student {have})",
                    )
                ]
    return []


def _state_shapes(cfg, task) -> dict[str, tuple[int, ...]]:
    key = "shapes-" + digest(dataclasses.asdict(cfg))
    if key not in _SHAPES:
        _SHAPES[key] = {k: tuple(v.shape) for k, v in task.build_model(without_weight_files(cfg)).state_dict().items()}
    return _SHAPES[key]


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}
_BUILT: dict[str, frozenset[str]] = {}


def _module_names(cfg, task) -> frozenset[str]:
    """Names of the modules of the model ``cfg`` builds (built once per config on the CPU, then remembered)."""
    key = digest(dataclasses.asdict(cfg))
    if key not in _BUILT:
        _BUILT[key] = frozenset(name for name, _ in task.build_model(without_weight_files(cfg)).named_modules())
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
