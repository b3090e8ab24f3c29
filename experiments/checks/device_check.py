"""GPU path check of every loss: ``python -m experiments.checks.device_check --out DIR`` on a machine with CUDA.

Needs only torch (the losses are pure torch), so it runs on a bare GPU image. It checks, and writes
``DIR/device_check.{md,json}``:

1. **CPU vs CUDA, float64**: each loss's value and every gradient (inputs and trainable parameters) on CUDA
   against the CPU, for the fast and the literal form. The CPU float64 forms are held to the authors' golden
   values by ``maskd-bench check-golden``, so this carries that check over to CUDA.
2. **fast vs literal on CUDA, float32**.
3. **Autocast** (bf16 and fp16) on CUDA: finite, and the relative difference from float32.
4. **DDP**: two ranks (gloo, both on the one GPU) train a student conv + align conv with the MasKD loss on half
   a batch each, in float64 (TF32 convolutions in float32 would blur the comparison to ~1e-4); after one backward
   the synchronised gradients must equal one process's on the whole batch.

Tolerances are stated next to each check. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from baselines.cwd import ChannelWiseDivergence
from baselines.fgd import FGDFeatureLoss
from baselines.fitnet import FitNetMSE
from maskd import MasKDLoss, MaskLearning

CHANNELS = 32
LEVELS = [(16, 16), (8, 8), (4, 4)]
BATCH = 4
IMAGE_HW = (128, 128)


@dataclass
class Check:
    name: str
    passed: bool
    value: float  # the measured error or difference
    tolerance: float
    detail: str = ""


# ------------------------------------------------------------------------------------------ cases
def _inputs(seed: int = 0, channels: int = CHANNELS, levels=LEVELS):
    g = torch.Generator().manual_seed(seed)
    teacher = [3 * torch.randn(BATCH, channels, h, w, generator=g, dtype=torch.float64) for h, w in levels]
    student = [0.6 * t + 0.8 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in teacher]
    boxes = []
    for _ in range(BATCH):
        xy = torch.rand(3, 2, generator=g, dtype=torch.float64) * 100
        wh = 8 + torch.rand(3, 2, generator=g, dtype=torch.float64) * 20
        boxes.append(torch.cat([xy, xy + wh], 1))
    return student, teacher, boxes


def _cases() -> dict[str, tuple[Callable[[str], nn.Module], Callable[..., Tensor], int]]:
    """name -> (build(impl), call(module, student, teacher, boxes) -> scalar, channels)."""

    def maskd_det(impl):
        return MasKDLoss([CHANNELS] * 3, 6, weight_head=True, custom_mask=True, custom_mask_warmup=0, impl=impl)

    def maskd_seg(impl):
        return MasKDLoss([11], 8, weight_head=False, custom_mask=False, variant="segmentation", impl=impl)

    def maskd_unfrozen(impl):
        return MasKDLoss([CHANNELS] * 3, 6, weight_head=True, custom_mask=False, frozen=False, impl=impl)

    def tokens(impl):
        return MaskLearning([CHANNELS] * 3, 6, weight_head=True, impl=impl)

    def fgd(impl):
        return FGDFeatureLoss(
            CHANNELS, CHANNELS, temp=0.5, alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6, impl=impl
        )

    def call_maskd(m, s, t, b):
        return m(s, t, step=1)

    def call_tokens(m, s, t, b):
        out = m([x.detach() for x in t])
        return sum(f.square().mean() for f in out.features) + out.dice.sum()

    def call_fgd(m, s, t, b):
        return m(s[0], t[0], b, [IMAGE_HW] * BATCH)

    def call_plain(m, s, t, b):
        return m(s, t)

    return {
        "maskd_detection": (maskd_det, call_maskd, CHANNELS),
        "maskd_segmentation": (maskd_seg, call_maskd, 11),
        "maskd_unfrozen_tokens": (maskd_unfrozen, call_maskd, CHANNELS),
        "mask_learning": (tokens, call_tokens, CHANNELS),
        "fgd": (fgd, call_fgd, CHANNELS),
        "cwd": (lambda impl: ChannelWiseDivergence(tau=4.0, loss_weight=3.0), call_plain, CHANNELS),
        "fitnet": (lambda impl: FitNetMSE([CHANNELS] * 3, [CHANNELS] * 3), call_plain, CHANNELS),
    }


def _run_case(build, call, channels, impl: str, device: str, dtype: torch.dtype, autocast: torch.dtype | None = None):
    """Value and gradients (student inputs, then trainable parameters) of one forward+backward."""
    torch.manual_seed(0)
    module = build(impl).to(torch.float64)
    student, teacher, boxes = _inputs(channels=channels, levels=LEVELS if channels == CHANNELS else [(16, 16)])
    # Non-zero trainable parameters everywhere (some official inits are zeros), identical on every device.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    module = module.to(device, dtype)
    student = [s.to(device, dtype).requires_grad_() for s in student]
    teacher = [t.to(device, dtype) for t in teacher]
    boxes = [b.to(device, dtype) for b in boxes]
    ctx = torch.autocast(device.split(":")[0], dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        value = call(module, student, teacher, boxes)
    value.backward()
    grads = [s.grad for s in student] + [p.grad for p in module.parameters() if p.requires_grad]
    return value.detach().double().cpu(), [g.detach().double().cpu() if g is not None else None for g in grads]


def _rel(a: Tensor, b: Tensor) -> float:
    scale = max(b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() / scale


def _compare(name, ours, ref, tol_value, tol_grad) -> list[Check]:
    (v1, g1), (v0, g0) = ours, ref
    checks = [Check(f"{name}: value", _rel(v1, v0) <= tol_value, _rel(v1, v0), tol_value)]
    if len(g1) != len(g0) or any((a is None) != (b is None) for a, b in zip(g1, g0)):
        return [*checks, Check(f"{name}: gradients", False, math.inf, tol_grad, "gradient sets differ")]
    pairs = [(a, b) for a, b in zip(g1, g0) if a is not None]
    # One scale per case (the largest reference gradient), as the golden checker: near-zero gradients
    # (e.g. FGD's conv bias, invariant under its softmax) are judged against it, not against themselves.
    scale = max((b.abs().max().item() for _, b in pairs), default=1.0)
    worst = max(((a - b).abs().max().item() / max(scale, 1e-12) for a, b in pairs), default=0.0)
    checks.append(Check(f"{name}: {len(pairs)} gradients", worst <= tol_grad, worst, tol_grad))
    return checks


def loss_checks(device: str) -> list[Check]:
    checks: list[Check] = []
    for name, (build, call, ch) in _cases().items():
        impls = ["fast", "literal"] if name not in ("cwd", "fitnet") else ["fast"]
        for impl in impls:
            cpu = _run_case(build, call, ch, impl, "cpu", torch.float64)
            gpu = _run_case(build, call, ch, impl, device, torch.float64)
            checks += _compare(f"{name}/{impl} {device} vs cpu float64", gpu, cpu, 1e-10, 1e-8)
        if len(impls) == 2:
            fast = _run_case(build, call, ch, "fast", device, torch.float32)
            lit = _run_case(build, call, ch, "literal", device, torch.float32)
            checks += _compare(f"{name} fast vs literal {device} float32", fast, lit, 1e-4, 1e-3)
        ref = _run_case(build, call, ch, "fast", device, torch.float32)
        for amp, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            out = _run_case(build, call, ch, "fast", device, torch.float32, autocast=amp)
            finite = math.isfinite(out[0].item()) and all(g is None or torch.isfinite(g).all() for g in out[1])
            rel = _rel(out[0], ref[0])
            checks.append(
                Check(
                    f"{name} autocast {str(amp).split('.')[-1]} vs float32 (value)",
                    finite and rel <= tol,
                    rel,
                    tol,
                    "" if finite else "non-finite value or gradient",
                )
            )
    return checks


# ------------------------------------------------------------------------------------------ DDP
class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.align = nn.Conv2d(16, CHANNELS, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.align(torch.relu(self.body(x)))


def _ddp_data(device):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64).to(device)
    teacher = (3 * torch.randn(BATCH, CHANNELS, 16, 16, generator=g, dtype=torch.float64)).to(device)
    return images, teacher


def _ddp_loss(model, loss, images, teacher):
    return loss(model(images), teacher, step=10)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = "cuda:0"
    torch.manual_seed(0)
    model = _Student().to(device, torch.float64)
    loss = MasKDLoss([CHANNELS], 6, weight_head=True, custom_mask=True, custom_mask_warmup=5).to(device, torch.float64)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
    images, teacher = _ddp_data(device)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    _ddp_loss(ddp, loss, images[part], teacher[part]).backward()
    if rank == 0:
        torch.save({n: p.grad.cpu() for n, p in model.named_parameters()}, out_file)
    dist.barrier()
    dist.destroy_process_group()


def ddp_check(device: str) -> list[Check]:
    torch.manual_seed(0)
    model = _Student().to(device, torch.float64)
    loss = MasKDLoss([CHANNELS], 6, weight_head=True, custom_mask=True, custom_mask_warmup=5).to(device, torch.float64)
    images, teacher = _ddp_data(device)
    _ddp_loss(model, loss, images, teacher).backward()
    single = {n: p.grad.cpu() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        ddp = torch.load(out, weights_only=True)
    worst = max(_rel(ddp[n], single[n]) for n in single)
    return [Check("DDP 2 ranks (gloo, one GPU) vs one process, MasKD gradients, float64", worst <= 1e-10, worst, 1e-10)]


# ------------------------------------------------------------------------------------------ report
def markdown(checks: list[Check], env: dict[str, str]) -> str:
    lines = [
        "# GPU path check of the losses",
        "",
        "Generated by `python -m experiments.checks.device_check` (see its docstring for what each check means). "
        f"Environment: {', '.join(f'{k} {v}' for k, v in env.items())}.",
        "",
        "| check | result | error / difference | tolerance | note |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.value:.2e} | {c.tolerance:.0e} | {c.detail} |"
        )
    passed = sum(c.passed for c in checks)
    lines += ["", f"{passed}/{len(checks)} checks passed.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-ddp", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available on this machine", file=sys.stderr)
        return 2
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    checks = loss_checks(args.device)
    if not args.no_ddp and args.device.startswith("cuda"):
        checks += ddp_check(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(checks, env)
    (args.out / "device_check.md").write_text(md)
    (args.out / "device_check.json").write_text(json.dumps([asdict(c) for c in checks], indent=2))
    print(md)
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
