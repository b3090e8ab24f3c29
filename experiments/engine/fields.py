"""Config fields that carry their own allowed range, checked when a manifest is loaded.

A manifest section (or a method's config) is a frozen dataclass; a field declared with :func:`knob` states next to
its default what values are allowed::

    lr: float = knob(0.01, gt=0)            # > 0 and finite
    iterations: int = knob(600, ge=1)
    dice_weight: float = knob(1.0, ge=0)

:func:`range_problems` lists every field of a section whose value is outside its range, so that the loader can
refuse the manifest before any stage runs, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_META = "maskd_bench_range"


@dataclass(frozen=True)
class Range:
    """Allowed values of a number (or of each number in a list): bounds, finiteness, and a divisor."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    multiple_of: int | None = None
    nonempty: bool = False  # lists: at least one element
    unique: bool = False  # lists: no repeated element

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.finite and not parts:
            parts.append("finite")
        elif self.finite:
            parts.append("finite")
        if self.nonempty:
            parts.append("non-empty")
        if self.unique:
            parts.append("without repeats")
        return ", ".join(parts)

    def violation(self, value: Any) -> str | None:
        """None if ``value`` is allowed, else what is wrong with it."""
        if isinstance(value, list | tuple):
            if self.nonempty and not value:
                return "empty"
            if self.unique and len(set(value)) != len(value):
                repeated = sorted({v for v in value if list(value).count(v) > 1})
                return f"repeats {repeated}"
            for item in value:
                if isinstance(item, int | float) and not isinstance(item, bool):
                    bad = self.violation(item)
                    if bad:
                        return f"has {item!r}"
            return None
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if self.finite and not math.isfinite(value):
            return "not finite"
        if math.isnan(value):
            return "not a number"
        if self.gt is not None and not value > self.gt:
            return "too small"
        if self.ge is not None and not value >= self.ge:
            return "too small"
        if self.lt is not None and not value < self.lt:
            return "too large"
        if self.le is not None and not value <= self.le:
            return "too large"
        if self.multiple_of and int(value) % self.multiple_of:
            return "not a multiple"
        return None


def knob(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field with an allowed range (keywords of :class:`Range`)."""
    meta = {_META: Range(**bounds)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(_META)


@dataclass(frozen=True)
class Problem:
    """One value a manifest cannot run with: ``key`` (``section.field``), the value and what is allowed."""

    key: str
    value: Any
    allowed: str

    def message(self, origin: str) -> str:
        return f"{origin}: {self.key} = {self.value!r} is not allowed; allowed: {self.allowed}"


def range_problems(section: Any, prefix: str) -> list[Problem]:
    """Every field of the dataclass ``section`` outside its declared range (nested sections included)."""
    out: list[Problem] = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            out += range_problems(value, key)
            continue
        rng = field_range(f)
        if rng is not None and rng.violation(value) is not None:
            out.append(Problem(key, value, rng.describe()))
        elif isinstance(value, float) and not math.isfinite(value) and (rng is None or rng.finite):
            out.append(Problem(key, value, "a finite number"))
    return out
