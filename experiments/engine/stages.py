"""The stages of the benchmark, one module each, and the entry points the pipeline calls.

0. ``train_model`` (:mod:`.training`): the task model trained alone — the teacher, and the ``baseline`` student.
1. ``learn_tokens`` (:mod:`.tokens`): MasKD receptive tokens on the frozen teacher.
2. ``train_student`` (:mod:`.distill`): a student per method, task loss plus the method's distillation terms.

Each stage is a pure function of its config (manifest sections + seed) and returns a
:class:`~.training.StageResult`; tracking and reuse live in :mod:`.pipeline`. Where a stage runs (device,
precision) is :mod:`.runtime`; what differs between tasks is in :mod:`experiments.tasks`, between methods in
:mod:`experiments.methods`.
"""

from __future__ import annotations

from .batches import infinite_batches
from .distill import build_distillation, train_student
from .runtime import (
    Runtime,
    RuntimeConfigError,
    cpu_state,
    current_runtime,
    device,
    seed_everything,
    to_device,
    use_runtime,
)
from .tokens import build_mask_learner, example_masks, learn_tokens, teacher_features
from .training import (
    NonFiniteLoss,
    Resume,
    StageResult,
    evaluate_state,
    freeze,
    load_model,
    train_model,
)

__all__ = [
    "NonFiniteLoss",
    "Resume",
    "Runtime",
    "RuntimeConfigError",
    "StageResult",
    "build_distillation",
    "build_mask_learner",
    "cpu_state",
    "current_runtime",
    "device",
    "evaluate_state",
    "example_masks",
    "freeze",
    "infinite_batches",
    "learn_tokens",
    "load_model",
    "seed_everything",
    "teacher_features",
    "to_device",
    "train_model",
    "train_student",
    "use_runtime",
]
