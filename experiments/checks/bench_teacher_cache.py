"""Teacher-cache benchmark: a distillation step with the teacher's features looked up vs computed, and the fill.

For each embedded task (its default manifest; ``--set`` changes it), a randomly initialised teacher (the timing
does not depend on its training) and, for MasKD, untrained receptive tokens: the CWD and MasKD students train
``--steps`` optimizer steps with ``distill.teacher_cache`` off (``live``: the frozen teacher runs on every batch)
and on (``cached``: :mod:`experiments.engine.teacher_outputs`), interleaved in one process (``--rounds`` times,
live then cached for each method), so that the ratios compare like with like on a machine whose load drifts.
Step time: the interval between the training loop's consecutive per-step logs (data, forward, backward, optimizer
step), median over the steps after the first two of every round. The cache is filled once per task before the
runs (timed; the throwaway file of the random teacher is deleted at the end), and its size and load time recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.engine import checkpoints as ckpt
from experiments.engine import stages
from experiments.engine import teacher_outputs as outputs
from experiments.engine.batches import geometry
from experiments.engine.manifest import load_manifest, parse_override
from experiments.engine.paths import cache_root
from experiments.tasks import get_task

MANIFESTS = {"detection": "embedded_detection", "segmentation": "embedded_segmentation"}
METHODS = ("cwd", "maskd")
SKIPPED_STEPS = 2  # per run: the loader's first batch and the allocator's first steps


@dataclass
class Row:
    task: str
    method: str
    mode: str  # live | cached
    step_ms: float  # median
    steps: int  # steps timed, all rounds
    ratio: float  # cached / live (1 for live)


@dataclass
class Fill:
    task: str
    features: str
    images: int
    micro_batch: int
    fill_s: float
    load_s: float
    size_mib: float


def _manifest(name: str, cached: bool, steps: int, sets: list[str]):
    overrides = {
        "distill": {"teacher_cache": cached},
        "student_train": {"iterations": steps, "warmup_iters": 0, "log_every": 1, "checkpoint_every": 0},
    }
    base = load_manifest(name, None, sets)
    if hasattr(base, "pretrain") and getattr(base.pretrain, "enabled", False):
        # the student's body pretraining (computed once, cached) would dominate a timing run and is not timed here
        overrides["pretrain"] = {"enabled": False}
    if base.maskd.custom_mask and base.maskd.custom_mask_warmup >= steps:
        overrides["maskd"] = {"custom_mask_warmup": SKIPPED_STEPS}  # time the customised masks, as most steps run
    return load_manifest(name, overrides, sets)


def _step_times(m, method: str, teacher_state, token_state) -> list[float]:
    stamps: list[float] = []

    def log(values, step) -> None:
        stamps.append(time.perf_counter())

    stages.train_student(m, method, 0, teacher_state, token_state, log, progress=False, evaluate=False)
    return [b - a for a, b in zip(stamps, stamps[1:])][SKIPPED_STEPS:]


def bench_task(task_name: str, steps: int, rounds: int, sets: list[str], progress: bool) -> tuple[list[Row], Fill]:
    name = MANIFESTS[task_name]
    live_m, cached_m = (_manifest(name, cached, steps, sets) for cached in (False, True))
    task = get_task(live_m.task)
    torch.manual_seed(0)
    teacher_state = stages.cpu_state(task.build_model(live_m.teacher))
    token_state = stages.cpu_state(stages.build_mask_learner(live_m))
    teacher = stages.freeze(stages.load_model(cached_m, "teacher", teacher_state))
    names = cached_m.features_for(METHODS[0])  # a method with other features fills its own file before its steps
    micro = geometry(cached_m.student_train, "student_train").micro_batch
    key = outputs.outputs_key(cached_m, teacher, names, micro)
    path = cache_root() / "teacher_outputs" / f"{key}.pt"
    ckpt.remove(path)  # time a fill, not a load
    task.datasets(cached_m)  # nor the scenes' generation
    filled = outputs.load_or_compute(cached_m, teacher, names, micro, progress)
    loaded = outputs.load_or_compute(cached_m, teacher, names, micro, progress)
    fill = Fill(
        task_name,
        " ".join(names),
        next(iter(filled.features.values())).shape[0],
        micro,
        filled.seconds,
        loaded.seconds,
        path.stat().st_size / 2**20,
    )
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for method in METHODS:
            for mode, m in (("live", live_m), ("cached", cached_m)):
                times.setdefault((method, mode), []).extend(_step_times(m, method, teacher_state, token_state))
    rows = []
    for method in METHODS:
        live = statistics.median(times[(method, "live")]) * 1e3
        for mode in ("live", "cached"):
            ms = statistics.median(times[(method, mode)]) * 1e3
            rows.append(Row(task_name, method, mode, ms, len(times[(method, mode)]), ms / live))
    for method in METHODS:  # the throwaway caches of the random teacher
        own = outputs.outputs_key(cached_m, teacher, cached_m.features_for(method), micro)
        ckpt.remove(path.with_name(f"{own}.pt"))
    return rows, fill


def environment(device: str) -> dict[str, str]:
    env = {
        "torch": torch.__version__,
        "device": device,
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_reports(
    rows: list[Row], fills: list[Fill], out_dir: Path, env: dict[str, str], steps: int, rounds: int, note: str
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_teacher_cache" if env["device"] == "cpu" else f"bench_teacher_cache_{env['device'].split(':')[0]}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    fill_of = {f.task: f for f in fills}
    fields = [
        "task",
        "method",
        "mode",
        "step_ms",
        "ratio_cached_live",
        "steps_timed",
        "fill_s",
        "cache_mib",
        "load_s",
        "device",
        "threads",
    ]
    tmp_csv, tmp_md = csv_path.with_suffix(".csv.tmp"), md_path.with_suffix(".md.tmp")
    with tmp_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            f = fill_of[r.task]
            writer.writerow(
                {
                    "task": r.task,
                    "method": r.method,
                    "mode": r.mode,
                    "step_ms": f"{r.step_ms:.1f}",
                    "ratio_cached_live": f"{r.ratio:.3f}",
                    "steps_timed": r.steps,
                    "fill_s": f"{f.fill_s:.2f}",
                    "cache_mib": f"{f.size_mib:.1f}",
                    "load_s": f"{f.load_s:.2f}",
                    "device": env["device"],
                    "threads": env["threads"],
                }
            )
    lines = [
        "# Teacher-cache benchmark (generated by `nox -s bench_teacher_cache`; do not edit)",
        "",
        f"Environment: torch {env['torch']}, device `{env['device']}`"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['threads']} threads, {env['cores']} cores)")
        + f", Python {env['python']}.",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "| task | method | live step ms | cached step ms | cached / live |",
        "|---|---|---:|---:|---:|",
    ]
    for task in dict.fromkeys(r.task for r in rows):
        for method in METHODS:
            live = next(r for r in rows if (r.task, r.method, r.mode) == (task, method, "live"))
            cached = next(r for r in rows if (r.task, r.method, r.mode) == (task, method, "cached"))
            lines.append(f"| {task} | {method} | {live.step_ms:.0f} | {cached.step_ms:.0f} | {cached.ratio:.2f} |")
    lines += [
        "",
        "| task | features | images | fill batch | fill s | cache MiB | load s | fill / live cwd steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in fills:
        live = next(r for r in rows if (r.task, r.method, r.mode) == (f.task, "cwd", "live"))
        cached = next(r for r in rows if (r.task, r.method, r.mode) == (f.task, "cwd", "cached"))
        saved = (live.step_ms - cached.step_ms) / 1e3
        breakeven = f"{f.fill_s / saved:.0f}" if saved > 0 else "never"
        lines.append(
            f"| {f.task} | {f.features} | {f.images} | {f.micro_batch} | {f.fill_s:.1f} | {f.size_mib:.1f} | "
            f"{f.load_s:.2f} | {breakeven} |"
        )
    lines += [
        "",
        "## Protocol",
        "",
        "- Default embedded manifests (students, batch, data) with a randomly initialised teacher and, for MasKD, "
        "untrained tokens; the student's body pretraining is off (not what is timed).",
        f"- Each run: {steps} optimizer steps; step time = interval between consecutive per-step logs (data, forward, "
        f"backward, optimizer), the first {SKIPPED_STEPS} of each run dropped; median over {rounds} round(s) of "
        "live and cached runs interleaved per method, in one process.",
        "- Fill: every training image's teacher features, once, in batches of the training micro-batch (what keeps "
        "the cached path bitwise equal to the live one). `fill / live cwd steps`: how many CWD steps the cache "
        "must serve to repay its fill (one student run of the default manifests is "
        + " / ".join(f"{load_manifest(name).student_train.iterations} ({task})" for task, name in MANIFESTS.items())
        + " steps; every method, weight and seed of a table reuses one fill).",
    ]
    tmp_md.write_text("\n".join(lines) + "\n")
    tmp_csv.replace(csv_path)
    tmp_md.replace(md_path)
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_teacher_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for the .md and .csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="live/cached run pairs per method")
    parser.add_argument("--tasks", nargs="+", default=list(MANIFESTS), choices=list(MANIFESTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="manifest override")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--note", default="", help="a line written under the environment (e.g. machine load)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < SKIPPED_STEPS + 3:
        parser.error(f"--steps must be at least {SKIPPED_STEPS + 3}")
    for text in args.set:
        parse_override(text)  # a malformed --set fails before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    fills: list[Fill] = []
    with stages.use_runtime(stages.Runtime(args.device)):
        for task in args.tasks:
            task_rows, fill = bench_task(task, args.steps, args.rounds, args.set, not args.no_progress)
            rows += task_rows
            fills.append(fill)
    env = environment(args.device)
    csv_path, md_path = write_reports(rows, fills, args.out, env, args.steps, args.rounds, args.note)
    print(md_path.read_text())
    print(json.dumps({"csv": str(csv_path), "md": str(md_path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
