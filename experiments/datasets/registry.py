"""The registry of data kinds: where a manifest's ``[data]`` comes from.

A data kind is one module in this package that registers a :class:`DataKind`: its ``[data]`` section (a frozen
dataclass whose fields carry their ranges, :func:`experiments.engine.fields.knob`; ``kind`` itself is not a field),
the tasks it serves, the checks that can run before any work, the model's ``num_classes`` and the data sets. A
manifest selects one with ``data.kind`` (default ``"embedded"``, the generated MNIST scenes); the loader, the tasks
and the tables ask this registry, so nothing else lists kinds.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ..engine.fields import Problem

DEFAULT_KIND = "embedded"


class DataKind:
    """Base of a data-kind plug-in; subclasses set the class attributes and implement the methods."""

    name: str = ""
    #: frozen dataclass: the keys allowed in ``[data]`` besides ``kind`` (it gets ``kind`` as a class attribute)
    config: type = object
    #: the tasks whose data sets this kind can make
    tasks: frozenset[str] = frozenset()
    #: True where samples are augmented at random (real data): a cached feature of an image is then not reusable
    random_transforms: bool = True
    #: images per evaluation batch (real images differ in size; the official recipes evaluate one at a time)
    eval_batch_size: int = 1

    def check(self, cfg, task: str) -> list[Problem]:
        """Everything checkable before any work (files, layout, sizes), one :class:`Problem` per finding."""
        return []

    def num_classes(self, cfg, task: str) -> int:
        """The model's ``num_classes``: detection = categories + 1 (column 0 unused, labels 1..K), segmentation =
        classes (label 255 ignored)."""
        raise NotImplementedError

    def datasets(self, cfg, task: str) -> tuple[Any, Any, Any]:
        """``(train set, val set, ground truth for the task's evaluation)``."""
        raise NotImplementedError

    def has_test_split(self, cfg) -> bool:
        """Whether :meth:`test_set` gives a split (checked with the manifest, before any data are made)."""
        return False

    def test_set(self, cfg, task: str) -> tuple[Any, Any] | None:
        """``(test set, ground truth)`` of a held-out test split, or None where the kind has none (real data:
        the val split is what the papers report)."""
        return None

    def stride_keys(self, cfg) -> dict[str, int]:
        """``data.<key>: size`` of every input size that must be a multiple of the model's input stride."""
        return {}

    def describe(self, cfg) -> str:
        """One line for a table's protocol: what the images are."""
        return f"{self.name} data at {getattr(cfg, 'root', '')}"


_KINDS: dict[str, DataKind] = {}
_LOADED = False


def register(kind: DataKind) -> DataKind:
    """Add ``kind`` (a second registration of a name replaces the first); its config learns its kind's name."""
    if not kind.name.isidentifier():
        raise ValueError(f"data kind name {kind.name!r} is not an identifier")
    kind.config.kind = kind.name
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that add a toy kind clean up with this)."""
    _KINDS.pop(name, None)


def kinds() -> dict[str, DataKind]:
    """Every registered data kind, by name."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name != "registry" and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
    return dict(_KINDS)


def kind_names(task: str | None = None) -> list[str]:
    """Names of the registered kinds (those serving ``task`` if given), the default first."""
    names = [n for n, k in kinds().items() if task is None or task in k.tasks]
    return sorted(names, key=lambda n: (n != DEFAULT_KIND, n))


def get_kind(name: str) -> DataKind:
    known = kinds()
    if name not in known:
        raise KeyError(f"unknown data kind {name!r}; registered: {', '.join(kind_names())}")
    return known[name]


def kind_of(cfg) -> DataKind:
    """The kind whose config ``cfg`` is."""
    return get_kind(getattr(cfg, "kind", DEFAULT_KIND))
