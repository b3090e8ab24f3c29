"""How a training stage's batches are drawn and laid out: the data order, the split of a step over processes and
accumulation steps (:class:`Geometry`), and per-image augmentation seeds.

Data order is a function of the seed and the epoch alone (:func:`epoch_order`), whatever the number of processes:
optimizer step ``s`` consumes ``step_batch`` consecutive indices of its epoch's permutation, split into
micro-batches over the ``torchrun`` processes and the accumulation steps. A step's images are found by indexing the
permutation, so a resumed run never loads the images of the steps it skips; every image's random transforms run
under a seed of (run seed, step, image) (:class:`SeededItems`), so they do not depend on loader workers either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .runtime import Distributed, device, distributed


@dataclass(frozen=True)
class Geometry:
    """How one optimizer step's batch is laid out over processes and forwards.

    ``micro_batch`` images per forward on one device, ``accumulation`` forwards per step in each of the
    ``world_size`` processes, ``step_batch`` images per optimizer step in all (the effective batch), the base lr
    times ``lr_scale``, and whether the model's BatchNorm is a SyncBatchNorm (``sync_bn``)."""

    world_size: int
    micro_batch: int
    accumulation: int
    step_batch: int
    lr_scale: float
    sync_bn: bool
    sync_bn_note: str = ""  # why sync_bn was asked for and not applied

    @property
    def plain(self) -> bool:
        """One forward of the whole batch per step, as a single process without these options trains."""
        return self.micro_batch == self.step_batch and self.lr_scale == 1.0 and not self.sync_bn

    def hash_part(self) -> dict[str, Any] | None:
        """What changes the result besides the config (None when plain, so old hashes stand): the forward's batch
        (BatchNorm statistics, per-batch loss normalisations), the step's batch, the lr scale, BatchNorm's batch.
        The number of processes itself is not in it: with ``accumulate`` it changes only the order of float sums
        and which process's micro-batches BatchNorm's running statistics see, as a device change does."""
        if self.plain:
            return None
        bn_batch = self.micro_batch * (self.world_size if self.sync_bn else 1)
        return {
            "micro_batch": self.micro_batch,
            "step_batch": self.step_batch,
            "lr_scale": self.lr_scale,
            "bn_batch": bn_batch,
        }

    def tags(self) -> dict[str, str]:
        """What the run records of it (tags)."""
        sync = "applied" if self.sync_bn else (self.sync_bn_note or "off")
        return {
            "world_size": str(self.world_size),
            "accumulation": str(self.accumulation),
            "micro_batch": str(self.micro_batch),
            "effective_batch": str(self.step_batch),
            "lr_scale": f"{self.lr_scale:g}",
            "sync_bn": sync,
        }


def geometry(cfg, section: str, world: Distributed | None = None) -> Geometry:
    """The :class:`Geometry` of training config ``cfg`` (manifest section ``section``) in ``world`` (default:
    this job). Raises :class:`~.manifest.ManifestError` (one line, naming the keys and the process count) when
    the batch does not split."""
    from .manifest import ManifestError

    world = world or distributed()
    n = world.world_size
    batch = cfg.batch_size
    per_device = getattr(cfg, "batch_per_device", 0)
    scaling = getattr(cfg, "batch_scaling", "accumulate")
    if per_device == 0:
        if batch % n:
            raise ManifestError(
                f"{section}.batch_size = {batch} does not split over {n} processes; set {section}.batch_per_device"
            )
        per_device = batch // n
    if scaling == "linear_lr":
        step_batch, accumulation = per_device * n, 1
        lr_scale = step_batch / batch
    else:
        if batch % (per_device * n):
            raise ManifestError(
                f"{section}.batch_size = {batch} is not a multiple of {section}.batch_per_device ({per_device}) x "
                f"{n} process{'es' if n > 1 else ''} = {per_device * n} (batch_scaling = 'accumulate' runs "
                "batch_size / (batch_per_device x processes) forwards per optimizer step)"
            )
        step_batch, accumulation, lr_scale = batch, batch // (per_device * n), 1.0
    wanted = bool(getattr(cfg, "sync_bn", False))
    applied = wanted and n > 1 and world.device_type == "cuda"
    note = ""
    if wanted and not applied:
        note = "not applied: one process" if n == 1 else "not applied: torch's SyncBatchNorm runs on CUDA only"
    return Geometry(n, per_device, accumulation, step_batch, lr_scale, applied, note)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch ``epoch``: what a ``DataLoader(shuffle=True)`` with a generator seeded
    ``seed * 100_003 + epoch`` draws (it takes one int64 for its workers' base seed first, then ``randperm``),
    so runs keep the data order they had when the loop used such a loader."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's base seed, drawn before the order
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, step_batch: int) -> int:
    """Full steps per epoch (the partial last batch is dropped), or one step of all ``n`` images when the data
    set is smaller than a step's batch (today's ``drop_last = len(dataset) >= batch_size``)."""
    return n // step_batch if n >= step_batch else 1


class StepSampler:
    """The index lists of one process's forwards, optimizer step after step from ``start``, forever.

    Step ``s`` (epoch ``s // steps_per_epoch``) takes ``step_batch`` consecutive indices of its epoch's
    permutation and splits them into ``accumulation x world_size`` micro-batches; forward ``a`` of process ``r``
    gets micro-batch ``a * world_size + r``. The same micro-batches in one process with the same total batch
    (``accumulation`` x ``world_size`` forwards) are therefore the same images in the same groups."""

    def __init__(self, n: int, seed: int, geo: Geometry, rank: int, start: int) -> None:
        parts = geo.accumulation * geo.world_size
        if min(n, geo.step_batch) < parts:
            raise ValueError(f"a step of {min(n, geo.step_batch)} images cannot be split into {parts} micro-batches")
        self.n, self.seed, self.geo, self.rank, self.start = n, seed, geo, rank, start

    def __iter__(self) -> Iterator[list[int]]:
        geo = self.geo
        per_epoch = steps_per_epoch(self.n, geo.step_batch)
        step, order, order_epoch = self.start, None, -1
        while True:
            epoch, index = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            chunk = order[index * geo.step_batch : (index + 1) * geo.step_batch]
            micro = torch.tensor_split(chunk, geo.accumulation * geo.world_size)
            for a in range(geo.accumulation):
                part = micro[a * geo.world_size + self.rank].tolist()
                yield [(i, augmentation_seed(self.seed, step, i)) for i in part]
            step += 1


def augmentation_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of image ``index``'s random transforms at optimizer step ``step`` of a run seeded ``seed``:
    augmentation is a function of these alone, whatever the loader workers, the process count or a resume."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


class SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` under its own torch seed: items are ``(index, seed)`` keys (:class:`StepSampler`), and the
    item's random transforms (torchvision ``transforms.v2`` draw from torch's global RNG) run on a forked RNG
    seeded with ``seed``, so they neither depend on nor consume the process's RNG state."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def step_batches(dataset, collate, seed: int, geo: Geometry, start: int, workers: int = 0) -> Iterator[Any]:
    """This process's micro-batches from optimizer step ``start`` on (``geo.accumulation`` per step), loaded by
    ``workers`` loader processes (pinned memory on CUDA)."""
    sampler = StepSampler(len(dataset), seed, geo, distributed().rank, start)
    return iter(
        DataLoader(
            SeededItems(dataset),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=device().type == "cuda",
            generator=torch.Generator(),  # the loader's base-seed draw must not consume the global RNG
        )
    )


def infinite_batches(dataset, batch_size: int, collate, seed: int) -> Iterator[Any]:
    """Shuffled batches forever, one process: the order :func:`step_batches` gives a plain single-device run."""
    geo = Geometry(1, batch_size, 1, batch_size, 1.0, False)
    sampler = StepSampler(len(dataset), seed, geo, 0, 0)
    return iter(
        DataLoader(SeededItems(dataset), batch_sampler=sampler, collate_fn=collate, generator=torch.Generator())
    )
