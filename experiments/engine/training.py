"""The supervised training loop shared by every stage that trains a model, and what it needs.

A step: the task's forward (task losses and features), the distillation terms a method adds, the non-finite
guard on every term and on the gradient norm, backward, optional clipping, the optimizer and the schedule.
Data order is a function of the seed alone (:func:`infinite_batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..tasks import get_task
from .models import count_parameters
from .runtime import cpu_state, current_runtime, device, seed_everything, synchronize, to_device

MetricLogger = Callable[[dict[str, float], int], None]


class NonFiniteLoss(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the message names the run, term and step."""


@dataclass
class StageResult:
    metrics: dict[str, float]
    state_dict: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def infinite_batches(dataset, batch_size: int, collate, seed: int) -> Iterator[Any]:
    """Shuffled batches forever; epoch e is shuffled by ``seed`` and e, so a run's data order is its seed's."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=g,
            collate_fn=collate,
            drop_last=len(dataset) >= batch_size,
            num_workers=0,
        )
        yield from loader
        epoch += 1


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r} is not one of sgd, adamw, adam")


def lr_factor(step: int, cfg) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then cosine/poly/step/constant."""
    total = max(cfg.iterations, 1)
    warmup = getattr(cfg, "warmup_iters", 0)
    if warmup and step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup  # mmdet's linear warm-up from ratio 0.001
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    progress = min(step / total, 1.0)
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "poly":
        return floor + (1 - floor) * (1 - progress) ** 0.9
    if cfg.schedule == "step":  # mmdet 2x: x0.1 at 16/24 and 22/24 of training
        return 0.1 ** ((progress >= 16 / 24) + (progress >= 22 / 24))
    return 1.0


def check_finite(terms: dict[str, Tensor], step: int, run: str) -> None:
    """Stop at the first NaN/inf term, naming it (e.g. ``loss/kd_fgd/P3/relation``), the run and the step."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(
                f"{run}: loss term {name!r} is {value.item()} at step {step}; lower the learning rate or the "
                "term's loss weight, or check the input data"
            )


def check_grad_norm(params: list[Tensor], step: int, run: str) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
    if not math.isfinite(norm):
        raise NonFiniteLoss(
            f"{run}: gradient norm is {norm} at step {step} (the losses were finite); lower the learning rate or "
            "the loss weights"
        )
    return norm


def train_loop(
    model: nn.Module,
    extra: nn.Module | None,
    manifest,
    cfg,
    seed: int,
    kd_step: Callable[..., dict[str, Tensor]] | None,
    log: MetricLogger,
    run: str,
    progress: bool,
) -> dict[str, float]:
    """The shared supervised loop; ``kd_step(images, targets, student_feats, step, extras)`` adds named KD
    terms (``loss/kd_<method>/<term>``). ``run`` names the run in progress bars and errors."""
    runtime = current_runtime()
    task = get_task(manifest.task)
    train_set, _, _ = task.datasets(manifest)
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    trainable = [p for p in params if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    batches = infinite_batches(train_set, cfg.batch_size, task.collate, seed)
    model.train()
    if extra is not None:
        extra.train()
    step_times: list[float] = []
    bar = tqdm(range(cfg.iterations), desc=run, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        images, targets = to_device(next(batches))
        start = time.perf_counter()
        with runtime.autocast():
            losses, feats, extras = task.forward(model, images, targets)
            terms = {f"loss/{k}": v.float() for k, v in losses.items()}
            if kd_step is not None:
                terms.update({k: v.float() for k, v in kd_step(images, targets, feats, step, extras).items()})
        check_finite(terms, step, run)
        total = sum(terms.values())
        check_finite({"loss/total": total}, step, run)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = check_grad_norm(trainable, step, run)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        synchronize()
        step_times.append(time.perf_counter() - start)
        if step % cfg.log_every == 0 or step == cfg.iterations - 1:
            values = {k: v.item() for k, v in terms.items()}
            values.update(method_totals(values))
            values["loss/total"] = total.item()
            values["grad_norm"] = grad_norm
            values["lr"] = optimizer.param_groups[0]["lr"]
            log(values, step)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}")
    steady = step_times[min(5, len(step_times) - 1) :] or step_times
    return {"step_time_s": sum(steady) / len(steady)}


def method_totals(values: dict[str, float]) -> dict[str, float]:
    """``loss/kd_<method>``: the sum of that method's logged terms (``loss/kd_<method>/<term>``), for plots."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("loss/kd_") and key.count("/") >= 2:
            group = key.split("/", 2)[0] + "/" + key.split("/", 2)[1]
            out[group] = out.get(group, 0.0) + value
    return out


def load_model(manifest, role: str, state_dict: dict[str, Tensor]) -> nn.Module:
    model = get_task(manifest.task).build_model(getattr(manifest, role))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device())


def freeze(model: nn.Module) -> nn.Module:
    """Frozen teacher: no gradients, BatchNorm (and everything) in eval mode."""
    model.requires_grad_(False)
    return model.eval()


def train_model(
    manifest, role: str, seed: int, log: MetricLogger, progress: bool = True, run: str | None = None
) -> StageResult:
    """Train ``manifest.<role>`` (``teacher`` or ``student``) on the task alone and evaluate it."""
    task = get_task(manifest.task)
    cfg_train = manifest.teacher_train if role == "teacher" else manifest.student_train
    seed_everything(seed)
    model = task.build_model(getattr(manifest, role)).to(device())
    run = run or f"{manifest.task}/{role}/s{seed}"
    timing = train_loop(model, None, manifest, cfg_train, seed, None, log, run, progress)
    _, val_set, gt = task.datasets(manifest)
    metrics = task.evaluate(model, manifest, val_set, gt, progress=progress)
    metrics.update(timing)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, cpu_state(model))


def evaluate_state(manifest, role: str, state_dict: dict[str, Tensor], progress: bool = True) -> StageResult:
    """Evaluate a cached checkpoint (no training): the metrics a training run would have logged, bar timing."""
    task = get_task(manifest.task)
    model = load_model(manifest, role, state_dict)
    _, val_set, gt = task.datasets(manifest)
    metrics = task.evaluate(model, manifest, val_set, gt, progress=progress)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, state_dict)
