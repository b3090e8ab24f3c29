"""Where stages run: the device and precision (:class:`Runtime`), moving batches there and checkpoints back.

Checkpoints and metrics always come back on the CPU, so a run on ``cuda`` is reused by a run on ``cpu``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class RuntimeConfigError(ValueError):
    """A device or precision this machine cannot run; raised before any work."""


@dataclass(frozen=True)
class Runtime:
    """Where the stages run: ``device`` (``cpu``, ``cuda``, ``cuda:1``) and ``amp`` (``none`` or ``bf16``: the
    forward passes and losses under ``torch.autocast`` in bfloat16, optimizer and checkpoints in float32).
    Checkpoints and metrics come back on the CPU whatever the device."""

    device: str = "cpu"
    amp: str = "none"

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16"):
            raise RuntimeConfigError(f"amp = {self.amp!r}; allowed: 'none', 'bf16'")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeConfigError(f"device = {self.device!r} but CUDA is not available on this machine")
        if kind not in ("cpu", "cuda"):
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N")

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.amp == "bf16")


_RUNTIME: ContextVar[Runtime | None] = ContextVar("maskd_bench_runtime", default=None)
_CPU = Runtime()


@contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Run the stages called inside on ``runtime.device`` (with ``runtime.amp``)."""
    token = _RUNTIME.set(runtime)
    try:
        yield runtime
    finally:
        _RUNTIME.reset(token)


def current_runtime() -> Runtime:
    return _RUNTIME.get() or _CPU


def device() -> torch.device:
    return torch.device(current_runtime().device)


def to_device(obj: Any) -> Any:
    """Tensors (also inside lists, tuples and dicts, e.g. detection targets) moved to the current device."""
    if isinstance(obj, Tensor):
        return obj.to(device(), non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v) for v in obj)
    return obj


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def synchronize() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize(device())


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
