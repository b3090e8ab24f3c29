"""Golden checker: run this project's losses on reference cases made by the original authors' code.

A case directory holds ``golden.json`` (case name -> {loss, value, kwargs, inputs, grads, outputs, source, ...})
and the ``inputs_<case>.pt`` / ``grads_<case>.pt`` files it names (format: ``tests/data/reference/README.md`` §6).
Each case is dispatched on *what* it computes (its ``loss`` and ``source`` strings, and its kwargs), never on its
name or values, so directories with other shapes, seeds, token and box counts are checked the same way.

Comparison: the value by ``|ours - golden| / |golden|`` (pass at ``rtol_value``, 1e-10), each gradient tensor by
``max |ours - golden| / max |golden|`` (pass at ``rtol_grad``, 1e-8), with a floor on the denominator for gradients
that are zero up to round-off (see :func:`_rel`). Everything runs in float64 on one thread with
deterministic algorithms, as the reference data was generated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from baselines.cwd import ChannelWiseDivergence
from baselines.fgd import FGDFeatureLoss
from baselines.fitnet import FitNetMSE, MdistillerFitNet, MmrazorL2Loss
from maskd import MasKDLoss, MaskLearning, ReceptiveTokens, dice_coeff

RTOL_VALUE = 1e-10
RTOL_GRAD = 1e-8
ROUNDOFF_FLOOR = 1e-6


@dataclass
class CaseResult:
    """Outcome of one case. ``status`` is ``ok``, ``off`` (outside tolerance), ``missing`` (a file or entry is
    absent), ``unknown`` (no implementation recognises the case) or ``error`` (running it raised)."""

    name: str
    status: str
    value_rel: float = math.nan
    grad_rel: float = math.nan
    worst_grad: str = ""
    detail: str = ""
    grads_checked: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        parts = [f"{self.status.upper():7s} {self.name:34s}"]
        if not math.isnan(self.value_rel):
            parts.append(f"value rel {self.value_rel:.2e}")
        if self.grads_checked:
            parts.append(f"grads rel {self.grad_rel:.2e} (max of {self.grads_checked}, worst {self.worst_grad})")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


@dataclass
class Computed:
    """What a runner returns: the value and the gradients keyed as in the golden ``grads_*.pt`` file."""

    value: Tensor
    grads: dict[str, Tensor] = field(default_factory=dict)


Runner = Callable[[dict[str, Any], dict[str, Any], str], Computed]


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
    return Computed(dice, grads)


def run_maskd_loss(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    loss = MasKDLoss(
        kw["channels"],
        kw.get("num_tokens", 6),
        weight_head=bool(kw.get("weight_mask", True)),
        custom_mask=bool(kw.get("custom_mask", True)),
        custom_mask_warmup=int(kw.get("custom_mask_warmup", 1000)),
        loss_weight=float(kw.get("loss_weight", 1.0)),
        frozen=False,
        impl=impl,
    )
    loss.load_tokens(inputs.get("checkpoint_state_dict", inputs["state_dict"]))
    student, teacher = _levels(inputs, "y_s"), _levels(inputs, "y_t")
    leaves = [_leaf(s) for s in student]
    step = int(inputs["iter"]) if "iter" in inputs else int(kw.get("_iter", 0))
    value = loss(leaves, teacher, step=step)
    value.backward()
    grads = _level_grads(leaves, "y_s", "y_s" in inputs)
    grads.update(_param_grads(loss))
    return Computed(value, grads)


def run_maskd_segmentation(case, inputs, impl) -> Computed:
    kw = case["kwargs"]
    loss = MasKDLoss(
        [kw["channels"]],
        kw.get("num_tokens", 8),
        weight_head=False,
        custom_mask=False,
        variant="segmentation",
        frozen=False,
        impl=impl,
    )
    loss.load_tokens({"mask_module." + k: v for k, v in inputs["state_dict"].items()})
    student = _leaf(inputs["y_s"])
    value = loss(student, inputs["y_t"])
    value.backward()
    # The official segmentation loss holds one ``mask_module``; ours is level 0 of ``mask_modules``.
    grads = {"y_s": student.grad}
    grads.update(_param_grads(loss, rename=lambda k: k.replace("mask_modules.0.", "mask_module.")))
    return Computed(value, grads)


def run_fgd(case, inputs, impl) -> Computed:
    kw = dict(case["kwargs"])
    kw.pop("name", None)
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
    kw = {k: v for k, v in case["kwargs"].items() if k in ("loss_weight", "normalize", "mult", "div_element", "dist")}
    align = _align_convs(inputs["align_state_dict"], 1)[0]
    student = _leaf(inputs["y_s"])
    value = MmrazorL2Loss(**kw)(align(student), inputs["y_t"])
    value.backward()
    return Computed(value, {"y_s": student.grad})


def identify(case: dict[str, Any]) -> tuple[str, Runner] | None:
    """Which implementation computes this case, from its ``loss`` and ``source`` descriptions."""
    loss = str(case.get("loss", ""))
    source = str(case.get("source", ""))
    if "forward_mask" in loss:
        return "maskd.ReceptiveTokens.masks", run_mask_generation
    if loss.startswith("dice_coeff"):
        return "maskd.dice_coeff", run_dice
    if "forward_train" in loss:
        return "maskd.MaskLearning", run_mask_learning
    if "MasKDLoss" in loss:
        if "segmentation" in loss or "segmentation/" in source:
            return "maskd.MasKDLoss(variant='segmentation')", run_maskd_segmentation
        return "maskd.MasKDLoss", run_maskd_loss
    if "FeatureLoss" in loss or "fgd.py" in source:
        return "baselines.fgd.FGDFeatureLoss", run_fgd
    if "ChannelWiseDivergence" in loss or "cwd.py" in source:
        return "baselines.cwd.ChannelWiseDivergence", run_cwd
    if "ConvReg" in loss:
        return "baselines.fitnet.MdistillerFitNet", run_fitnet_convreg
    if "L2Loss" in loss:
        return "baselines.fitnet.MmrazorL2Loss", run_fitnet_l2
    if "MSELoss" in loss:
        return "baselines.fitnet.FitNetMSE", run_fitnet_mse
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
    scale = max(golden.abs().max().item(), ROUNDOFF_FLOOR * case_scale)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def check_case(
    directory: Path,
    name: str,
    case: dict[str, Any],
    impl: str = "fast",
    rtol_value: float = RTOL_VALUE,
    rtol_grad: float = RTOL_GRAD,
) -> CaseResult:
    found = identify(case)
    if found is None:
        return CaseResult(name, "unknown", detail=f"no implementation for loss {case.get('loss', '?')!r}")
    impl_name, runner = found
    files = {"inputs": case.get("inputs"), "grads": case.get("grads")}
    for role, fname in files.items():
        if role == "inputs" and not fname:
            return CaseResult(name, "missing", detail="golden.json names no inputs file")
        if fname and not (directory / fname).is_file():
            return CaseResult(name, "missing", detail=f"{role} file {fname} not found")
    inputs = torch.load(directory / files["inputs"], weights_only=True)
    golden_grads = torch.load(directory / files["grads"], weights_only=True) if files["grads"] else {}
    try:
        with reference_conditions():
            computed = runner(case, inputs, impl)
    except Exception as exc:  # report and carry on: one broken case must not hide the others
        return CaseResult(name, "error", detail=f"{impl_name}: {type(exc).__name__}: {exc}")
    golden_value = float(case["value"])
    ours = computed.value.item()
    value_rel = abs(ours - golden_value) / abs(golden_value) if golden_value != 0 else abs(ours)
    if not math.isfinite(ours):
        value_rel = math.inf
    grad_rel, worst, problems = 0.0, "", []
    case_scale = max((g.abs().max().item() for g in golden_grads.values() if g.numel()), default=0.0)
    for key, golden in golden_grads.items():
        mine = computed.grads.get(key)
        if mine is None:
            problems.append(f"no gradient for {key}")
            grad_rel, worst = math.inf, key
            continue
        r = _rel(mine, golden, case_scale)
        if r >= grad_rel:
            grad_rel, worst = r, key
    ok = value_rel <= rtol_value and grad_rel <= rtol_grad and not problems
    return CaseResult(
        name,
        "ok" if ok else "off",
        value_rel,
        grad_rel if golden_grads else math.nan,
        worst,
        "; ".join(problems) or impl_name,
        len(golden_grads),
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
        listed = json.loads(meta_path.read_text()).get("cases", [])
        results += [
            CaseResult(n, "missing", detail="listed in meta.json but not in golden.json")
            for n in listed
            if n not in cases
        ]
    named = {c.get("inputs") for c in cases.values()}
    results += [
        CaseResult(p.name[len("inputs_") : -len(".pt")], "unknown", detail=f"{p.name} has no golden.json entry")
        for p in sorted(directory.glob("inputs_*.pt"))
        if p.name not in named
    ]
    return results


def summary_line(results: list[CaseResult]) -> str:
    passed = sum(r.passed for r in results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "ok")
    verdict = "PASS" if passed == len(results) and results else "FAIL"
    return f"{verdict}: {passed}/{len(results)} cases within tolerance" + (f" ({detail})" if detail else "")
