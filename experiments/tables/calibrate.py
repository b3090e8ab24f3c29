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
from ..engine.manifest import Manifest

#: method -> (manifest section, the knob that scales the loss)
WEIGHT_KNOBS = {
    "fitnet": ("fitnet", "loss_weight"),
    "cwd": ("cwd", "loss_weight"),
    "fgd": ("fgd", "weight_scale"),
    "maskd": ("maskd", "loss_weight"),
}


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
    student = stages.build_model(m.student).to(stages.device())
    teacher = stages.freeze(stages.load_model(m, "teacher", teacher_state))
    train_set, _, _ = stages.datasets(m)
    methods = [x for x in m.methods if x in WEIGHT_KNOBS]
    distillers = {x: stages.Distiller(m, x, token_state).to(stages.device()) for x in methods}
    student.train()
    task_total, kd_total = 0.0, dict.fromkeys(methods, 0.0)
    stream = stages.infinite_batches(train_set, m.student_train.batch_size, stages.collate_fn(m.task), seed)
    for _ in range(batches):
        images, targets = stages.to_device(next(stream))
        losses, feats, extras = stages.task_forward(student, m.task, images, targets)
        task_total += sum(v.item() for v in losses.values())
        for method, distiller in distillers.items():
            names = distiller.names
            t_feats = stages.teacher_features(m, teacher, images, names)
            s_feats = stages.select_features(m, m.student, feats, names)
            kd_total[method] += distiller(s_feats, t_feats, 0, extras).item()
    out = []
    for method in methods:
        section, knob = WEIGHT_KNOBS[method]
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
