"""Stage 1 of MasKD: receptive tokens learned on the frozen teacher, and what is measured of them.

The teacher's distilled features are replaced by the token-masked ones; the objective is its task loss plus the
Dice term that keeps the masks apart (MasKDHook); BatchNorm stays in eval mode; Adam, lr 0.01, weight decay 1e-3,
cosine, as the official recipe. Diagnostics: the teacher's metric with masked features next to its plain metric,
and the pairwise Dice of the masks on validation images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maskd import MaskLearning

from ..tasks import get_task
from .recorder import FeatureRecorder
from .runtime import cpu_state, device, seed_everything, to_device
from .training import MetricLogger, Resume, StageResult, fit, freeze, load_model

TOKEN_METHOD = "maskd"  # the method whose features the tokens look at


def token_features(manifest) -> list[str]:
    return manifest.features_for(TOKEN_METHOD)


def build_mask_learner(manifest) -> MaskLearning:
    tokens = manifest.tokens
    info = get_task(manifest.task).features(manifest.teacher)
    return MaskLearning(
        [info[name].channels for name in token_features(manifest)],
        tokens.num_tokens,
        weight_head=tokens.weight_head,
        dice_weight=tokens.dice_weight,
    ).to(device())


class TokenStep(nn.Module):
    """Stage 1's forward: the frozen teacher's task losses with its features ``names`` replaced by the
    token-masked ones, and the Dice terms that keep the masks apart. Only the learner is a submodule (what DDP
    wraps with several processes); the teacher is kept in a tuple, outside, and in eval mode at every step (BatchNorm
    included), as MasKDHook.before_train_iter."""

    def __init__(self, manifest, teacher: nn.Module, learner: MaskLearning, names: list[str]) -> None:
        super().__init__()
        self.learner = learner
        self._teacher = (teacher,)
        self.manifest = manifest
        self.names = names

    def forward(self, images, targets, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        teacher = self._teacher[0].eval()
        task = get_task(self.manifest.task)
        losses, out = task.masked_losses(teacher, self.learner, self.manifest, self.names, images, targets)
        terms = {f"loss/{k}": v.float() for k, v in losses.items()}
        dice = {f"loss/dice/{n}": self.learner.dice_weight * d.float() for n, d in zip(self.names, out.dice)}
        terms.update(dice)
        logged = {"loss/dice": sum(v.detach() for v in dice.values())}
        logged.update({f"dice/level{i}": d.detach().float() for i, d in enumerate(out.dice)})
        return terms, logged


def learn_tokens(
    manifest,
    teacher_state: dict[str, Tensor],
    seed: int,
    log: MetricLogger,
    progress: bool = True,
    resume: Resume | None = None,
    evaluate: bool = True,
) -> StageResult:
    """Stage 1: receptive tokens on the frozen teacher. Returns the token state_dict and diagnostics
    (``evaluate``: the processes of a torchrun job other than rank 0 train only)."""
    cfg = manifest.tokens
    task = get_task(manifest.task)
    seed_everything(seed)
    teacher = freeze(load_model(manifest, "teacher", teacher_state))
    learner = build_mask_learner(manifest)
    names = token_features(manifest)
    run = f"{manifest.task}/tokens"
    step_module = TokenStep(manifest, teacher, learner, names)
    fit(step_module, {"tokens": learner}, manifest, cfg, "tokens", seed, log, run, progress, resume, False, 10)
    if not evaluate:
        return StageResult({}, {})
    learner.eval()
    _, val_set, gt = task.datasets(manifest)
    metrics = token_diagnostics(manifest, teacher, learner, val_set, gt, progress)
    return StageResult(metrics, cpu_state(learner))


@torch.no_grad()
def token_diagnostics(manifest, teacher: nn.Module, learner: MaskLearning, val_set, gt, progress: bool):
    """Pairwise Dice between the learned masks on validation images, and the teacher's metric with its
    features replaced by the masked ones (how much of the teacher the masks keep) next to its plain metric."""
    task = get_task(manifest.task)
    metric = task.primary_metric
    plain = task.evaluate(teacher, manifest, val_set, gt, progress=progress)[metric]
    masked = task.masked_metric(teacher, learner, token_features(manifest), manifest, val_set, gt, progress)
    dice = mask_dice_on(manifest, teacher, learner, val_set)
    out = {f"teacher_{metric}": plain, f"masked_teacher_{metric}": masked}
    out.update({f"pairwise_dice/level{i}": d for i, d in enumerate(dice)})
    return out


@torch.no_grad()
def teacher_features(manifest, teacher: nn.Module, images, names: list[str]) -> list[Tensor]:
    """The teacher's declared features ``names``, captured by forward hooks on the declared modules; a declared
    module that never runs is an error, not an empty feature."""
    task = get_task(manifest.task)
    info = task.features(manifest.teacher)
    unknown = [n for n in names if n not in info]
    if unknown:
        raise ValueError(f"distill feature {unknown[0]!r} is not declared by the teacher; declared: {', '.join(info)}")
    specs = [info[n] for n in names]
    with FeatureRecorder(teacher, sorted({s.module for s in specs})) as recorder:
        task.forward_for_features(teacher, images)
        return [recorder.get(s.module)[s.key] if s.key is not None else recorder.get(s.module) for s in specs]


def _first_val_batch(manifest, val_set, images: int) -> Any:
    loader = DataLoader(val_set, batch_size=images, shuffle=False, collate_fn=get_task(manifest.task).collate)
    batch, _ = next(iter(loader))
    return batch


@torch.no_grad()
def mask_dice_on(manifest, teacher: nn.Module, learner: MaskLearning, val_set, images: int = 32) -> list[float]:
    batch = _first_val_batch(manifest, val_set, images)
    feats = teacher_features(manifest, teacher, to_device(batch), token_features(manifest))
    return [d.item() for d in learner(feats).dice]


@torch.no_grad()
def example_masks(
    manifest, teacher: nn.Module, learner_or_loss: nn.Module, val_set, images: int = 4
) -> tuple[Tensor, list[Tensor]]:
    """Images [n, 3, H, W] and the teacher masks of each distilled level, each [n, T, h, w]."""
    batch = _first_val_batch(manifest, val_set, images)
    feats = teacher_features(manifest, teacher, to_device(batch), token_features(manifest))
    masks = [tokens.masks(f).cpu() for tokens, f in zip(learner_or_loss.mask_modules, feats)]
    return get_task(manifest.task).image_tensor(batch), masks
