"""The registry of distillation methods: every part of the suite learns what methods exist from here.

A method is one module in this package that calls :func:`register` with a :class:`MethodSpec`: its manifest
section (a frozen dataclass whose fields carry their allowed ranges, :func:`experiments.engine.fields.knob`), the
knob that scales its loss (calibration and tuning), the tasks it applies to, its checks against a manifest, and
``build``, which makes the trainable (or frozen) extra modules and the loss for one student run. Manifests,
``--methods`` choices, the stage hashes, calibration, ablations and the tables all read :func:`methods`; a method
that is registered appears everywhere, one that is not appears nowhere.

Methods outside this package are found through the entry-point group ``maskd_bench.methods`` or the environment
variable ``MASKD_BENCH_PLUGINS`` (module names or ``.py`` paths, separated by ``os.pathsep``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..engine.fields import Problem

if TYPE_CHECKING:
    from ..engine.manifest import Manifest

PLUGIN_ENV_VAR = "MASKD_BENCH_PLUGINS"
ENTRY_POINT_GROUP = "maskd_bench.methods"


@dataclass
class DistillContext:
    """What ``build`` gets to make one run's distillation modules."""

    manifest: Manifest
    method: str
    config: Any  # the method's manifest section
    features: list[str]  # distilled feature names, in order
    student_channels: list[int]
    teacher_channels: list[int]
    token_state: dict[str, Tensor] | None  # stage-1 tokens, for methods that use them
    seed: int  # the student's seed: methods that draw at random seed their own generator from it


@dataclass
class DistillBatch:
    """What a method's loss sees of one training step besides the features."""

    step: int
    extras: Any  # the task's per-batch extras (detection: targets, image sizes, padded shape); None otherwise


class Distillation(nn.Module):
    """One run's distillation: extra modules (align convs, generation blocks, frozen tokens) and the loss.

    ``forward`` returns the loss as named terms, already weighted, whose sum is the distillation loss: one term
    per level (``P3``, ``logits``) or per part (FGD's ``P3/fg``); the training loop logs each, and the
    non-finite guard names the one that broke."""

    def forward(self, student: list[Tensor], teacher: list[Tensor], batch: DistillBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def token_masks_module(self) -> nn.Module | None:
        """A module with ``mask_modules`` (receptive tokens) whose masks are worth a figure, or None."""
        return None


@dataclass(frozen=True)
class MethodSpec:
    name: str  # manifest section, ``--methods`` choice, ``method`` tag
    title: str  # what tables call it
    order: int  # place in tables (teacher and baseline come first)
    config: type  # frozen dataclass: the manifest section; must have a ``features: list[str]`` field
    weight_knob: str  # the config field that scales the loss (calibration, tuning grids)
    build: Callable[[DistillContext], Distillation]
    summary: str = ""  # one line for ``maskd-bench methods``
    tasks: tuple[str, ...] = ("detection", "segmentation")
    needs: frozenset[str] = frozenset()  # task capabilities, e.g. {"boxes"}
    #: True if student and teacher features must have the same channels (no align conv in this setting)
    equal_channels: Callable[[Manifest], bool] = lambda m: False
    #: True if the method needs the stage-1 receptive tokens of this manifest
    uses_tokens: Callable[[Manifest], bool] = lambda m: False
    #: cross-field rules on a manifest (ranges of single fields are declared on the config's fields)
    checks: Callable[[Manifest], list[Problem]] = lambda m: []
    #: extra inputs of the student's config hash besides the config section (e.g. the tokens' hash)
    hash_inputs: Callable[[Manifest], dict[str, Any]] = lambda m: {}
    official: str = ""  # the official loss weight and its source, for the docs

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.config)}
        for required in ("features", self.weight_knob):
            if required not in names:
                raise TypeError(f"method {self.name!r}: its config {self.config.__name__} lacks a {required!r} field")


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False
RESERVED = ("teacher", "baseline")


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec``; a second registration of the same name replaces the first (reloading a plug-in)."""
    if spec.name in RESERVED or not spec.name.isidentifier():
        raise ValueError(f"method name {spec.name!r} is reserved or not an identifier")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests that add a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if info.name != "registry":
            importlib.import_module(f"{__package__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for item in filter(None, os.environ.get(PLUGIN_ENV_VAR, "").split(os.pathsep)):
        load_plugin(item)


def load_plugin(item: str) -> None:
    """Import a plug-in given as a module name or a ``.py`` path (it registers itself)."""
    if item.endswith(".py"):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{PLUGIN_ENV_VAR}: plug-in file {item} not found")
        name = f"maskd_bench_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(item)


def methods() -> dict[str, MethodSpec]:
    """Every registered method, in table order."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def method_names() -> list[str]:
    return list(methods())


def get(name: str) -> MethodSpec:
    specs = methods()
    if name not in specs:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(specs)}")
    return specs[name]


def table_order() -> list[str]:
    """Rows of a table: the teacher, the baseline student, then every method."""
    return ["teacher", "baseline", *methods()]


def per_level(names: list[str], values: list[Tensor], weight: float = 1.0) -> dict[str, Tensor]:
    """Named per-level terms ``{feature name: weight * value}``."""
    return {name: weight * value for name, value in zip(names, values, strict=True)}


def unique_feature_names(names: list[str]) -> list[str]:
    return names if len(set(names)) == len(names) else [f"{n}#{i}" for i, n in enumerate(names)]
