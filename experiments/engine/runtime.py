"""Where stages run: the device and precision (:class:`Runtime`), the processes of a ``torchrun`` job
(:class:`Distributed`), moving batches there and checkpoints back.

Checkpoints and metrics always come back on the CPU, so a stage's outputs look the same wherever it ran; its
hash still tells CPU runs (with their torch thread count) from CUDA runs, whose numbers differ
(:func:`experiments.engine.pipeline.with_runtime`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

AMP_MODES = ("none", "bf16", "fp16")


class RuntimeConfigError(ValueError):
    """A device or precision this machine cannot run; raised before any work."""


@dataclass(frozen=True)
class Runtime:
    """Where the stages run: ``device`` (``cpu``, ``cuda``, ``cuda:1``) and ``amp``: ``none``, ``bf16`` (the
    forward passes and losses under ``torch.autocast`` in bfloat16) or ``fp16`` (autocast in float16 with a
    ``GradScaler``, whose skipped steps on overflowing gradients are expected); optimizer and checkpoints stay
    float32. Checkpoints and metrics come back on the CPU whatever the device."""

    device: str = "cpu"
    amp: str = "none"

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise RuntimeConfigError(f"amp = {self.amp!r}; allowed: {', '.join(map(repr, AMP_MODES))}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeConfigError(f"device = {self.device!r} but CUDA is not available on this machine")
        if kind not in ("cpu", "cuda"):
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N")

    def autocast(self):
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=self.amp != "none")

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler (a no-op pass-through for ``none`` and ``bf16``, whose range needs none)."""
        return torch.amp.GradScaler(torch.device(self.device).type, enabled=self.amp == "fp16")


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


# ------------------------------------------------------------------------------------------ torchrun processes
@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    host (its GPU), ``device_type`` of the job. A single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_DISTRIBUTED = Distributed()
_CONTROL: Any = None  # the process group of object messages (gloo, also beside nccl); None: the default group


def set_distributed(value: Distributed, control: Any = None) -> None:
    """Set by :mod:`.distributed` once the process group exists (and back to one process when it ends)."""
    global _DISTRIBUTED, _CONTROL
    _DISTRIBUTED, _CONTROL = value, control


def distributed() -> Distributed:
    return _DISTRIBUTED


def control_group() -> Any:
    return _CONTROL


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true in any process of the job (every process must call it at the same point)."""
    if not _DISTRIBUTED.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_processes(values: Tensor) -> Tensor:
    """``values`` averaged over the processes of the job (every process must call it at the same point)."""
    if not _DISTRIBUTED.active:
        return values
    values = values.to(device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / _DISTRIBUTED.world_size


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on rank 0 (None elsewhere); just ``[obj]`` in one process."""
    if not _DISTRIBUTED.active:
        return [obj]
    out = [None] * _DISTRIBUTED.world_size if _DISTRIBUTED.main else None
    dist.gather_object(obj, out, dst=0, group=_CONTROL)
    return out
