"""The registry of tasks: what the stage code asks of a task, answered once per task.

A task (``detection``, ``segmentation``) is one module in this package that registers a :class:`Task`: its model
config type and builder, metric names, data sets, the training forward (task losses plus the features a
distillation method may read), evaluation, and how the receptive tokens mask its features. The stage code calls
these and never branches on the task's name.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..datasets import kind_of
from ..engine.models import FeatureSpec, build_model, feature_info


class Task:
    """Base of a task plug-in; subclasses set the class attributes and implement the methods."""

    name: str = ""
    primary_metric: str = ""
    secondary_metrics: tuple[str, ...] = ()
    model_config: type = object
    capabilities: frozenset[str] = frozenset()  # e.g. {"boxes"}: what methods may need of a batch

    # ---------------------------------------------------------------- models and features
    def build_model(self, cfg) -> nn.Module:
        return build_model(cfg)

    def features(self, cfg) -> dict[str, FeatureSpec]:
        """Declared distillation features of the model ``cfg`` builds, in order."""
        return feature_info(cfg)

    def input_stride(self, cfg) -> int:
        """Input sizes must be multiples of this for the model's feature geometry to hold."""
        raise NotImplementedError

    # ---------------------------------------------------------------- data
    def datasets(self, manifest) -> tuple[Any, Any, Any]:
        """``(train set, val set, ground truth for evaluation)``."""
        raise NotImplementedError

    def test_set(self, manifest) -> tuple[Any, Any] | None:
        """``(test set, ground truth)`` of the data's held-out test split, or None where it has none."""
        return kind_of(manifest.data).test_set(manifest.data, self.name)

    def collate(self, batch):
        raise NotImplementedError

    @staticmethod
    def image_tensor(images) -> Tensor:
        """A batch of images as one [N, 3, H, W] tensor (figures); images of different sizes are padded with 0 at
        the bottom and right to the largest."""
        import torch

        if not isinstance(images, list | tuple):
            return images
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        if all(tuple(i.shape[-2:]) == (height, width) for i in images):
            return torch.stack(list(images))
        out = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for k, image in enumerate(images):
            out[k, :, : image.shape[-2], : image.shape[-1]] = image
        return out

    # ---------------------------------------------------------------- training
    def forward(self, model: nn.Module, images, targets) -> tuple[dict[str, Tensor], dict[str, Any], Any]:
        """``(task losses, this forward's features, extras for methods)`` of one training forward."""
        raise NotImplementedError

    def select_features(self, cfg, feats: dict[str, Any], names: list[str]) -> list[Tensor]:
        raise NotImplementedError

    def teacher_input(self, images, extras):
        """What the frozen teacher of a distillation step runs on, given the student's batch and the ``extras`` of
        its :meth:`forward`: the same images by default."""
        return images

    def forward_for_features(self, model: nn.Module, images) -> None:
        """A forward whose only purpose is to let hooks record features (the frozen teacher)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module, manifest, val_set, gt, progress: bool = True) -> dict[str, float]:
        raise NotImplementedError

    # ---------------------------------------------------------------- receptive tokens (MasKD stage 1)
    def masked_losses(self, teacher: nn.Module, learner, manifest, names: list[str], images, targets):
        """Teacher task losses with its features ``names`` replaced by the token-masked ones, and the learner's
        output (:class:`maskd.mask_learning.MaskLearningOutput`)."""
        raise NotImplementedError

    def masked_metric(self, teacher: nn.Module, learner, names: list[str], manifest, val_set, gt, progress) -> float:
        """The teacher's primary metric with its features ``names`` replaced by the token-masked ones."""
        raise NotImplementedError


_TASKS: dict[str, Task] = {}
_LOADED = False


def register(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def tasks() -> dict[str, Task]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name != "registry":
                importlib.import_module(f"{__package__}.{info.name}")
    return dict(_TASKS)


def get_task(name: str) -> Task:
    known = tasks()
    if name not in known:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(known)}")
    return known[name]
