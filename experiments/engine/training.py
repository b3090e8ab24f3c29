"""The supervised training loop shared by every stage that trains (teacher, tokens, student), and what it needs.

A step: the stage's forward (task losses and features, the distillation terms a method adds), the non-finite
guard on every term and on the gradient norm, backward, optional clipping, the optimizer and the schedule.

Batches come from :mod:`experiments.engine.batches`: the data order is a function of the seed and the epoch alone,
whatever the number of processes, and a resumed run never loads the images of the steps it skips.

With several processes the trainable modules (the model and the method's extra modules, in one :class:`TaskStep`)
train inside one ``DistributedDataParallel``; the frozen teacher and frozen tokens stay outside it. Every
``checkpoint_every`` steps the loop hands :class:`Resume` a checkpoint of everything the next step depends on:
weights, optimizer, schedule, loss scaler, RNG states (global and each module's own ``torch.Generator``, e.g.
MGD's) of every process, and the step, so that a resumed run ends bitwise equal to an uninterrupted one (CPU).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..tasks import get_task
from .batches import Geometry, geometry, step_batches, steps_per_epoch
from .models import count_parameters, without_weight_files
from .pretrain import load_pretrained
from .runtime import (
    Distributed,
    any_process,
    cpu_state,
    current_runtime,
    device,
    distributed,
    gather_to_main,
    mean_over_processes,
    seed_everything,
    synchronize,
    to_device,
)

MetricLogger = Callable[[dict[str, float], int], None]
RESUME_FORMAT = 1


class NonFiniteLoss(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the message names the run, term and step."""


@dataclass
class StageResult:
    metrics: dict[str, float]
    state_dict: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Resume:
    """Exact resume of one training stage: a checkpoint every ``every`` steps (0: never), handed to ``save``
    (``save(state, step)``: rank 0 writes it; None in the other processes), and ``state``, a checkpoint to
    continue from (None: start at step 0)."""

    every: int = 0
    state: dict[str, Any] | None = None
    save: Callable[[dict[str, Any], int], None] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0


# ------------------------------------------------------------------------------------------ optimizers, guards
def build_optimizer(params, cfg, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
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


def first_non_finite(terms: dict[str, Tensor]) -> str | None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            return name
    return None


def check_finite(terms: dict[str, Tensor], step: int, run: str) -> None:
    """Stop at the first NaN/inf term, naming it (e.g. ``loss/kd_fgd/P3/relation``), the run and the step."""
    name = first_non_finite(terms)
    if name is not None:
        raise _non_finite_term(terms, name, step, run)


def _non_finite_term(terms: dict[str, Tensor], name: str, step: int, run: str) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"{run}: loss term {name!r} is {terms[name].item()} at step {step}; lower the learning rate or the "
        "term's loss weight, or check the input data"
    )


def gradient_norm(params: list[Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def check_grad_norm(params: list[Tensor], step: int, run: str) -> float:
    norm = gradient_norm(params)
    if not math.isfinite(norm):
        raise NonFiniteLoss(
            f"{run}: gradient norm is {norm} at step {step} (the losses were finite); lower the learning rate or "
            "the loss weights"
        )
    return norm


# ------------------------------------------------------------------------------------------ resume states
def module_generators(modules: dict[str, nn.Module]) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` a module keeps as an attribute (MGD's mask stream), by ``name.path.attr``."""
    out: dict[str, torch.Generator] = {}
    for name, module in modules.items():
        for path, sub in module.named_modules():
            for attr, value in vars(sub).items():
                if isinstance(value, torch.Generator):
                    out[".".join(p for p in (name, path, attr) if p)] = value
    return out


def rng_state(modules: dict[str, nn.Module]) -> dict[str, Any]:
    """This process's random state: torch (CPU, and the CUDA device in use), Python, NumPy and the modules' own
    generators."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "generators": {name: g.get_state() for name, g in module_generators(modules).items()},
    }
    if device().type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device())
    return out


def set_rng_state(state: dict[str, Any], modules: dict[str, nn.Module]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    generators = module_generators(modules)
    for name, value in state["generators"].items():
        generators[name].set_state(value)
    if "cuda" in state and device().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device())


def _as_tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------ the loop
class TaskStep(nn.Module):
    """One training forward of a task model and the method's trainable modules beside it:
    ``forward(images, targets, step)`` returns the named loss terms and values only logged.

    With several processes ``DistributedDataParallel`` wraps this module, so the model and the distillation
    modules (``extra``: align convs, FGD's context blocks, MGD's generators) are averaged by one reducer; the
    frozen teacher is reached through ``kd_step`` only, so it stays outside."""

    def __init__(self, task, model: nn.Module, extra: nn.Module | None, kd_step) -> None:
        super().__init__()
        self.model = model
        self.extra = extra
        self.task = task
        self.kd_step = kd_step

    def forward(self, images, targets, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        losses, feats, extras = self.task.forward(self.model, images, targets)
        terms = {f"loss/{k}": v.float() for k, v in losses.items()}
        if self.kd_step is not None:
            terms.update({k: v.float() for k, v in self.kd_step(images, targets, feats, step, extras).items()})
        return terms, {}


def _wrap(step_module: nn.Module, geo: Geometry) -> nn.Module:
    """``step_module`` in DistributedDataParallel with several processes. Frozen parameters (MasKD's tokens, a
    frozen backbone stage) are left out of it. Every trainable parameter of every shipped method gets a gradient
    at every step (checked per method), so ``find_unused_parameters`` stays off: it would cost a graph
    traversal per step, and a plug-in that leaves one unused gets DDP's error naming it."""
    if geo.world_size == 1:
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in step_module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
    ids = [device().index or 0] if device().type == "cuda" else None
    return DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=False)


def fit(
    step_module: nn.Module,
    saved: dict[str, nn.Module],
    manifest,
    cfg,
    section: str,
    seed: int,
    log: MetricLogger,
    run: str,
    progress: bool,
    resume: Resume | None = None,
    guard_grad_norm: bool = True,
    log_every: int | None = None,
) -> dict[str, float]:
    """Train ``step_module`` (its forward returns ``(terms, logged)``) for ``cfg.iterations`` optimizer steps;
    ``saved`` names the modules a resume checkpoint holds. Returns the mean steady step time."""
    resume = resume or Resume()
    runtime, world = current_runtime(), distributed()
    task = get_task(manifest.task)
    train_set, _, _ = task.datasets(manifest)
    geo = geometry(cfg, section, world)
    if geo.sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(step_module)  # children replaced in place: ``saved`` sees them
    params = list(step_module.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer = build_optimizer(params, cfg, lr=cfg.lr * geo.lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = runtime.grad_scaler()
    start = resume.step
    if resume.state is not None:
        _load_resume(resume.state, saved, optimizer, scheduler, scaler, world)
    model = _wrap(step_module, geo)
    workers = getattr(getattr(manifest, "data", None), "workers", 0)
    batches = step_batches(train_set, task.collate, seed, geo, start, workers)
    step_module.train()
    log_every = log_every or getattr(cfg, "log_every", 10)
    skip_non_finite_grads = scaler.is_enabled()  # fp16: the scaler skips those steps on purpose
    step_times: list[float] = []
    bar = tqdm(
        range(start, cfg.iterations),
        desc=run,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
        initial=start,
        total=cfg.iterations,
    )
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        begin = None
        for micro in range(geo.accumulation):
            images, targets = to_device(next(batches))
            begin = begin or time.perf_counter()
            last = micro == geo.accumulation - 1
            sync = model.no_sync() if (geo.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                with runtime.autocast():
                    terms, logged = model(images, targets, step)
                total = sum(terms.values())
                bad = first_non_finite({**terms, "loss/total": total})
                if any_process(bad is not None):
                    if bad is None:
                        raise NonFiniteLoss(f"{run}: a loss term is not finite in another process at step {step}")
                    raise _non_finite_term({**terms, "loss/total": total}, bad, step, run)
                scaler.scale(total / geo.accumulation if geo.accumulation > 1 else total).backward()
            for name, value in {**terms, **logged, "loss/total": total}.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
        scaler.unscale_(optimizer)
        if guard_grad_norm and not skip_non_finite_grads:
            grad_norm = check_grad_norm(trainable, step, run)
        else:
            grad_norm = gradient_norm(trainable)
        if getattr(cfg, "grad_clip", 0) > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler may skip the first optimizer step, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            scheduler.step()
        synchronize()
        step_times.append(time.perf_counter() - begin)
        if step % log_every == 0 or step == cfg.iterations - 1:
            names = list(sums)
            means = mean_over_processes(torch.stack([sums[n] for n in names]) / geo.accumulation).tolist()
            values = dict(zip(names, means, strict=True))
            values.update(method_totals(values))
            if math.isfinite(grad_norm):  # not on fp16's skipped steps
                values["grad_norm"] = grad_norm
            values["lr"] = optimizer.param_groups[0]["lr"]
            if scaler.is_enabled():
                values["amp_scale"] = scaler.get_scale()
            if world.main:
                log(values, step)
            bar.set_postfix(loss=f"{values['loss/total']:.3f}")
        done = step + 1
        if resume.every and done % resume.every == 0 and done < cfg.iterations:
            state = _resume_state(done, saved, optimizer, scheduler, scaler, geo, train_set, cfg)
            if state is not None and resume.save is not None:
                resume.save(state, done)
    del batches  # stops the loader's worker processes
    steady = step_times[min(5, len(step_times) - 1) :] or step_times
    return {"step_time_s": sum(steady) / len(steady)} if steady else {}


def _resume_state(step, saved, optimizer, scheduler, scaler, geo: Geometry, train_set, cfg) -> dict[str, Any] | None:
    """The checkpoint after ``step`` optimizer steps, on rank 0 (None elsewhere): every process sends its RNG
    state, rank 0 keeps them with the rest (the same in every process)."""
    rngs = gather_to_main(rng_state(saved))
    if rngs is None:
        return None
    epoch, index = divmod(step, steps_per_epoch(len(train_set), geo.step_batch))
    return {
        "format": RESUME_FORMAT,
        "step": step,
        "epoch": epoch,  # the data position: step ``step`` is batch ``index`` of epoch ``epoch``
        "batch": index,
        "world_size": geo.world_size,
        "geometry": asdict(geo),
        "iterations": cfg.iterations,
        "modules": {name: cpu_state(module) for name, module in saved.items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
    }


def _load_resume(state, saved, optimizer, scheduler, scaler, world: Distributed) -> None:
    for name, module in saved.items():
        module.load_state_dict(state["modules"][name], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][world.rank], saved)


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
    resume: Resume | None = None,
    section: str = "student_train",
) -> dict[str, float]:
    """The shared supervised loop; ``kd_step(images, targets, student_feats, step, extras)`` adds named KD
    terms (``loss/kd_<method>/<term>``). ``run`` names the run in progress bars and errors."""
    saved = {"model": model} if extra is None else {"model": model, "extra": extra}
    step_module = TaskStep(get_task(manifest.task), model, extra, kd_step)
    return fit(step_module, saved, manifest, cfg, section, seed, log, run, progress, resume)


def method_totals(values: dict[str, float]) -> dict[str, float]:
    """``loss/kd_<method>``: the sum of that method's logged terms (``loss/kd_<method>/<term>``), for plots."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("loss/kd_") and key.count("/") >= 2:
            group = key.split("/", 2)[0] + "/" + key.split("/", 2)[1]
            out[group] = out.get(group, 0.0) + value
    return out


def load_model(manifest, role: str, state_dict: dict[str, Tensor]) -> nn.Module:
    # the checkpoint holds every value: the config's weight files would be read only to be overwritten
    model = get_task(manifest.task).build_model(without_weight_files(getattr(manifest, role)))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device())


def freeze(model: nn.Module) -> nn.Module:
    """Frozen teacher: no gradients, BatchNorm (and everything) in eval mode."""
    model.requires_grad_(False)
    return model.eval()


def train_model(
    manifest,
    role: str,
    seed: int,
    log: MetricLogger,
    progress: bool = True,
    run: str | None = None,
    resume: Resume | None = None,
    evaluate: bool = True,
) -> StageResult:
    """Train ``manifest.<role>`` (``teacher`` or ``student``) on the task alone and evaluate it (``evaluate``:
    the processes of a torchrun job other than rank 0 train only)."""
    task = get_task(manifest.task)
    section = "teacher_train" if role == "teacher" else "student_train"
    cfg_train = getattr(manifest, section)
    seed_everything(seed)
    model = task.build_model(getattr(manifest, role)).to(device())
    pretrained = load_pretrained(model, manifest, role, progress)  # [pretrain]: the body's start ({} when off)
    run = run or f"{manifest.task}/{role}/s{seed}"
    timing = train_loop(model, None, manifest, cfg_train, seed, None, log, run, progress, resume, section)
    if not evaluate:
        return StageResult({}, {})
    metrics = evaluate_model(manifest, model, progress)
    metrics.update(timing)
    metrics.update(pretrained)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, cpu_state(model))


def evaluate_model(manifest, model: nn.Module, progress: bool = True) -> dict[str, float]:
    """The task's metrics on val (logged under their own names: every choice is made on them) and, where the data
    have a held-out test split, on test as ``test/<metric>`` (what the tables report with ``protocol.eval_split =
    "test"``)."""
    task = get_task(manifest.task)
    _, val_set, gt = task.datasets(manifest)
    metrics = task.evaluate(model, manifest, val_set, gt, progress=progress)
    held_out = task.test_set(manifest)
    if held_out is not None:
        test_set, test_gt = held_out
        tested = task.evaluate(model, manifest, test_set, test_gt, progress=progress)
        metrics.update({f"test/{name}": value for name, value in tested.items()})
    return metrics


def evaluate_state(manifest, role: str, state_dict: dict[str, Tensor], progress: bool = True) -> StageResult:
    """Evaluate a cached checkpoint (no training): the metrics a training run would have logged, bar timing."""
    model = load_model(manifest, role, state_dict)
    metrics = evaluate_model(manifest, model, progress)
    metrics["params"] = float(count_parameters(model))
    metrics["added_params"] = 0.0
    return StageResult(metrics, state_dict)
