"""Several processes under ``torchrun``: rank 0 leads, the other processes follow.

``torchrun --nproc-per-node N -m experiments.cli run MANIFEST ...`` starts N copies of the command. Rank 0 runs the
command as one process would: MLflow, reuse by hash, claims, resume decisions, checkpoints, evaluation and the
report are its alone. Whenever a stage trains, rank 0 first sends the other ranks (the followers) a :class:`Job`
with :func:`broadcast_object_list`: which stage function, its arguments (manifest, method, seed, the teacher's and
tokens' weights) and the resume checkpoint to start from, so they take the same decisions without reading MLflow.
Followers run only the training loop of each job (``evaluate=False``), in DistributedDataParallel with rank 0, and
wait for the next job while rank 0 evaluates and writes; a final ``None`` job ends them.

The process group is nccl on CUDA (``cuda:LOCAL_RANK``) and gloo on the CPU; jobs travel through a gloo group
either way. Its timeout is long (``$MASKD_BENCH_DIST_TIMEOUT`` seconds, default 24 h): followers wait through
rank 0's evaluations and claim waits. A failure inside a job on rank 0 that the followers did not share ends rank
0's process, and torchrun then stops the followers; a non-finite loss is seen by every process at the same step,
so rank 0 records it and ends the followers itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .runtime import Distributed, Runtime, distributed, set_distributed, use_runtime

TIMEOUT_ENV_VAR = "MASKD_BENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 24 * 3600.0


@dataclass
class Job:
    """One training stage for the followers: ``stage`` is a function of :mod:`.stages` called with ``kwargs``
    (without the logger and progress), ``every`` and ``state`` its :class:`~.training.Resume`."""

    stage: str
    kwargs: dict[str, Any]
    every: int
    state: dict[str, Any] | None


_FOLLOWERS_LISTENING = False  # rank 0: the followers wait for jobs (they passed the checks rank 0 passed)
_FOLLOWERS_BUSY = False  # rank 0: the followers are inside a job (a failure there leaves them in a collective)


def launched() -> bool:
    """True when torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV_VAR)
    return float(value) if value else DEFAULT_TIMEOUT_S


def start(device: str) -> tuple[Distributed, str]:
    """Join torchrun's process group; returns this process's place and its device (``cuda:LOCAL_RANK`` when
    ``device`` is a CUDA device, else ``cpu``)."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = timedelta(seconds=timeout_s())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    place = Distributed(rank, world, local, "cuda" if cuda else "cpu")
    set_distributed(place, control)
    return place, device


def _broadcast(job: Job | None) -> Job | None:
    from .runtime import control_group

    box = [job]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def followers_listening() -> None:
    """Rank 0: the followers are waiting for jobs now (so :func:`finish` must release them)."""
    global _FOLLOWERS_LISTENING
    _FOLLOWERS_LISTENING = distributed().active


@contextmanager
def leading(stage: str, kwargs: dict[str, Any], resume) -> Iterator[None]:
    """Rank 0 around a training stage: send the followers the job first. A non-finite loss stops every process
    at the same step, so the followers are back waiting when it propagates; any other failure leaves them inside
    the job (torchrun stops them when this process ends)."""
    global _FOLLOWERS_BUSY
    if not distributed().active:
        yield
        return
    from .training import NonFiniteLoss

    _broadcast(Job(stage, kwargs, resume.every, resume.state))
    _FOLLOWERS_BUSY = True
    try:
        yield
    except NonFiniteLoss:
        _FOLLOWERS_BUSY = False
        raise
    _FOLLOWERS_BUSY = False


def follow(runtime: Runtime) -> int:
    """A follower's life: run each job's training loop until rank 0 sends ``None``. Returns the exit code."""
    from . import stages
    from .training import NonFiniteLoss, Resume

    with use_runtime(runtime):
        while True:
            job = _broadcast(None)
            if job is None:
                return 0
            fn = getattr(stages, job.stage)
            try:
                fn(**job.kwargs, log=_no_log, progress=False, resume=Resume(job.every, job.state), evaluate=False)
            except NonFiniteLoss:  # rank 0 saw it at the same step and records it; wait for its next word
                continue


def finish() -> None:
    """Rank 0, at the end of the command: release the followers (unless a failure left them inside a job,
    where torchrun stops them), then leave the process group."""
    global _FOLLOWERS_LISTENING
    place = distributed()
    if not place.active:
        return
    if place.main and _FOLLOWERS_LISTENING and not _FOLLOWERS_BUSY:
        _broadcast(None)
    _FOLLOWERS_LISTENING = False
    if not _FOLLOWERS_BUSY:
        dist.destroy_process_group()
    set_distributed(Distributed())


def _no_log(values: dict[str, float], step: int) -> None:
    pass


def refuse(command: str) -> str | None:
    """Why ``command`` cannot run under torchrun with several processes, or None."""
    if command != "run":
        return f"only `maskd-bench run` runs under torchrun with several processes, not `{command}`"
    return None


__all__ = ["Job", "finish", "follow", "launched", "leading", "refuse", "start"]
