"""Loss benchmark: forward+backward time and peak memory of every loss, fast vs literal vs a plain MSE.

Shapes are the paper's RetinaNet setting: batch 2, C = 256, the five FPN levels P3-P7 of an 800x1216 input
(100x152, 50x76, 25x38, 13x19, 7x10), T = 6 tokens, weight head and student-mask customisation on; FGD on P3 with
20 boxes per image; PKD on the same five levels; MGD on the five levels, each with its own generation block (3x3
conv 256->256, ReLU, 3x3 conv 256->256; no align conv, the student being 256-channel too), the block's parameters
trained (their gradients are part of the pass), lambda_mgd = 0.65. ``literal`` computes what the official code
computes, the way it does (the full [N, T, C, H, W] tensors, the head's 3x3 convolution in full, gradients into the
tokens and head); ``fast`` is this project's default form (tokens frozen for MasKD; PKD's one-pass statistics with
an analytic backward; MGD's float mask and folded scalar); ``mse`` is ``F.mse_loss`` summed over the same levels,
the floor.

Time: median of ``--repeats`` forward+backward passes after ``--warmup`` passes, all in one process, so the ratios
compare like with like. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one pass; on the CPU, which
has no allocator statistics, the peak resident set size above the resting one during one pass, in a fresh process
after its inputs are built and one warm-up pass (``--memory-case``; the kernel's high-water mark is reset first).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from baselines.cwd import ChannelWiseDivergence
from baselines.fgd import FGDFeatureLoss
from baselines.fitnet import FitNetMSE
from baselines.mgd import MGDLevels
from baselines.pkd import PKDLoss
from maskd import MasKDLoss, MaskLearning

FPN_SHAPES = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]  # P3-P7 of 800x1216 (strides 8..128)
IMAGE_HW = (800, 1216)
BATCH, CHANNELS, TOKENS, BOXES_PER_IMAGE = 2, 256, 6, 20

#: (loss, impl) pairs the benchmark runs, in table order.
CASES = [
    ("maskd", "fast"),
    ("maskd", "literal"),
    ("maskd", "mse"),
    ("maskd_tokens", "fast"),
    ("maskd_tokens", "literal"),
    ("fgd", "fast"),
    ("fgd", "literal"),
    ("fgd", "mse"),
    ("cwd", "fast"),
    ("cwd", "mse"),
    ("fitnet", "fast"),
    ("fitnet", "mse"),
    ("pkd", "fast"),
    ("pkd", "literal"),
    ("pkd", "mse"),
    ("mgd", "fast"),
    ("mgd", "literal"),
    ("mgd", "mse"),
]


@dataclass
class Row:
    loss: str
    impl: str
    fwd_bwd_ms: float
    peak_mem_mb: float
    repeats: int


def _features(levels, device, dtype, seed=0, channels=None):
    channels = channels or CHANNELS
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(BATCH, channels, h, w, generator=g).to(device, dtype) for h, w in levels]
    student = [
        (0.6 * t.cpu() + 0.8 * torch.randn(t.shape, generator=g)).to(device, dtype).requires_grad_() for t in teacher
    ]
    return student, teacher


def _boxes(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    boxes = []
    for _ in range(BATCH):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 8 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2])
        boxes.append(torch.cat([xy, xy + wh], 1).to(device, dtype))
    return boxes


def build_case(loss: str, impl: str, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """A closure running one forward+backward of ``loss`` in ``impl`` on fixed inputs."""
    if loss == "fgd":
        student, teacher = _features(FPN_SHAPES[:1], device, dtype)
    else:
        student, teacher = _features(FPN_SHAPES, device, dtype)
    params: list[torch.Tensor] = list(student)

    if impl == "mse":

        def fn():
            total = sum(F.mse_loss(s, t) for s, t in zip(student, teacher))
            total.backward()
    elif loss == "maskd":
        module = MasKDLoss(
            [CHANNELS] * 5,
            TOKENS,
            weight_head=True,
            custom_mask=True,
            custom_mask_warmup=0,
            loss_weight=7.0,
            frozen=impl == "fast",
            impl=impl,
        ).to(device, dtype)

        def fn():
            module(student, teacher, step=1).backward()
    elif loss == "maskd_tokens":
        module = MaskLearning([CHANNELS] * 5, TOKENS, weight_head=True, impl=impl).to(device, dtype)
        teacher_feats = [t.detach() for t in teacher]

        def fn():
            out = module(teacher_feats)
            (sum(f.square().mean() for f in out.features) + out.dice.sum()).backward()
    elif loss == "fgd":
        module = FGDFeatureLoss(
            CHANNELS,
            CHANNELS,
            temp=0.5,
            alpha_fgd=1e-3,
            beta_fgd=5e-4,
            gamma_fgd=5e-4,
            lambda_fgd=5e-6,
            impl=impl,
        ).to(device, dtype)
        boxes = _boxes(device, dtype)
        shapes = [IMAGE_HW] * BATCH

        def fn():
            module(student[0], teacher[0], boxes, shapes).backward()
    elif loss == "cwd":
        module = ChannelWiseDivergence(tau=1.0, loss_weight=10.0)

        def fn():
            module(student, teacher).backward()
    elif loss == "fitnet":
        # Identity-sized 1x1 align convs as in the MasKD repo's mimic configs (256 -> 256 per level).
        module = FitNetMSE([CHANNELS] * 5, [CHANNELS] * 5).to(device, dtype)

        def fn():
            module(student, teacher).backward()
    elif loss == "pkd":
        # mmrazor PKD detection configs: loss_weight 6 on the FPN outputs.
        module = PKDLoss(loss_weight=6.0, impl=impl)

        def fn():
            module(student, teacher).backward()
    elif loss == "mgd":
        # yzd-v/MGD RetinaNet configs: one FeatureLoss per FPN level, alpha 2e-5, lambda 0.65; the draws are fixed
        # inputs here (the official code draws them inside forward).
        module = MGDLevels([CHANNELS] * 5, [CHANNELS] * 5, alpha_mgd=2e-5, lambda_mgd=0.65, impl=impl).to(device, dtype)
        params += list(module.parameters())  # the generation blocks are trained: their grads are reset per pass
        g = torch.Generator().manual_seed(1)
        rand = [torch.rand(BATCH, 1, h, w, generator=g).to(device, dtype) for h, w in FPN_SHAPES]

        def fn():
            module(student, teacher, rand=rand).backward()
    else:
        raise ValueError(f"unknown benchmark case {loss}/{impl}")

    def run():
        for p in params:
            p.grad = None
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run.params = params  # type: ignore[attr-defined]
    return run


def _clear_grads(run) -> None:
    for p in run.params:
        p.grad = None


def time_case(run: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(loss: str, impl: str, device: str, dtype: torch.dtype) -> float:
    """Peak memory of one forward+backward (see the module docstring for how, per device)."""
    if device.startswith("cuda"):
        run = build_case(loss, impl, device, dtype)
        run()
        _clear_grads(run)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [
        sys.executable,
        "-m",
        "experiments.checks.bench_losses",
        "--memory-case",
        loss,
        impl,
        "--dtype",
        str(dtype).removeprefix("torch."),
    ]
    # A fixed mmap threshold makes glibc return every large block to the kernel when it is freed, so RSS
    # follows the live tensors instead of glibc's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_case(loss: str, impl: str, dtype: torch.dtype) -> float:
    """Peak RSS above the resting RSS during one pass, with the kernel's high-water mark reset first
    (``/proc/self/clear_refs``), after a warm-up pass so lazily built state is not counted."""
    run = build_case(loss, impl, "cpu", dtype)
    run()
    _clear_grads(run)  # the warm-up's gradients would otherwise be freed inside the measured pass
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def environment(device: str, dtype: torch.dtype) -> dict[str, str]:
    env = {
        "torch": torch.__version__,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_benchmark(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 5,
    cases=CASES,
    progress: bool = True,
) -> list[Row]:
    from tqdm import tqdm

    rows = []
    for loss, impl in tqdm(cases, desc="bench_losses", disable=not progress):
        ms = time_case(build_case(loss, impl, device, dtype), warmup, repeats)
        rows.append(Row(loss, impl, ms, peak_memory_mb(loss, impl, device, dtype), repeats))
    return rows


def _lookup(rows: list[Row], loss: str, impl: str) -> Row | None:
    return next((r for r in rows if r.loss == loss and r.impl == impl), None)


def targets(rows: list[Row]) -> list[tuple[str, float, str, bool]]:
    """The issue's targets as (description, measured ratio, target, met)."""
    out = []
    fast, literal, mse = (_lookup(rows, "maskd", i) for i in ("fast", "literal", "mse"))
    if fast and literal:
        r = literal.fwd_bwd_ms / fast.fwd_bwd_ms
        out.append(("MasKD literal / fast", r, ">= 10", r >= 10))
    if fast and mse:
        r = fast.fwd_bwd_ms / mse.fwd_bwd_ms
        out.append(("MasKD fast / mse", r, "<= 4", r <= 4))
    ffast, fliteral = _lookup(rows, "fgd", "fast"), _lookup(rows, "fgd", "literal")
    if ffast and fliteral:
        r = fliteral.fwd_bwd_ms / ffast.fwd_bwd_ms
        out.append(("FGD literal / fast", r, ">= 3", r >= 3))
    return out


def write_reports(rows: list[Row], out_dir: Path, env: dict[str, str], warmup: int) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_losses" if env["device"] == "cpu" else f"bench_losses_{env['device'].split(':')[0]}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    mse = {r.loss: r.fwd_bwd_ms for r in rows if r.impl == "mse"}
    fields = [
        "loss",
        "impl",
        "fwd_bwd_ms",
        "peak_mem_mb",
        "ratio_vs_mse",
        "repeats",
        "device",
        "dtype",
        "threads",
    ]
    tmp_csv, tmp_md = csv_path.with_suffix(".csv.tmp"), md_path.with_suffix(".md.tmp")
    with tmp_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "loss": r.loss,
                    "impl": r.impl,
                    "fwd_bwd_ms": f"{r.fwd_bwd_ms:.3f}",
                    "peak_mem_mb": f"{r.peak_mem_mb:.1f}",
                    "ratio_vs_mse": f"{r.fwd_bwd_ms / mse[r.loss]:.2f}" if r.loss in mse else "",
                    "repeats": r.repeats,
                    "device": env["device"],
                    "dtype": env["dtype"],
                    "threads": env["threads"],
                }
            )
    lines = [
        "# Loss benchmark (generated by `nox -s bench_losses`; do not edit)",
        "",
        f"Environment: torch {env['torch']}, device `{env['device']}`"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['threads']} threads)")
        + f", {env['dtype']}, Python {env['python']}.",
        "",
        "| loss | impl | fwd+bwd ms (median) | vs mse | peak mem MB |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.fwd_bwd_ms / mse[r.loss]:.2f}x" if r.loss in mse else ""
        lines.append(f"| {r.loss} | {r.impl} | {r.fwd_bwd_ms:.2f} | {ratio} | {r.peak_mem_mb:.1f} |")
    lines += ["", "## Targets", "", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for desc, value, target, met in targets(rows):
        lines.append(f"| {desc} | {value:.2f} | {target} | {'yes' if met else 'NO'} |")
    lines += [
        "",
        "## Protocol",
        "",
        f"- Shapes: batch {BATCH}, C={CHANNELS}, FPN levels P3-P7 of an {IMAGE_HW[0]}x{IMAGE_HW[1]} input "
        f"({', '.join(f'{h}x{w}' for h, w in FPN_SHAPES)}); T={TOKENS}; FGD on P3 with {BOXES_PER_IMAGE} boxes per "
        "image. `maskd`: stage-2 loss, weight head and customisation on; `maskd_tokens`: stage-1 masked features "
        "plus Dice; `pkd`: PKD (loss_weight 6) on the five levels; `mgd`: MGD on the five levels, one generation "
        "block (3x3 conv, ReLU, 3x3 conv, 256->256) per level whose parameter gradients are part of the pass; "
        "`mse`: `F.mse_loss` summed over the same levels.",
        "- `literal`: the official computation (full [N, T, C, H, W] tensors, the head's 3x3 conv in full, gradients "
        "into tokens and head; PKD's permuted copies and `torch.std`; MGD's integer mask); `fast`: this project's "
        "default (frozen tokens for `maskd`).",
        f"- Time: median of {rows[0].repeats if rows else 0} forward+backward passes after {warmup} warm-up passes, "
        "all cases in one process.",
        "- Peak memory: CUDA `max_memory_allocated` over one pass; on the CPU the peak RSS above the resting RSS "
        "during one pass in a fresh process (inputs built, one warm-up pass, kernel high-water mark reset), with "
        "glibc returning large blocks at once (`MALLOC_MMAP_THRESHOLD_`).",
    ]
    tmp_md.write_text("\n".join(lines) + "\n")
    tmp_csv.replace(csv_path)
    tmp_md.replace(md_path)
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_losses", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for the .md and .csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory-case", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        print(f"{_memory_case(*args.memory_case, dtype):.3f}")
        return 0
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (median of at least 5 runs)")
    rows = run_benchmark(args.device, dtype, args.warmup, args.repeats)
    env = environment(args.device, dtype)
    csv_path, md_path = write_reports(rows, args.out, env, args.warmup)
    print(md_path.read_text())
    print(json.dumps({"csv": str(csv_path), "md": str(md_path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
