"""Golden checker: run this project's losses on reference cases made by the original authors' code.

A case directory holds ``golden.json`` (case name -> {loss, value, kwargs, inputs, grads, outputs, source, ...})
and the ``inputs_<case>.pt`` / ``grads_<case>.pt`` / ``outputs_<case>.pt`` files it names (format:
``tests/data/reference/README.md`` §6). Each case is dispatched on *what* it computes (its ``loss`` and ``source``
strings, and its kwargs), never on its name or values, so directories with other shapes, seeds, level, token and
box counts are checked the same way.

Every implementation declares the reference keyword arguments it understands (:class:`Implementation`); a case
whose ``kwargs`` hold any other keyword is an ``error`` naming it, never silently dropped. A case file that
``torch.load`` refuses (corrupt, truncated, not weights-only) makes that case an ``error`` and the others still run.

MasKD loss cases (detection and segmentation) run twice: with trainable tokens (``frozen=False``, the official
autograd path, which also gives the token and head gradients) and through the frozen path used in training
(``frozen=True``: tokens frozen, masks under ``no_grad`` and, for ``impl="fast"``, the custom autograd function).
Both must match the golden value and student-feature gradients for the case to pass.

Comparison: the value by ``|ours - golden| / |golden|`` (pass at ``rtol_value``, 1e-10), each gradient tensor by
``max |ours - golden| / max |golden|`` (pass at ``rtol_grad``, 1e-8), with a floor on the denominator for gradients
that are zero up to round-off (see :func:`_rel`); intermediate outputs a runner reproduces (MGD's mask) the same
way as gradients. Everything runs in float64 on one thread with deterministic algorithms, as the reference data
was generated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from baselines.cwd import ChannelWiseDivergence
from baselines.fgd import FGDFeatureLoss
from baselines.fitnet import FitNetMSE, MdistillerFitNet, MmrazorL2Loss
from baselines.mgd import MGDLevels, MGDLoss
from baselines.pkd import PKDLoss, pkd_loss
from maskd import MasKDLoss, MaskLearning, ReceptiveTokens, dice_coeff

RTOL_VALUE = 1e-10
RTOL_GRAD = 1e-8
ROUNDOFF_FLOOR = 1e-6
#: Name of the extra MasKD check through the frozen training path.
FROZEN = "frozen"


@dataclass
class CaseResult:
    """Outcome of one case. ``status`` is ``ok``, ``off`` (outside tolerance), ``missing`` (a file or entry is
    absent), ``unknown`` (no implementation recognises the case) or ``error`` (a case file is unreadable, a
    keyword is not understood, or running it raised).

    ``checks`` holds the extra computations of the same case (e.g. ``"frozen"`` for the MasKD training path), each
    as ``(value rel, grad rel)``; ``outputs_rel`` the worst relative difference of the compared intermediates."""

    name: str
    status: str
    value_rel: float = math.nan
    grad_rel: float = math.nan
    worst_grad: str = ""
    detail: str = ""
    grads_checked: int = 0
    checks: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs_rel: float = math.nan
    outputs_checked: int = 0
    impl: str = "fast"

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        parts = [f"{self.status.upper():7s} {self.name:34s}"]
        if not math.isnan(self.value_rel):
            parts.append(f"value rel {self.value_rel:.2e}")
        if self.grads_checked:
            parts.append(f"grads rel {self.grad_rel:.2e} (max of {self.grads_checked}, worst {self.worst_grad})")
        if self.outputs_checked:
            parts.append(f"outputs rel {self.outputs_rel:.2e} (max of {self.outputs_checked})")
        for check, (v_rel, g_rel) in self.checks.items():
            parts.append(f"{check}: value rel {v_rel:.2e} grads rel {g_rel:.2e}")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


@dataclass
class Computed:
    """What a runner returns: the value, the gradients keyed as in the golden ``grads_*.pt`` file, intermediates
    keyed as in ``outputs_*.pt`` (compared where the golden file has them), and extra computations of the same
    case (``checks``: compared on the value and on every golden gradient that is not a ``params.*`` one)."""

    value: Tensor
    grads: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    checks: dict[str, Computed] = field(default_factory=dict)


RunnerFn = Callable[[dict[str, Any], dict[str, Any], str], Computed]


@dataclass(frozen=True)
class Implementation:
    """One of this project's implementations: its name, its runner, and the reference keyword arguments (the
    ``kwargs`` of a golden case) it understands. Any other keyword makes the case an error."""

    name: str
    run: RunnerFn
    kwargs: frozenset[str]

    def __iter__(self):  # ``impl_name, runner = identify(case)`` as before
        return iter((self.name, self.run))


class CaseError(Exception):
    """A case that cannot be checked as written (unreadable file, unknown keyword); reported as ``error``."""


# ---------------------------------------------------------------------------------------------------- helpers
def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _param_grads(
    module: nn.Module, prefix: str = "params.", rename: Callable[[str], str] = lambda k: k
) -> dict[str, Tensor]:
    return {prefix + rename(name): p.grad for name, p in module.named_parameters() if p.grad is not None}


def _levels(inputs: dict[str, Any], stem: str) -> list[Tensor] | None:
    """``y_s`` -> [y_s]; ``y_s_0, y_s_1, ...`` -> the list; None if neither is present."""
    if stem in inputs:
        return [inputs[stem]]
    out, i = [], 0
    while f"{stem}_{i}" in inputs:
        out.append(inputs[f"{stem}_{i}"])
        i += 1
    return out or None


def _level_grads(leaves: list[Tensor], stem: str, single: bool) -> dict[str, Tensor]:
    if single:
        return {stem: leaves[0].grad}
    return {f"{stem}_{i}": leaf.grad for i, leaf in enumerate(leaves)}


def _as_list(value: Any, name: str) -> list[Tensor]:
    """A tensor is one level; a list or tuple is one tensor per level."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        return list(value)
    raise ValueError(f"input {name} must be a tensor or a non-empty list of tensors, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------- runners
def run_mask_generation(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    tokens = ReceptiveTokens(kw["channels"], kw["num_tokens"], weight_head=bool(kw.get("weight_mask", False)))
    state = dict(inputs.get("state_dict") or {"mask_token": inputs["mask_token"]})
    tokens.load_state_dict(state, strict=True)
    x = _leaf(inputs["x"])
    value = tokens.masks(x).sum()
    value.backward()
    return Computed(value, {"x": x.grad})


def run_dice(case, inputs, impl) -> Computed:
    masks = _leaf(inputs["inputs"])
    value = dice_coeff(masks, eps=case["kwargs"].get("eps", 1e-12))
    value.backward()
    return Computed(value, {"inputs": masks.grad})


def run_mask_learning(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    learner = MaskLearning([kw["channels"]], kw["num_tokens"], weight_head=bool(kw["weight_mask"]), impl=impl)
    learner.mask_modules[0].load_state_dict(inputs["state_dict"], strict=True)
    tokens = learner.mask_modules[0]
    x = _leaf(inputs["x"])
    out = learner(x)
    dice = out.dice[0]
    dice.backward(retain_graph=True)
    grads = _param_grads(tokens, "dice.params.")
    learner.zero_grad(set_to_none=True)
    x.grad = None
    if "probe" in inputs:
        (out.features[0] * inputs["probe"]).sum().backward()
        grads.update(_param_grads(tokens, "probe.params."))
        grads["probe.x"] = x.grad
    return Computed(value=dice, grads=grads)


def _frozen_check(run: Callable[[], Computed]) -> Computed:
    """Run the frozen training path; its failure names the path."""
    try:
        return run()
    except Exception as exc:
        raise RuntimeError(f"frozen path: {type(exc).__name__}: {exc}") from exc


def run_maskd_loss(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    student, teacher = _levels(inputs, "y_s"), _levels(inputs, "y_t")
    if student is None or teacher is None:
        raise ValueError("inputs hold neither y_s/y_t nor y_s_0/y_t_0, ...")
    single = "y_s" in inputs
    step = int(inputs["iter"]) if "iter" in inputs else int(kw.get("_iter", 0))
    checkpoint = inputs.get("checkpoint_state_dict", inputs.get("state_dict"))

    def compute(frozen: bool) -> Computed:
        loss = MasKDLoss(
            kw["channels"],
            kw.get("num_tokens", 6),
            weight_head=bool(kw.get("weight_mask", True)),
            custom_mask=bool(kw.get("custom_mask", True)),
            custom_mask_warmup=int(kw.get("custom_mask_warmup", 1000)),
            loss_weight=float(kw.get("loss_weight", 1.0)),
            frozen=frozen,
            impl=impl,
        )
        loss.load_tokens(checkpoint)
        leaves = [_leaf(s) for s in student]
        value = loss(leaves, teacher, step=step)
        value.backward()
        grads = _level_grads(leaves, "y_s", single)
        if not frozen:
            grads.update(_param_grads(loss))
        return Computed(value, grads)

    result = compute(frozen=False)
    result.checks[FROZEN] = _frozen_check(lambda: compute(frozen=True))
    return result


def run_maskd_segmentation(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    state = {"mask_module." + k: v for k, v in inputs["state_dict"].items()}

    def compute(frozen: bool) -> Computed:
        loss = MasKDLoss(
            [kw["channels"]],
            kw.get("num_tokens", 8),
            weight_head=False,
            custom_mask=False,
            variant="segmentation",
            frozen=frozen,
            impl=impl,
        )
        loss.load_tokens(state)
        student = _leaf(inputs["y_s"])
        value = loss(student, inputs["y_t"])
        value.backward()
        grads = {"y_s": student.grad}
        if not frozen:
            # The official segmentation loss holds one ``mask_module``; ours is level 0 of ``mask_modules``.
            grads.update(_param_grads(loss, rename=lambda k: k.replace("mask_modules.0.", "mask_module.")))
        return Computed(value, grads)

    result = compute(frozen=False)
    result.checks[FROZEN] = _frozen_check(lambda: compute(frozen=True))
    return result


def run_fgd(case, inputs, impl) -> Computed:
    kw = dict(case["kwargs"])
    kw.pop("name", None)  # the reference's loss name, unused inside the module
    loss = FGDFeatureLoss(**kw, impl=impl)
    loss.load_state_dict(inputs["state_dict"], strict=True)
    student = _leaf(inputs["preds_S"])
    value = loss(student, inputs["preds_T"], list(inputs["gt_bboxes"]), inputs["img_shapes"])
    value.backward()
    grads = {"preds_S": student.grad}
    grads.update(_param_grads(loss))
    return Computed(value, grads)


def run_cwd(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    loss = ChannelWiseDivergence(tau=float(kw.get("tau", 1.0)), loss_weight=float(kw.get("loss_weight", 1.0)))
    student = _leaf(inputs["preds_S"])
    value = loss(student, inputs["preds_T"])
    value.backward()
    return Computed(value, {"preds_S": student.grad})


def _align_convs(state: dict[str, Tensor], levels: int) -> nn.ModuleList:
    """1x1 align convs from a golden ``align_state_dict`` ({weight, bias} or {"<i>.weight", ...})."""
    if levels == 1 and "weight" in state:
        state = {"0." + k: v for k, v in state.items()}
    convs = nn.ModuleList()
    for i in range(levels):
        w = state[f"{i}.weight"]
        convs.append(nn.Conv2d(w.shape[1], w.shape[0], 1))
    convs.load_state_dict(state, strict=True)
    return convs


def run_fitnet_mse(case, inputs, impl) -> Computed:
    student, teacher = _levels(inputs, "y_s"), _levels(inputs, "y_t")
    single = "y_s" in inputs
    loss = FitNetMSE(
        [s.shape[1] for s in student],
        [t.shape[1] for t in teacher],
        loss_weight=float(case["kwargs"].get("loss_weight", 1.0)),
    )
    loss.align.load_state_dict(_align_convs(inputs["align_state_dict"], len(student)).state_dict(), strict=True)
    leaves = [_leaf(s) for s in student]
    value = loss(leaves if not single else leaves[0], teacher if not single else teacher[0])
    value.backward()
    grads = _level_grads(leaves, "y_s", single)
    if single:
        grads.update({f"align.{k}": p.grad for k, p in loss.align[0].named_parameters()})
    return Computed(value, grads)


def run_fitnet_convreg(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    student = _leaf(inputs["y_s"])
    loss = MdistillerFitNet(
        tuple(inputs["y_s"].shape),
        tuple(inputs["y_t"].shape),
        feat_weight=float(kw.get("feat_loss_weight", 100.0)),
        use_relu=bool(kw.get("use_relu", True)),
    )
    loss.load_state_dict(inputs["state_dict"], strict=True)
    loss.train(bool(kw.get("train_mode", True)))
    value = loss(student, inputs["y_t"])
    value.backward()
    return Computed(value, {"y_s": student.grad})


def run_fitnet_l2(case, inputs, impl) -> Computed:
    align = _align_convs(inputs["align_state_dict"], 1)[0]
    student = _leaf(inputs["y_s"])
    value = MmrazorL2Loss(**case["kwargs"])(align(student), inputs["y_t"])
    value.backward()
    return Computed(value, {"y_s": student.grad})


def run_pkd(case, inputs, impl) -> Computed:
    """``preds_S`` / ``preds_T``: lists of per-level tensors (one element: the official single-tensor call, made
    with the tensors themselves). Gradient keys ``preds_S.<i>`` (and ``preds_S`` for a bare tensor input)."""
    kw = case["kwargs"]
    student, teacher = _as_list(inputs["preds_S"], "preds_S"), _as_list(inputs["preds_T"], "preds_T")
    loss_weight, resize_stu = float(kw.get("loss_weight", 1.0)), bool(kw.get("resize_stu", True))
    leaves = [_leaf(s) for s in student]
    s_arg, t_arg = (leaves[0], teacher[0]) if len(leaves) == 1 and len(teacher) == 1 else (leaves, teacher)
    if impl == "literal":
        value = pkd_loss(s_arg, t_arg, loss_weight=loss_weight, resize_stu=resize_stu)
    else:
        value = PKDLoss(loss_weight=loss_weight, resize_stu=resize_stu, impl=impl)(s_arg, t_arg)
    value.backward()
    grads = {f"preds_S.{i}": leaf.grad for i, leaf in enumerate(leaves)}
    if isinstance(inputs["preds_S"], Tensor):
        grads["preds_S"] = leaves[0].grad
    return Computed(value, grads)


def _level_state(state: Any, levels: int) -> dict[str, Tensor]:
    """Per-level MGD parameters as :class:`MGDLevels` keys, from a list of per-level state dicts or one dict
    with ``"<i>."``-prefixed keys."""
    if isinstance(state, (list, tuple)):
        if len(state) != levels:
            raise ValueError(f"state_dict holds {len(state)} level states for {levels} levels")
        return {f"levels.{i}.{k}": v for i, s in enumerate(state) for k, v in s.items()}
    return {f"levels.{k}": v for k, v in state.items()}


def _channel_list(value: Any, levels: int) -> list[int]:
    return [int(c) for c in value] if isinstance(value, (list, tuple)) else [int(value)] * levels


def run_mgd(case, inputs, impl) -> Computed:
    """``preds_S``, ``preds_T``, ``rand`` (the uniform draw), ``state_dict`` (``align.*`` when Cs != Ct,
    ``generation.{0,2}.*``). Gradient keys ``preds_S`` and ``params.<name>``; output ``mask``.

    Lists of per-level tensors (and per-level draws and states) run :class:`MGDLevels`, with keys ``preds_S.<i>``,
    ``params.<i>.<name>`` and ``mask.<i>``."""
    kw = case["kwargs"]
    alpha, lam = float(kw.get("alpha_mgd", 2e-5)), float(kw.get("lambda_mgd", 0.65))
    if isinstance(inputs["preds_S"], Tensor):
        student, teacher = inputs["preds_S"], inputs["preds_T"]
        loss = MGDLoss(
            int(kw.get("student_channels", student.shape[1])),
            int(kw.get("teacher_channels", teacher.shape[1])),
            alpha_mgd=alpha,
            lambda_mgd=lam,
            impl=impl,
        )
        loss.load_state_dict(inputs["state_dict"], strict=True)
        leaf = _leaf(student)
        value, mask = loss(leaf, teacher, rand=inputs["rand"], return_mask=True)
        value.backward()
        grads = {"preds_S": leaf.grad}
        grads.update(_param_grads(loss))
        return Computed(value, grads, {"mask": mask})
    student, teacher = _as_list(inputs["preds_S"], "preds_S"), _as_list(inputs["preds_T"], "preds_T")
    levels = len(student)
    loss = MGDLevels(
        _channel_list(kw.get("student_channels", [s.shape[1] for s in student]), levels),
        _channel_list(kw.get("teacher_channels", [t.shape[1] for t in teacher]), levels),
        alpha_mgd=alpha,
        lambda_mgd=lam,
        impl=impl,
    )
    loss.load_state_dict(_level_state(inputs["state_dict"], levels), strict=True)
    leaves = [_leaf(s) for s in student]
    value, masks = loss(leaves, teacher, rand=_as_list(inputs["rand"], "rand"), return_masks=True)
    value.backward()
    grads = {f"preds_S.{i}": leaf.grad for i, leaf in enumerate(leaves)}
    grads.update(_param_grads(loss, rename=lambda k: k.removeprefix("levels.")))
    return Computed(value, grads, {f"mask.{i}": m for i, m in enumerate(masks)})


def _impl(name: str, run: RunnerFn, *kwargs: str) -> Implementation:
    return Implementation(name, run, frozenset(kwargs))


MASK_GENERATION = _impl("maskd.ReceptiveTokens.masks", run_mask_generation, "channels", "num_tokens", "weight_mask")
DICE = _impl("maskd.dice_coeff", run_dice, "eps")
MASK_LEARNING = _impl("maskd.MaskLearning", run_mask_learning, "channels", "num_tokens", "weight_mask")
MASKD_LOSS = _impl(
    "maskd.MasKDLoss",
    run_maskd_loss,
    "channels",
    "num_tokens",
    "weight_mask",
    "custom_mask",
    "custom_mask_warmup",
    "pretrained",  # the checkpoint itself is the case's ``checkpoint_state_dict`` / ``state_dict`` input
    "loss_weight",
    "_iter",
)
# ``use_prob`` and ``weight_s_mask_warmup`` are accepted and unused by the reference segmentation loss too.
MASKD_SEGMENTATION = _impl(
    "maskd.MasKDLoss(variant='segmentation')",
    run_maskd_segmentation,
    "channels",
    "num_tokens",
    "use_prob",
    "weight_s_mask_warmup",
    "pretrained",
)
PKD = _impl("baselines.pkd.PKDLoss", run_pkd, "loss_weight", "resize_stu")
MGD = _impl("baselines.mgd.MGDLoss", run_mgd, "student_channels", "teacher_channels", "name", "alpha_mgd", "lambda_mgd")
FGD = _impl(
    "baselines.fgd.FGDFeatureLoss",
    run_fgd,
    "student_channels",
    "teacher_channels",
    "name",
    "temp",
    "alpha_fgd",
    "beta_fgd",
    "gamma_fgd",
    "lambda_fgd",
)
CWD = _impl("baselines.cwd.ChannelWiseDivergence", run_cwd, "tau", "loss_weight")
FITNET_CONVREG = _impl(
    "baselines.fitnet.MdistillerFitNet", run_fitnet_convreg, "feat_loss_weight", "use_relu", "train_mode"
)
FITNET_L2 = _impl(
    "baselines.fitnet.MmrazorL2Loss", run_fitnet_l2, "loss_weight", "normalize", "mult", "div_element", "dist"
)
FITNET_MSE = _impl("baselines.fitnet.FitNetMSE", run_fitnet_mse, "loss_weight")


def identify(case: dict[str, Any]) -> Implementation | None:
    """Which implementation computes this case, from its ``loss`` and ``source`` descriptions and its kwargs.

    PKD and MGD are recognised before FGD: the MGD reference class is also called ``FeatureLoss``."""
    loss = str(case.get("loss", ""))
    source = str(case.get("source", ""))
    kwargs = case.get("kwargs")
    keys = set(kwargs) if isinstance(kwargs, dict) else set()
    if "forward_mask" in loss:
        return MASK_GENERATION
    if loss.startswith("dice_coeff"):
        return DICE
    if "forward_train" in loss:
        return MASK_LEARNING
    if "MasKDLoss" in loss:
        if "segmentation" in loss or "segmentation/" in source:
            return MASKD_SEGMENTATION
        return MASKD_LOSS
    if "PKDLoss" in loss or "pkd_loss" in source:
        return PKD
    if "MGD" in loss or "mgd.py" in source or "alpha_mgd" in keys:
        return MGD
    if "FeatureLoss" in loss or "fgd.py" in source:
        return FGD
    if "ChannelWiseDivergence" in loss or "cwd.py" in source:
        return CWD
    if "ConvReg" in loss:
        return FITNET_CONVREG
    if "L2Loss" in loss:
        return FITNET_L2
    if "MSELoss" in loss:
        return FITNET_MSE
    return None


# ---------------------------------------------------------------------------------------------------- checking
@contextmanager
def reference_conditions() -> Iterator[None]:
    """float64 default dtype, one thread, deterministic algorithms; restored afterwards."""
    old = (torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_default_dtype(old[0])
        torch.set_num_threads(old[1])
        torch.use_deterministic_algorithms(old[2])


def _rel(ours: Tensor, golden: Tensor, case_scale: float) -> float:
    """``max |ours - golden| / max(max |golden|, ROUNDOFF_FLOOR * case_scale)``.

    The floor matters only for gradients that are zero up to round-off in the reference (FGD's ``conv_mask``
    biases, to which a softmax is invariant, come out as ~1e-17): they are compared on the case's scale, the
    largest gradient magnitude among the case's tensors, instead of on their own noise.
    """
    golden = golden.to(torch.float64)
    ours = ours.detach().to(torch.float64)
    if ours.shape != golden.shape:
        return math.inf
    if golden.numel() == 0:
        return 0.0
    diff = (ours - golden).abs().max().item()
    if math.isnan(diff):
        return math.inf
    scale = max(golden.abs().max().item(), ROUNDOFF_FLOOR * case_scale)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _load(directory: Path, fname: str, role: str) -> dict[str, Any]:
    """``torch.load`` one case file (weights only); anything it refuses, or a non-dict, is a :class:`CaseError`."""
    try:
        data = torch.load(directory / fname, weights_only=True)
    except Exception as exc:
        raise CaseError(f"{role} file {fname} is unreadable: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CaseError(f"{role} file {fname} holds a {type(data).__name__}, expected a dict")
    return data


def _check_kwargs(case: dict[str, Any], impl: Implementation) -> None:
    kwargs = case.get("kwargs")
    if kwargs is None:
        case["kwargs"] = {}
        return
    if not isinstance(kwargs, dict):
        raise CaseError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - impl.kwargs)
    if unknown:
        more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
        raise CaseError(
            f"unknown keyword {unknown[0]!r}{more} in kwargs; this implementation accepts "
            f"{', '.join(sorted(impl.kwargs))}"
        )


def _compare_grads(
    ours: dict[str, Tensor], golden: dict[str, Tensor], keys: Sequence[str], case_scale: float
) -> tuple[float, str, list[str]]:
    worst_rel, worst, problems = 0.0, "", []
    for key in keys:
        mine = ours.get(key)
        if mine is None:
            problems.append(f"no gradient for {key}")
            worst_rel, worst = math.inf, key
            continue
        r = _rel(mine, golden[key], case_scale)
        if r >= worst_rel:
            worst_rel, worst = r, key
    return worst_rel, worst, problems


def _value_rel(value: Tensor, golden_value: float) -> float:
    ours = value.item()
    if not math.isfinite(ours):
        return math.inf
    return abs(ours - golden_value) / abs(golden_value) if golden_value != 0 else abs(ours)


def check_case(
    directory: Path,
    name: str,
    case: dict[str, Any],
    impl: str = "fast",
    rtol_value: float = RTOL_VALUE,
    rtol_grad: float = RTOL_GRAD,
) -> CaseResult:
    directory = Path(directory)
    if not isinstance(case, dict):
        return CaseResult(name, "error", detail=f"golden.json entry is a {type(case).__name__}, not an object")
    found = identify(case)
    if found is None:
        return CaseResult(name, "unknown", detail=f"no implementation for loss {case.get('loss', '?')!r}", impl=impl)
    case = dict(case)
    files = {"inputs": case.get("inputs"), "grads": case.get("grads"), "outputs": case.get("outputs")}
    for role, fname in files.items():
        if role == "inputs" and not fname:
            return CaseResult(name, "missing", detail="golden.json names no inputs file", impl=impl)
        if fname and not (directory / fname).is_file():
            return CaseResult(name, "missing", detail=f"{role} file {fname} not found", impl=impl)
    try:
        _check_kwargs(case, found)
        golden_value = float(case["value"])
        inputs = _load(directory, files["inputs"], "inputs")
        golden_grads = _load(directory, files["grads"], "grads") if files["grads"] else {}
        golden_outputs = _load(directory, files["outputs"], "outputs") if files["outputs"] else {}
        bad = next((k for k, v in golden_grads.items() if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise CaseError(f"grads file {files['grads']} entry {bad!r} is not a tensor")
    except CaseError as exc:
        return CaseResult(name, "error", detail=f"{found.name}: {exc}", impl=impl)
    except (KeyError, TypeError, ValueError) as exc:
        return CaseResult(name, "error", detail=f"{found.name}: bad golden.json entry: {_one_line(exc)}", impl=impl)
    try:
        with reference_conditions():
            computed = found.run(case, inputs, impl)
    except Exception as exc:  # report and carry on: one broken case must not hide the others
        return CaseResult(name, "error", detail=f"{found.name}: {_one_line(exc)}", impl=impl)

    value_rel = _value_rel(computed.value, golden_value)
    case_scale = max((g.abs().max().item() for g in golden_grads.values() if g.numel()), default=0.0)
    grad_rel, worst, problems = _compare_grads(computed.grads, golden_grads, list(golden_grads), case_scale)
    ok = value_rel <= rtol_value and grad_rel <= rtol_grad

    out_keys = [k for k in computed.outputs if isinstance(golden_outputs.get(k), Tensor)]
    outputs_rel = max((_rel(computed.outputs[k], golden_outputs[k], 0.0) for k in out_keys), default=math.nan)
    if out_keys:
        ok = ok and outputs_rel <= rtol_grad

    # Extra computations of the same case (the MasKD frozen path): value and the non-parameter gradients.
    feature_keys = [k for k in golden_grads if not k.startswith("params.")]
    checks = {}
    for check, extra in computed.checks.items():
        c_value = _value_rel(extra.value, golden_value)
        c_grad, c_worst, c_problems = _compare_grads(extra.grads, golden_grads, feature_keys, case_scale)
        checks[check] = (c_value, c_grad)
        problems += [f"{check}: {p}" for p in c_problems]
        if not (c_value <= rtol_value and c_grad <= rtol_grad):
            ok = False
            problems.append(f"{check} path off (worst {c_worst or 'value'})")
    ok = ok and not problems
    return CaseResult(
        name,
        "ok" if ok else "off",
        value_rel,
        grad_rel if golden_grads else math.nan,
        worst,
        "; ".join(problems) or found.name,
        len(golden_grads),
        checks,
        outputs_rel,
        len(out_keys),
        impl,
    )


def check_golden(
    directory: str | Path, impl: str = "fast", rtol_value: float = RTOL_VALUE, rtol_grad: float = RTOL_GRAD
) -> list[CaseResult]:
    """Check every case of ``directory``. Cases named by ``meta.json`` but absent from ``golden.json``, and
    ``inputs_*.pt`` files with no entry, are reported as ``missing`` and ``unknown``."""
    directory = Path(directory)
    golden_path = directory / "golden.json"
    if not golden_path.is_file():
        raise FileNotFoundError(f"{golden_path} not found: a golden case directory needs golden.json")
    cases: dict[str, dict[str, Any]] = json.loads(golden_path.read_text())
    results = [check_case(directory, name, case, impl, rtol_value, rtol_grad) for name, case in cases.items()]
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            listed = json.loads(meta_path.read_text()).get("cases", [])
        except (ValueError, AttributeError) as exc:
            results.append(CaseResult("meta.json", "error", detail=f"unreadable: {_one_line(exc)}", impl=impl))
            listed = []
        results += [
            CaseResult(n, "missing", detail="listed in meta.json but not in golden.json", impl=impl)
            for n in listed
            if n not in cases
        ]
    named = {c.get("inputs") for c in cases.values() if isinstance(c, dict)}
    results += [
        CaseResult(
            p.name[len("inputs_") : -len(".pt")], "unknown", detail=f"{p.name} has no golden.json entry", impl=impl
        )
        for p in sorted(directory.glob("inputs_*.pt"))
        if p.name not in named
    ]
    return results


def _summary(results: list[CaseResult]) -> str:
    passed = sum(r.passed for r in results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "ok")
    verdict = "PASS" if passed == len(results) and results else "FAIL"
    return f"{verdict}: {passed}/{len(results)} cases within tolerance" + (f" ({detail})" if detail else "")


def summary_line(results: list[CaseResult]) -> str:
    """``PASS: n/n cases within tolerance`` or ``FAIL: k/n ... (error 1, off 2)``. Results of several impls
    (``--impl both``) get one ``[impl] ...`` line each before the overall line, which stays last."""
    impls = list(dict.fromkeys(r.impl for r in results))
    if len(impls) <= 1:
        return _summary(results)
    lines = [f"[{i}] " + _summary([r for r in results if r.impl == i]) for i in impls]
    return "\n".join([*lines, _summary(results)])
