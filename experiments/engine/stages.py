"""The three stages of the benchmark, for detection and segmentation, through one code path.

0. ``train_teacher``: the task model trained alone (the teacher; the ``baseline`` student is the same loop).
1. ``learn_tokens``: MasKD receptive tokens on the frozen teacher (BatchNorm in eval mode), task loss on the
   masked features plus the Dice term; Adam, lr 0.01, weight decay 1e-3, cosine, as the official recipe.
2. ``train_student``: a student per method, task loss plus the method's distillation loss on declared features.

Each stage is a pure function of its config (manifest sections + seed) and returns a :class:`StageResult`;
tracking and reuse live in :mod:`experiments.engine.pipeline`. Nothing here reads a manifest file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from baselines.cwd import ChannelWiseDivergence
from baselines.fgd import FGDLoss, fgd_box_masks
from baselines.fitnet import FitNetMSE
from maskd import MasKDLoss, MaskLearning
from maskd.mask_learning import MaskLearningOutput
from maskd.tokens import dice_coeff

from . import data as scenes
from .evaluation import evaluate_detection, evaluate_segmentation
from .manifest import Manifest, Train
from .models import (
    DetectorConfig,
    SegmenterConfig,
    build_model,
    count_parameters,
    detector_features_with_masked_forward,
    detector_train_step,
    feature_info,
    forward_features,
    segmenter_forward,
    segmenter_masked_forward,
)
from .recorder import FeatureRecorder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MetricLogger = Callable[[dict[str, float], int], None]


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the message names the term and the step."""


@dataclass
class StageResult:
    metrics: dict[str, float]
    state_dict: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ runtime
class RuntimeConfigError(ValueError):
    """A device or precision this machine cannot run; raised before any work."""


@dataclass(frozen=True)
class Runtime:
    """Where the stages run: ``device`` (``cpu``, ``cuda``, ``cuda:1``) and ``amp`` (``none`` or ``bf16``: the
    forward passes and losses under ``torch.autocast`` in bfloat16, optimizer and checkpoints in float32).
    Checkpoints and metrics come back on the CPU whatever the device."""

    device: str = "cpu"
    amp: str = "none"

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16"):
            raise RuntimeConfigError(f"amp = {self.amp!r}; allowed: 'none', 'bf16'")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeConfigError(f"device = {self.device!r} but CUDA is not available on this machine")
        if kind not in ("cpu", "cuda"):
            raise RuntimeConfigError(f"device = {self.device!r}; allowed: cpu, cuda, cuda:N")

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.amp == "bf16")


_RUNTIME: ContextVar[Runtime | None] = ContextVar("maskd_bench_runtime", default=None)
_CPU = Runtime()


@contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Run the stages called inside on ``runtime.device`` (with ``runtime.amp``)."""
    token = _RUNTIME.set(runtime)
    try:
        yield runtime
    finally:
        _RUNTIME.reset(token)


def current_runtime() -> Runtime:
    return _RUNTIME.get() or _CPU


def device() -> torch.device:
    return torch.device(current_runtime().device)


def to_device(obj: Any) -> Any:
    """Tensors (also inside lists, tuples and dicts, e.g. detection targets) moved to the current device."""
    if isinstance(obj, Tensor):
        return obj.to(device(), non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v) for v in obj)
    return obj


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _synchronize() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize(device())


# ------------------------------------------------------------------------------------------ building blocks
def scene_config(manifest: Manifest) -> scenes.SceneConfig:
    return manifest.data


def model_config(manifest: Manifest, role: str) -> DetectorConfig | SegmenterConfig:
    return getattr(manifest, role)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def datasets(manifest: Manifest) -> tuple[Any, Any, Path]:
    root = scenes.generate_scenes(scene_config(manifest), progress=True)
    if manifest.task == "detection":
        return (
            scenes.detection_dataset(root, "train"),
            scenes.detection_dataset(root, "val"),
            root / "annotations" / "instances_val.json",
        )
    return scenes.segmentation_dataset(root, "train"), scenes.segmentation_dataset(root, "val"), root


def collate_fn(task: str):
    return scenes.collate_detection if task == "detection" else scenes.collate_segmentation


def normalise(images: Tensor) -> Tensor:
    """ImageNet mean/std, as torchvision's detectors do inside their transform (DeepLabV3 does not)."""
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


def build_optimizer(params, cfg: Train | Any) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r} is not one of sgd, adamw, adam")


def lr_factor(step: int, cfg: Train | Any) -> float:
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


def check_finite(terms: dict[str, Tensor], step: int, stage: str) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(f"{stage}: loss term {name!r} is {value.item()} at step {step}")


def task_forward(model: nn.Module, task: str, images, targets):
    """Task losses and the declared features of one forward.

    Returns (losses dict, features dict name -> tensor or list, extras for FGD).
    """
    if task == "detection":
        step = detector_train_step(model, images, targets)
        return step.losses, {"fpn": step.features}, step
    x = normalise(torch.stack(list(images)) if isinstance(images, list | tuple) else images)
    out, feats = segmenter_forward(model, x)
    losses = {"ce": F.cross_entropy(out, targets, ignore_index=scenes.IGNORE_INDEX)}
    return losses, feats, None


def select_features(manifest: Manifest, role_cfg, feats: dict[str, Any], names: list[str]) -> list[Tensor]:
    """The declared features ``names`` (``feature_info`` keys) from one forward's features."""
    info = feature_info(role_cfg)
    unknown = [n for n in names if n not in info]
    if unknown:
        raise ValueError(
            f"distill feature {unknown[0]!r} is not declared by the {manifest.task} model; declared: {', '.join(info)}"
        )
    if manifest.task == "detection":
        order = list(info)
        return [feats["fpn"][order.index(n)] for n in names]
    return [feats[n] for n in names]


def evaluate(
    model: nn.Module, manifest: Manifest, val_set, gt, transform_logits=None, progress=True, transform_backbone=None
) -> dict[str, float]:
    loader = DataLoader(val_set, batch_size=16, shuffle=False, collate_fn=collate_fn(manifest.task))
    model.eval()
    if manifest.task == "detection":
        return evaluate_detection(model, loader, gt, device=device(), progress=progress)

    class _Seg(nn.Module):  # normalisation (and optional logit masking) as in training
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if transform_logits is None and transform_backbone is None:
                return segmenter_forward(self.inner, normalise(x))[0]
            return segmenter_masked_forward(self.inner, normalise(x), transform_logits, transform_backbone)[0]

    metrics = evaluate_segmentation(_Seg(model), loader, scenes.NUM_SEG_CLASSES, device=device(), progress=progress)
    out = {"mIoU": metrics["mIoU"]}
    out.update({f"IoU_{k}": v for k, v in enumerate(metrics["iou_per_class"])})
    return out


def primary_metric(task: str) -> str:
    return "mAP" if task == "detection" else "mIoU"


# ------------------------------------------------------------------------------------------ stage 0 / baseline
def _train_loop(
    model: nn.Module,
    extra: nn.Module | None,
    manifest: Manifest,
    cfg: Train,
    seed: int,
    kd_step: Callable[..., dict[str, Tensor]] | None,
    log: MetricLogger,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """The shared supervised loop; ``kd_step(images, targets, student_feats, step, extras)`` adds KD terms."""
    runtime = current_runtime()
    train_set, _, _ = datasets(manifest)
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    batches = infinite_batches(train_set, cfg.batch_size, collate_fn(manifest.task), seed)
    model.train()
    if extra is not None:
        extra.train()
    step_times: list[float] = []
    bar = tqdm(range(cfg.iterations), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        images, targets = to_device(next(batches))
        start = time.perf_counter()
        with runtime.autocast():
            losses, feats, extras = task_forward(model, manifest.task, images, targets)
            terms = {f"loss/{k}": v.float() for k, v in losses.items()}
            if kd_step is not None:
                terms.update({k: v.float() for k, v in kd_step(images, targets, feats, step, extras).items()})
        total = sum(terms.values())
        check_finite({**terms, "loss/total": total}, step, desc)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        _synchronize()
        step_times.append(time.perf_counter() - start)
        if step % cfg.log_every == 0 or step == cfg.iterations - 1:
            values = {k: v.item() for k, v in terms.items()}
            values["loss/total"] = total.item()
            values["lr"] = optimizer.param_groups[0]["lr"]
            log(values, step)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}")
    steady = step_times[min(5, len(step_times) - 1) :] or step_times
    return {"step_time_s": sum(steady) / len(steady)}


def train_teacher(manifest: Manifest, role: str, seed: int, log: MetricLogger, progress: bool = True) -> StageResult:
    """Train ``manifest.<role>`` (``teacher`` or ``student``) on the task alone and evaluate it."""
    cfg_model = model_config(manifest, role)
    cfg_train = manifest.teacher_train if role == "teacher" else manifest.student_train
    seed_everything(seed)
    model = build_model(cfg_model).to(device())
    timing = _train_loop(model, None, manifest, cfg_train, seed, None, log, f"{manifest.task}/{role}/s{seed}", progress)
    _, val_set, gt = datasets(manifest)
    metrics = evaluate(model, manifest, val_set, gt, progress=progress)
    metrics.update(timing)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, cpu_state(model))


def evaluate_state(manifest: Manifest, role: str, state_dict: dict[str, Tensor], progress: bool = True) -> StageResult:
    """Evaluate a cached checkpoint (no training): the metrics a training run would have logged, bar timing."""
    model = load_model(manifest, role, state_dict)
    _, val_set, gt = datasets(manifest)
    metrics = evaluate(model, manifest, val_set, gt, progress=progress)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, state_dict)


def load_model(manifest: Manifest, role: str, state_dict: dict[str, Tensor]) -> nn.Module:
    model = build_model(model_config(manifest, role))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device())


def freeze(model: nn.Module) -> nn.Module:
    """Frozen teacher: no gradients, BatchNorm (and everything) in eval mode."""
    model.requires_grad_(False)
    return model.eval()


# ------------------------------------------------------------------------------------------ stage 1
def _maskd_channels(manifest: Manifest) -> list[int]:
    info = feature_info(manifest.teacher)
    return [info[name].channels for name in manifest.features_for("maskd")]


def build_mask_learner(manifest: Manifest) -> MaskLearning:
    tokens = manifest.tokens
    return MaskLearning(
        _maskd_channels(manifest),
        tokens.num_tokens,
        weight_head=tokens.weight_head,
        dice_weight=tokens.dice_weight,
    ).to(device())


def _masked_task_losses(teacher: nn.Module, learner: MaskLearning, manifest: Manifest, images, targets):
    """Teacher task losses with its distilled features replaced by the token-masked features."""
    names = manifest.features_for("maskd")
    outputs: dict[str, Any] = {}
    if manifest.task == "detection":
        order = list(feature_info(manifest.teacher))
        idx = [order.index(n) for n in names]

        def transform(levels: list[Tensor]) -> list[Tensor]:
            out = learner([levels[i] for i in idx])
            outputs["out"] = out
            replaced = list(levels)
            for j, i in enumerate(idx):
                replaced[i] = out.features[j]
            return replaced

        losses = detector_features_with_masked_forward(teacher, images, targets, transform)
        return losses, outputs["out"]
    transforms, collect = segmentation_mask_transforms(learner, names)
    x = normalise(torch.stack(list(images)) if isinstance(images, list | tuple) else images)
    out, _ = segmenter_masked_forward(teacher, x, transforms.get("logits"), transforms.get("backbone"))
    losses = {"ce": F.cross_entropy(out, targets, ignore_index=scenes.IGNORE_INDEX)}
    return losses, collect()


def segmentation_mask_transforms(learner: MaskLearning, names: list[str]):
    """Per-feature transforms that mask the teacher's ``backbone`` (layer4) and/or ``logits`` with the tokens of
    the matching level (``names[j]`` -> ``learner.mask_modules[j]``), applied in the forward's order (backbone,
    then the classifier on the masked backbone, then logits), and a function that collects the
    :class:`MaskLearningOutput` (levels in ``names`` order) after the forward."""
    allowed = ("backbone", "logits")
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise ValueError(f"segmentation maskd features must be distinct names from {allowed}, got {names}")
    results: dict[str, tuple[Tensor, Tensor]] = {}

    def make(j: int, name: str):
        def transform(feature: Tensor) -> Tensor:
            masked, masks = learner.mask_modules[j].mask_features(feature, impl=learner.impl)
            results[name] = (masked, masks)
            return masked

        return transform

    transforms = {name: make(j, name) for j, name in enumerate(names)}

    def collect() -> MaskLearningOutput:
        feats = [results[n][0] for n in names]
        masks = [results[n][1] for n in names]
        dice = torch.stack([dice_coeff(m.flatten(2)) for m in masks])
        return MaskLearningOutput(feats, dice, masks)

    return transforms, collect


def learn_tokens(
    manifest: Manifest, teacher_state: dict[str, Tensor], seed: int, log: MetricLogger, progress: bool = True
) -> StageResult:
    """Stage 1: receptive tokens on the frozen teacher. Returns the token state_dict and diagnostics."""
    cfg = manifest.tokens
    runtime = current_runtime()
    seed_everything(seed)
    teacher = freeze(load_model(manifest, "teacher", teacher_state))
    learner = build_mask_learner(manifest)
    train_set, val_set, gt = datasets(manifest)
    optimizer = build_optimizer(learner.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    batches = infinite_batches(train_set, cfg.batch_size, collate_fn(manifest.task), seed)
    learner.train()
    bar = tqdm(
        range(cfg.iterations),
        desc=f"{manifest.task}/tokens",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    for step in bar:
        images, targets = to_device(next(batches))
        teacher.eval()  # BatchNorm in eval mode every iteration, as MasKDHook.before_train_iter
        with runtime.autocast():
            losses, out = _masked_task_losses(teacher, learner, manifest, images, targets)
            terms = {f"loss/{k}": v.float() for k, v in losses.items()}
            terms["loss/dice"] = learner.dice_weight * out.dice.float().sum()
        total = sum(terms.values())
        check_finite({**terms, "loss/total": total}, step, "tokens")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == cfg.iterations - 1:
            values = {k: v.item() for k, v in terms.items()}
            values.update({"loss/total": total.item(), "lr": optimizer.param_groups[0]["lr"]})
            values.update({f"dice/level{i}": d.item() for i, d in enumerate(out.dice)})
            log(values, step)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}")
    learner.eval()
    metrics = token_diagnostics(manifest, teacher, learner, val_set, gt, progress)
    state = cpu_state(learner)
    return StageResult(metrics, state)


@torch.no_grad()
def token_diagnostics(
    manifest: Manifest, teacher: nn.Module, learner: MaskLearning, val_set, gt, progress: bool
) -> dict[str, float]:
    """Pairwise Dice between the learned masks on validation images, and the teacher's metric with its
    features replaced by the masked ones (how much of the teacher the masks keep) next to its plain metric."""
    metric = primary_metric(manifest.task)
    plain = evaluate(teacher, manifest, val_set, gt, progress=progress)[metric]
    names = manifest.features_for("maskd")
    if manifest.task == "detection":
        order = list(feature_info(manifest.teacher))
        idx = [order.index(n) for n in names]
        backbone = teacher.backbone
        original_forward = backbone.forward

        def masked_backbone(x):
            feats = original_forward(x)
            keys = list(feats)
            out = learner([feats[keys[i]] for i in idx])
            for j, i in enumerate(idx):
                feats[keys[i]] = out.features[j]
            return feats

        backbone.forward = masked_backbone
        try:
            masked = evaluate(teacher, manifest, val_set, gt, progress=progress)[metric]
        finally:
            del backbone.forward
    else:
        transforms, _ = segmentation_mask_transforms(learner, names)
        masked = evaluate(
            teacher,
            manifest,
            val_set,
            gt,
            transform_logits=transforms.get("logits"),
            transform_backbone=transforms.get("backbone"),
            progress=progress,
        )[metric]
    dice = mask_dice_on(manifest, teacher, learner, val_set)
    out = {f"teacher_{metric}": plain, f"masked_teacher_{metric}": masked}
    out.update({f"pairwise_dice/level{i}": d for i, d in enumerate(dice)})
    return out


@torch.no_grad()
def teacher_features(manifest: Manifest, teacher: nn.Module, images, names: list[str]) -> list[Tensor]:
    """The teacher's declared features ``names``, captured by forward hooks on the declared modules
    (``feature_info``); a declared module that never runs is an error, not an empty feature."""
    info = feature_info(manifest.teacher)
    unknown = [n for n in names if n not in info]
    if unknown:
        raise ValueError(f"distill feature {unknown[0]!r} is not declared by the teacher; declared: {', '.join(info)}")
    specs = [info[n] for n in names]
    with FeatureRecorder(teacher, sorted({s.module for s in specs})) as recorder:
        if manifest.task == "detection":
            forward_features(teacher, images)
        else:
            segmenter_forward(
                teacher, normalise(torch.stack(list(images)) if isinstance(images, list | tuple) else images)
            )
        return [recorder.get(s.module)[s.key] if s.key is not None else recorder.get(s.module) for s in specs]


@torch.no_grad()
def mask_dice_on(
    manifest: Manifest, teacher: nn.Module, learner: MaskLearning, val_set, images: int = 32
) -> list[float]:
    loader = DataLoader(val_set, batch_size=images, shuffle=False, collate_fn=collate_fn(manifest.task))
    batch, _ = next(iter(loader))
    feats = teacher_features(manifest, teacher, to_device(batch), manifest.features_for("maskd"))
    return [d.item() for d in learner(feats).dice]


@torch.no_grad()
def example_masks(
    manifest: Manifest, teacher: nn.Module, learner_or_loss: nn.Module, val_set, images: int = 4
) -> tuple[Tensor, list[Tensor]]:
    """Images [n, 3, H, W] and the teacher masks of each distilled level, each [n, T, h, w]."""
    loader = DataLoader(val_set, batch_size=images, shuffle=False, collate_fn=collate_fn(manifest.task))
    batch, _ = next(iter(loader))
    feats = teacher_features(manifest, teacher, to_device(batch), manifest.features_for("maskd"))
    masks = [tokens.masks(f).cpu() for tokens, f in zip(learner_or_loss.mask_modules, feats)]
    x = torch.stack(list(batch)) if isinstance(batch, list | tuple) else batch
    return x, masks


# ------------------------------------------------------------------------------------------ stage 2
class Distiller(nn.Module):
    """The method's trainable (and frozen) extra modules, and its loss on one step's features."""

    def __init__(self, manifest: Manifest, method: str, token_state: dict[str, Tensor] | None) -> None:
        super().__init__()
        self.manifest, self.method = manifest, method
        self.names = manifest.features_for(method)
        s_info, t_info = feature_info(manifest.student), feature_info(manifest.teacher)
        s_ch = [s_info[n].channels for n in self.names]
        t_ch = [t_info[n].channels for n in self.names]
        self.align = nn.ModuleList()
        if method == "fitnet":
            self.loss = FitNetMSE(s_ch, t_ch, loss_weight=manifest.fitnet.loss_weight, align=True)
        elif method == "cwd":
            if s_ch != t_ch:
                raise ValueError(f"cwd needs equal channels, student {s_ch} vs teacher {t_ch}")
            self.loss = ChannelWiseDivergence(tau=manifest.cwd.tau, loss_weight=manifest.cwd.loss_weight)
        elif method == "fgd":
            c = manifest.fgd
            w = c.weight_scale
            self.loss = FGDLoss(
                s_ch,
                t_ch,
                temp=c.temp,
                alpha_fgd=c.alpha_fgd * w,
                beta_fgd=c.beta_fgd * w,
                gamma_fgd=c.gamma_fgd * w,
                lambda_fgd=c.lambda_fgd * w,
                box_scale=c.box_scale,
            )
        elif method == "maskd":
            c, tk = manifest.maskd, manifest.tokens
            if manifest.distill.align:
                self.align = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(s_ch, t_ch))
            elif s_ch != t_ch:
                raise ValueError(f"maskd without align convs needs equal channels, student {s_ch} vs {t_ch}")
            self.loss = MasKDLoss(
                t_ch,
                tk.num_tokens,
                weight_head=tk.weight_head and c.variant == "detection",
                custom_mask=c.custom_mask,
                custom_mask_warmup=c.custom_mask_warmup,
                loss_weight=c.loss_weight,
                variant=c.variant,
                area_eps=c.area_eps,
                mask_power=c.mask_power,
            )
            if c.masks == "learned":
                if token_state is None:
                    raise ValueError("maskd with learned masks needs the stage-1 token checkpoint")
                self.loss.load_tokens(token_state)
            elif c.masks == "gt_box" and manifest.task != "detection":
                raise ValueError("maskd.masks = 'gt_box' needs boxes: detection only")
            elif c.masks == "uniform":
                with torch.no_grad():  # sigmoid(0) = 0.5 everywhere: every pixel weighted alike
                    for m in self.loss.mask_modules:
                        m.mask_token.zero_()
            # "untrained": the tokens of the official init, N(0, 0.01^2)
        else:
            raise ValueError(f"no distiller for method {method!r}")

    def added_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor], step: int, extras) -> Tensor:
        if self.method == "maskd":
            aligned = [conv(s) for conv, s in zip(self.align, student_feats)] if len(self.align) else student_feats
            fixed = gt_box_masks(extras, aligned) if self.manifest.maskd.masks == "gt_box" else None
            return self.loss(aligned, teacher_feats, step=step, masks=fixed)
        if self.method == "fgd":
            boxes = [t["boxes"] for t in extras.targets]
            return self.loss(student_feats, teacher_feats, boxes, extras.image_sizes, padded_shape=extras.batch_shape)
        return self.loss(student_feats, teacher_feats)


def gt_box_masks(extras, levels: list[Tensor]) -> list[Tensor]:
    """Two fixed masks per level for the ``maskd.masks = "gt_box"`` ablation: the union of the ground-truth boxes
    (cells as FGD's box masks, :func:`baselines.fgd.fgd_box_masks`, official unpadded scaling) and its complement.
    Each is normalised by its own area in the MasKD loss, so objects and background count alike, as two tokens."""
    boxes = [t["boxes"] for t in extras.targets]
    out = []
    for feat in levels:
        fg, _ = fgd_box_masks(
            boxes, extras.image_sizes, tuple(feat.shape[-2:]), padded_shape=extras.batch_shape, dtype=feat.dtype
        )
        fg = (fg > 0).to(feat.dtype)
        out.append(torch.stack([fg, 1.0 - fg], dim=1))  # [N, 2, H, W]
    return out


def train_student(
    manifest: Manifest,
    method: str,
    seed: int,
    teacher_state: dict[str, Tensor] | None,
    token_state: dict[str, Tensor] | None,
    log: MetricLogger,
    progress: bool = True,
) -> StageResult:
    """Stage 2: the student with ``method``'s loss added (``baseline``: no distillation)."""
    if method == "baseline":
        return train_teacher(manifest, "student", seed, log, progress)
    seed_everything(seed)
    student = build_model(manifest.student).to(device())
    teacher = freeze(load_model(manifest, "teacher", teacher_state))
    distiller = Distiller(manifest, method, token_state).to(device())
    names = distiller.names

    def kd_step(images, targets, feats, step, extras):
        t_feats = teacher_features(manifest, teacher, images, names)
        s_feats = select_features(manifest, manifest.student, feats, names)
        return {f"loss/kd_{method}": distiller(s_feats, t_feats, step, extras)}

    timing = _train_loop(
        student,
        distiller,
        manifest,
        manifest.student_train,
        seed,
        kd_step,
        log,
        f"{manifest.task}/{method}/s{seed}",
        progress,
    )
    _, val_set, gt = datasets(manifest)
    metrics = evaluate(student, manifest, val_set, gt, progress=progress)
    metrics.update(timing)
    metrics["params"] = float(count_parameters(student))
    metrics["added_params"] = float(distiller.added_parameters())
    extra: dict[str, Any] = {}
    if method == "maskd" and manifest.maskd.masks != "gt_box":  # gt_box masks need targets, not a teacher
        extra["masks"] = example_masks(manifest, teacher, distiller.loss, val_set)
    return StageResult(metrics, cpu_state(student), extra)
