"""Stage 2: a student trained with a distillation method, wired from the method registry.

The student and the frozen teacher run on the same batch; the method's :class:`Distillation` (its extra
modules and loss, built by its plug-in) turns the declared student and teacher features into named loss terms,
which the training loop adds to the task loss as ``loss/kd_<method>/<term>``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..methods import Distillation, DistillBatch, DistillContext, get
from ..tasks import get_task
from .models import count_parameters
from .pretrain import load_pretrained
from .runtime import cpu_state, device, seed_everything
from .teacher_outputs import cached_teacher
from .tokens import example_masks, teacher_features
from .training import (
    MetricLogger,
    Resume,
    StageResult,
    evaluate_model,
    freeze,
    load_model,
    train_loop,
    train_model,
)


def inherit_from_teacher(student, teacher_state: dict[str, Tensor] | None, prefixes: list[str]) -> int:
    """Copy the teacher's tensors under ``prefixes`` (e.g. ``backbone.fpn``, ``head``) into ``student``; returns
    how many. The keys and shapes are checked before any work (``inheritance_problems``); a mismatch here is a
    bug, so it raises."""
    if not prefixes or teacher_state is None:
        return 0
    chosen = {k: v for k, v in teacher_state.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    missing, _ = student.load_state_dict(chosen, strict=False)
    own = set(student.state_dict())
    unknown = [k for k in chosen if k not in own]
    if unknown or not chosen:
        raise ValueError(f"distill.init_from_teacher = {prefixes}: teacher keys {unknown[:3]} are not in the student")
    return len(chosen)


def build_distillation(manifest, method: str, token_state: dict[str, Tensor] | None, seed: int = 0) -> Distillation:
    """The method's modules for one run (on the current device)."""
    spec = get(method)
    task = get_task(manifest.task)
    names = manifest.features_for(method)
    s_info, t_info = task.features(manifest.student), task.features(manifest.teacher)
    ctx = DistillContext(
        manifest=manifest,
        method=method,
        config=getattr(manifest, method),
        features=names,
        student_channels=[s_info[n].channels for n in names],
        teacher_channels=[t_info[n].channels for n in names],
        token_state=token_state,
        seed=seed,
    )
    distillation = spec.build(ctx)
    distillation.names = names
    return distillation.to(device())


def distillation_terms(
    manifest,
    method: str,
    distillation: Distillation,
    teacher,
    images,
    feats,
    step: int,
    extras,
    teacher_feats: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """``loss/kd_<method>/<term>`` for one step: the teacher's features, the student's, the method's terms.
    ``teacher_feats``: the teacher's features of this batch already known (:mod:`.teacher_outputs`)."""
    task = get_task(manifest.task)
    names = distillation.names
    t_feats = teacher_feats
    if t_feats is None:
        t_feats = teacher_features(manifest, teacher, task.teacher_input(images, extras), names)
    s_feats = task.select_features(manifest.student, feats, names)
    terms = distillation(s_feats, t_feats, DistillBatch(step=step, extras=extras))
    return {f"loss/kd_{method}/{k}": v for k, v in terms.items()}


def train_student(
    manifest,
    method: str,
    seed: int,
    teacher_state: dict[str, Tensor] | None,
    token_state: dict[str, Tensor] | None,
    log: MetricLogger,
    progress: bool = True,
    resume: Resume | None = None,
    evaluate: bool = True,
) -> StageResult:
    """Stage 2: the student with ``method``'s loss added (``baseline``: no distillation). ``resume``: exact
    resume checkpoints (:class:`~.training.Resume`); ``evaluate``: the processes of a torchrun job other than
    rank 0 train only."""
    run = f"{manifest.task}/{method}/s{seed}"
    if method == "baseline":
        return train_model(manifest, "student", seed, log, progress, run=run, resume=resume, evaluate=evaluate)
    task = get_task(manifest.task)
    seed_everything(seed)
    student = task.build_model(manifest.student).to(device())
    pretrained = load_pretrained(student, manifest, "student", progress)  # [pretrain]: the body's start ({} when off)
    inherit_from_teacher(student, teacher_state, manifest.distill.init_from_teacher)
    teacher = freeze(load_model(manifest, "teacher", teacher_state))
    distillation = build_distillation(manifest, method, token_state, seed)
    # distill.teacher_cache: the teacher's features looked up by image index (computed once, RNG left untouched)
    cached = None
    if manifest.distill.teacher_cache:
        cached = cached_teacher(manifest, teacher, distillation.names, seed, progress)

    def kd_step(images, targets, feats, step, extras):
        t_feats = cached(images, step) if cached is not None else None
        return distillation_terms(manifest, method, distillation, teacher, images, feats, step, extras, t_feats)

    timing = train_loop(
        student, distillation, manifest, manifest.student_train, seed, kd_step, log, run, progress, resume
    )
    if not evaluate:
        return StageResult({}, {})
    metrics = evaluate_model(manifest, student, progress)
    metrics.update(timing)
    metrics.update(pretrained)
    _, val_set, _ = task.datasets(manifest)
    metrics["params"] = float(count_parameters(student))
    metrics["added_params"] = float(count_parameters(distillation))
    extra: dict[str, Any] = {}
    masks_source = distillation.token_masks_module()
    if masks_source is not None:
        extra["masks"] = example_masks(manifest, teacher, masks_source, val_set)
    return StageResult(metrics, cpu_state(student), extra)
