"""Loss-weight calibration for a new setting: each distillation loss's size at the start of training.

The official loss weights were set for COCO/Cityscapes models whose features have their own scale; the embedded
teachers, trained from scratch, have FPN features with a standard deviation near 10, so the official weights make
every feature loss hundreds to hundreds of thousands of times the task loss at the first step (``maskd-bench
calibrate-weights`` prints the numbers). The embedded manifests therefore rescale every method's weight by one rule,
the same for all methods: the distillation loss equals the student's task loss on the first training batches, with
the untrained seed-0 student. The rule, its inputs and the resulting factors are written in the manifests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import stages
from ..engine.distill import build_distillation, distillation_terms
from ..engine.manifest import Manifest
from ..engine.pretrain import load_pretrained
from ..methods import methods
from ..tasks import get_task


def weight_knobs() -> dict[str, tuple[str, str]]:
    """method -> (manifest section, the knob that scales its loss), from the method registry."""
    return {name: (name, spec.weight_knob) for name, spec in methods().items()}


@dataclass
class Calibration:
    method: str
    knob: str
    current: float
    kd_loss: float
    task_loss: float

    @property
    def suggested(self) -> float:
        return self.current * self.task_loss / self.kd_loss


@torch.no_grad()
def initial_losses(m: Manifest, teacher_state, token_state, batches: int = 4, seed: int = 0) -> list[Calibration]:
    """Mean task loss and mean loss of every distillation method over the first ``batches`` training batches of
    seed ``seed``, with the untrained student of that seed and the manifest's current weights."""
    stages.seed_everything(seed)
    task = get_task(m.task)
    student = task.build_model(m.student).to(stages.device())
    load_pretrained(student, m, "student", progress=False)  # the student starts where its runs start ([pretrain])
    teacher = stages.freeze(stages.load_model(m, "teacher", teacher_state))
    train_set, _, _ = task.datasets(m)
    knobs = weight_knobs()
    chosen = [x for x in m.methods if x in knobs]
    distillers = {x: build_distillation(m, x, token_state, seed) for x in chosen}
    student.train()
    task_total, kd_total = 0.0, dict.fromkeys(chosen, 0.0)
    stream = stages.infinite_batches(train_set, m.student_train.batch_size, task.collate, seed)
    for _ in range(batches):
        images, targets = stages.to_device(next(stream))
        losses, feats, extras = task.forward(student, images, targets)
        task_total += sum(v.item() for v in losses.values())
        for method, distiller in distillers.items():
            terms = distillation_terms(m, method, distiller, teacher, images, feats, 0, extras)
            kd_total[method] += sum(v.item() for v in terms.values())
    out = []
    for method in chosen:
        section, knob = knobs[method]
        out.append(
            Calibration(
                method,
                f"{section}.{knob}",
                getattr(getattr(m, section), knob),
                kd_total[method] / batches,
                task_total / batches,
            )
        )
    return out
