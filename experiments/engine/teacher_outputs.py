"""The frozen teacher's distilled features of every training image, computed once and served by image index.

Why: a distilled student's step runs the frozen teacher on its batch (:func:`~.distill.distillation_terms`), so
every step of every method and seed recomputes the same teacher features. Where they are a pure function of the
image, they can be computed once per (teacher weights, features, data, how the teacher's input is made) and looked
up; ``distill.teacher_cache = true`` does that, and a student trained with it ends bitwise equal to one without.

When it is valid (:func:`cache_problems` refuses the rest when the manifest is loaded):

* the data kind has no random transforms (``DataKind.random_transforms``; the embedded scenes have none), so
  image ``i`` is the same tensor at every step;
* the teacher's input does not change from step to step: detection's teacher reads the student's transformed
  batch (:meth:`~experiments.tasks.detection.Detection.teacher_input`), which is random with multi-scale training
  (``student.multiscale_short``), so that is refused; the fill builds that input the same way, by a throwaway
  student's training forward (its transform does not depend on its weights);
* a micro-batch holds one image's features independently of the other images in it. BatchNorm is in eval mode in
  the frozen teacher, so that holds mathematically; bitwise, measured on the CPU (torch 2.x, 1 and 2 threads, both
  embedded tasks), an image's features are identical whichever images share its batch and in whatever position,
  but differ with the batch *size* (batch 1 vs 8: up to 1.3e-5 on the FPN levels, 3e-7 on the logits; the kernels
  block differently). The cache is therefore filled in batches of the training micro-batch size (the last one
  padded with repeats), and the cached path equals the live one bitwise (``tests/test_teacher_outputs.py``).
  Where micro-batches of one run differ in size (a data set smaller than one step's batch) those differ by such
  last-bit amounts.

The key (:func:`outputs_key`) is a digest of the teacher's weights (the loaded state itself, so any checkpoint
differs) and model config, the feature names, the data section, the task and (where the teacher reads the
student's batch) the student's config, the micro-batch size, the torch threads, device, precision and torch
version. The file is ``cache_root()/teacher_outputs/<key>.pt`` (one tensor [num_train, ...] per feature), written
atomically under a claim lock so that concurrent runs compute it once. Which images a forward holds is not passed
through the training loop: :class:`StepImages` replays the loop's own :class:`~.batches.StepSampler` (the data
order is a function of the seed, the step and the geometry alone), and checks the count against each batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..datasets import DEFAULT_KIND, kind_of
from ..tasks import get_task
from ..tasks.registry import Task
from . import checkpoints as ckpt
from .batches import Geometry, StepSampler, geometry
from .fields import Problem
from .locks import claim_timeout, file_lock
from .models import hash_spec, without_weight_files
from .paths import cache_root
from .runtime import current_runtime, device, distributed, to_device
from .tokens import teacher_features

FORMAT = 1
#: This module, relative to the source root: part of the cache key with the teacher stage's code.
CODE = "experiments/engine/teacher_outputs.py"


def cache_problems(m) -> list[Problem]:
    """Why ``distill.teacher_cache = true`` cannot hold for manifest ``m`` (empty when it can)."""
    if not m.distill.teacher_cache:
        return []
    kind = kind_of(m.data)
    if kind.random_transforms:
        why = f"false with data.kind = {kind.name!r} (its images are augmented at random, so the teacher's output "
        return [Problem("distill.teacher_cache", True, why + "differs from step to step)")]
    multiscale = tuple(getattr(m.student, "multiscale_short", ()) or ())
    if multiscale and _reads_student_batch(get_task(m.task)):
        why = f"false with student.multiscale_short = {list(multiscale)} (the teacher reads the student's batch, "
        return [Problem("distill.teacher_cache", True, why + "resized to a size drawn at random every step)")]
    return []


def _reads_student_batch(task: Task) -> bool:
    """Whether the task's teacher reads something of the student's forward (detection: its transformed batch)."""
    return type(task).teacher_input is not Task.teacher_input


# ------------------------------------------------------------------------------------------ key, fill, load
def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def outputs_key(manifest, teacher: nn.Module, names: list[str], micro_batch: int) -> str:
    from ..cpu_isa import cpu_kernels
    from .fingerprint import code_fingerprint, files_fingerprint
    from .manifest import digest

    task = get_task(manifest.task)
    runtime = current_runtime()
    data = dataclasses.asdict(manifest.data)
    spec = {
        "format": FORMAT,
        "task": manifest.task,
        "teacher_state": state_digest(teacher),
        "teacher": hash_spec(manifest.teacher),
        "features": sorted(set(names)),
        "data": {"kind": getattr(manifest.data, "kind", DEFAULT_KIND), **data},
        "micro_batch": micro_batch,
        "threads": torch.get_num_threads(),
        "device": device().type,
        "amp": runtime.amp,
        "torch": torch.__version__,
        "cpu_kernels": cpu_kernels(),
        # the code that computes the features: the teacher's stage (model, data, task) and this module
        "code": [code_fingerprint("teacher", manifest.task), files_fingerprint([CODE])[0]],
    }
    if _reads_student_batch(task):
        spec["student"] = hash_spec(manifest.student)
    return digest(spec)


@torch.no_grad()
def compute_outputs(manifest, teacher: nn.Module, names: list[str], batch_size: int, progress: bool = True):
    """``{name: [num_train, ...]}``: the teacher's features ``names`` of every training image, in batches of
    ``batch_size`` images (the last padded with repeats) built as a training step builds the teacher's input.
    The process's random state is left as it was (a throwaway student is built and run)."""
    task = get_task(manifest.task)
    names = sorted(set(names))
    with torch.random.fork_rng(devices=[]):  # model init and the detector transform's draws stay out of the run
        train_set, _, _ = task.datasets(manifest)
        n = len(train_set)
        student = None
        if _reads_student_batch(task):
            student = task.build_model(without_weight_files(manifest.student)).to(device()).train()
        out: dict[str, Tensor] = {}
        starts = range(0, n, batch_size)
        for begin in tqdm(starts, desc="teacher outputs", disable=not progress, leave=False, dynamic_ncols=True):
            indices = list(range(begin, min(begin + batch_size, n)))
            real = len(indices)
            indices += [indices[0]] * (batch_size - real)
            images, targets = to_device(task.collate([train_set[i] for i in indices]))
            with current_runtime().autocast():
                extras = task.forward(student, images, targets)[2] if student is not None else None
                feats = teacher_features(manifest, teacher, task.teacher_input(images, extras), names)
            for name, feat in zip(names, feats, strict=True):
                if name not in out:
                    out[name] = torch.empty((n, *feat.shape[1:]), dtype=feat.dtype)
                out[name][begin : begin + real] = feat[:real].cpu()
    return out


@dataclass
class TeacherOutputs:
    """The cached features (``{name: [num_train, ...]}``, CPU), their file, and whether this call computed them
    (and in how many seconds)."""

    key: str
    path: Path
    features: dict[str, Tensor]
    computed: bool
    seconds: float


def load_or_compute(
    manifest, teacher: nn.Module, names: list[str], micro_batch: int, progress: bool = True
) -> TeacherOutputs:
    """The teacher outputs of ``manifest``'s training images from the cache, computed (once, under a claim lock
    shared by concurrent runs) when absent; a file that fails its sha256 or does not fit is recomputed."""
    key = outputs_key(manifest, teacher, names, micro_batch)
    path = cache_root() / "teacher_outputs" / f"{key}.pt"
    lock = cache_root() / "claims" / f"teacher_outputs-{key}.lock"
    wanted = sorted(set(names))
    with file_lock(lock, timeout=claim_timeout(), waiting="waiting: teacher outputs are computed by another process"):
        if path.is_file():
            start = time.perf_counter()
            try:
                features = ckpt.load_checked(path)
                n = len(get_task(manifest.task).datasets(manifest)[0])
                if sorted(features) != wanted or any(f.shape[0] != n for f in features.values()):
                    raise ckpt.CheckpointError(f"{path}: holds {sorted(features)} for another data set")
                return TeacherOutputs(key, path, features, False, time.perf_counter() - start)
            except ckpt.CheckpointError as exc:
                ckpt.remove(path)
                print(f"cache: deleted {exc}; computing the teacher outputs again", file=sys.stderr, flush=True)
        start = time.perf_counter()
        features = compute_outputs(manifest, teacher, names, micro_batch, progress)
        ckpt.save_atomic(features, path)
        seconds = time.perf_counter() - start
    size = os.path.getsize(path) / 2**20
    n = next(iter(features.values())).shape[0]
    print(f"teacher outputs: {n} images in {seconds:.1f} s -> {path} ({size:.1f} MiB)", file=sys.stderr, flush=True)
    return TeacherOutputs(key, path, features, True, seconds)


# ------------------------------------------------------------------------------------------ serving
class StepImages:
    """The training-set indices of each forward's images, as the training loop draws them: step ``s``'s forwards
    are the first ``accumulation`` index lists of a :class:`~.batches.StepSampler` started at ``s``, the sampler
    the loop's loader uses (same data set size, seed, geometry and rank). Call once per forward, in order."""

    def __init__(self, n: int, seed: int, geo: Geometry, rank: int) -> None:
        self.n, self.seed, self.geo, self.rank = n, seed, geo, rank
        self._step: int | None = None
        self._forwards: Iterator[list[tuple[int, int]]] = iter(())
        self._calls = 0

    def __call__(self, step: int) -> list[int]:
        if step != self._step:
            self._forwards = iter(StepSampler(self.n, self.seed, self.geo, self.rank, step))
            self._step, self._calls = step, 0
        self._calls += 1
        if self._calls > self.geo.accumulation:
            raise RuntimeError(f"step {step}: more than {self.geo.accumulation} forwards asked for teacher outputs")
        return [index for index, _ in next(self._forwards)]


class CachedTeacher:
    """``cached(images, step)``: the teacher features (in ``names`` order, on the device) of the forward's
    images, looked up instead of computed."""

    def __init__(self, outputs: TeacherOutputs, names: list[str], images: StepImages) -> None:
        self.outputs = outputs
        self.features = [outputs.features[name] for name in names]
        self.images = images

    def __call__(self, images, step: int) -> list[Tensor]:
        indices = self.images(step)
        if len(indices) != len(images):
            raise RuntimeError(f"step {step}: {len(images)} images in the batch, {len(indices)} indices replayed")
        index = torch.tensor(indices)
        return [f.index_select(0, index).to(device(), non_blocking=True) for f in self.features]


def cached_teacher(manifest, teacher: nn.Module, names: list[str], seed: int, progress: bool = True) -> CachedTeacher:
    """The teacher outputs of a student run with seed ``seed`` (``student_train``'s geometry in this job)."""
    geo = geometry(manifest.student_train, "student_train")
    outputs = load_or_compute(manifest, teacher, names, geo.micro_batch, progress)
    n = next(iter(outputs.features.values())).shape[0]
    return CachedTeacher(outputs, names, StepImages(n, seed, geo, distributed().rank))


__all__ = [
    "CachedTeacher",
    "StepImages",
    "TeacherOutputs",
    "cache_problems",
    "cached_teacher",
    "compute_outputs",
    "load_or_compute",
    "outputs_key",
    "state_digest",
]
