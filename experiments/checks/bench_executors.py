"""Executor benchmark: the same table with ``--executor local`` and ``--executor ray`` (a local Ray cluster, 2
workers x 1 torch thread), end to end, alternating, in one session: writes ``reports/bench_executors.{md,csv}``.

Each run is the real command (``maskd-bench reproduce`` or ``maskd-bench run``) in a fresh process, on a fresh
sqlite store and a fresh cache (scenes, checkpoints), so nothing is reused and both pay the same set-up; the local
executor runs with a torch thread per core (``local``) or with one (``local-1t``, the default of ``--stage-cpus``).
Times: the command's wall clock (imports and the Ray cluster's start included) and the table's own ``wall_time_s``
where the command writes one. The ratio is this configuration's time / Ray's (above 1: Ray is faster). Each
configuration's runs are compared with Ray's, metric by metric.

    python -m experiments.checks.bench_executors --out reports                       # the smoke table
    python -m experiments.checks.bench_executors --case smoke --case segmentation-1  # + a reduced default
    python -m experiments.checks.bench_executors --executors local local-1t ray      # + local at 1 thread
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: name -> (maskd-bench arguments, what it is). ``{uri}`` and ``{out}`` are filled per run.
CASES: dict[str, tuple[list[str], str]] = {
    "smoke": (
        ["reproduce", "--profile", "smoke", "--tracking-uri", "{uri}", "--out", "{out}"],
        "the smoke table (2 tasks, 30 stages)",
    ),
    "segmentation-1": (
        ["run", "embedded_segmentation", "--methods", "baseline", "maskd", "--seeds", "0", "1",
         "--tracking-uri", "{uri}"],
        "a reduced default table: the default segmentation manifest, teacher + tokens + baseline and MasKD x 2 seeds",
    ),
}  # fmt: skip
RAY = ["--executor", "ray", "--ray-address", "local", "--ray-cpus", "2", "--stage-cpus", "1"]
#: The configurations compared: ``local`` with a torch thread per core, ``local-1t`` with one torch thread (the
#: threads of a Ray stage: its metrics are then bitwise those of ``ray``), ``ray``.
EXECUTORS = ("local", "local-1t", "ray")


@dataclass
class Measurement:
    case: str
    executor: str
    repeat: int
    wall_s: float
    table_s: float  # the parent run's wall_time_s (NaN when the command logs none)
    load_before: float
    load_after: float
    returncode: int


def _one(case: str, executor: str, repeat: int, root: Path) -> tuple[Measurement, str]:
    work = root / f"{case}-{executor}-{repeat}"
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    args = [a.format(uri=uri, out=work / "out") for a in CASES[case][0]]
    local = ["--executor", "local", "--stage-cpus", "1" if executor == "local-1t" else str(os.cpu_count() or 1)]
    cmd = [sys.executable, "-m", "experiments.cli", *args, "--no-progress", *(RAY if executor == "ray" else local)]
    env = {**os.environ, "MASKD_BENCH_CACHE": str(work / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    after = os.getloadavg()[0]
    return Measurement(case, executor, repeat, wall, _table_seconds(uri), load, after, proc.returncode), uri


def _table_seconds(uri: str) -> float:
    from experiments.engine.tracking import Tracker

    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.kind = 'table'")
    return float(runs[0].data.metrics.get("wall_time_s", math.nan)) if runs else math.nan


def _metrics(uri: str) -> dict[tuple[str, ...], dict[str, float]]:
    from experiments.engine.tracking import Tracker

    tracker = Tracker(uri)
    out = {}
    for run in tracker.client.search_runs([tracker.experiment_id], max_results=5000):
        tags = run.data.tags
        if tags.get("kind") in ("teacher", "tokens", "student") and run.info.status == "FINISHED":
            out[(tags["kind"], tags["task"], tags["method"], tags["seed"])] = run.data.metrics
    return out


def max_difference(a: str, b: str) -> tuple[int, float]:
    """Stages compared and the largest absolute difference of any final metric (timings excepted)."""
    ma, mb = _metrics(a), _metrics(b)
    worst = 0.0
    for key in set(ma) & set(mb):
        for name, value in ma[key].items():
            other = mb[key].get(name)
            if other is None or "time" in name or (math.isnan(value) and math.isnan(other)):
                continue
            worst = max(worst, abs(value - other))
    return len(set(ma) & set(mb)), worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: smoke")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--executors", nargs="+", choices=EXECUTORS, default=["local", "ray"])
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    cases = args.case or ["smoke"]
    rows: list[Measurement] = []
    diffs: dict[tuple[str, str], tuple[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as tmp:
        for case in cases:
            for repeat in range(args.repeats):
                uris = {}
                for executor in args.executors:
                    m, uris[executor] = _one(case, executor, repeat, Path(tmp))
                    print(
                        f"{case:16s} {executor:5s} #{repeat}: {m.wall_s:7.1f} s end to end, table {m.table_s:7.1f} s"
                        f"  (load {m.load_before:.1f} -> {m.load_after:.1f}, exit {m.returncode})",
                        flush=True,
                    )
                    if m.returncode != 0:
                        print((Path(tmp) / f"{case}-{executor}-{repeat}" / "log.txt").read_text()[-3000:])
                    rows.append(m)
                for executor in args.executors:
                    if executor != "ray" and "ray" in uris:
                        diffs[(case, executor)] = max_difference(uris[executor], uris["ray"])
    write(rows, diffs, cases, args.out)
    return 0 if all(r.returncode == 0 for r in rows) else 1


def write(
    rows: list[Measurement], diffs: dict[tuple[str, str], tuple[int, float]], cases: list[str], out: Path
) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    with (out / "bench_executors.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "executor", "repeat", "wall_s", "table_s", "load_before", "load_after", "returncode"])
        for r in rows:
            writer.writerow(
                [r.case, r.executor, r.repeat, f"{r.wall_s:.2f}", f"{r.table_s:.2f}", r.load_before, r.load_after,
                 r.returncode]
            )  # fmt: skip
    env = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
        f"ray {_ray_version()}"
    )
    lines = [
        "# Executors: local vs Ray (2 workers x 1 torch thread) on one machine",
        "",
        f"Environment: {env}. Measured in one session, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, by "
        "`python -m experiments.checks.bench_executors` (`nox -s bench_executors`).",
        "",
        "| case | executor | repeat | end to end (s) | table (s) | this / ray, end to end | this / ray, table | "
        "1-min load before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        for repeat in sorted({r.repeat for r in rows if r.case == case}):
            pair = {r.executor: r for r in rows if r.case == case and r.repeat == repeat}
            ray = pair.get("ray")
            for r in pair.values():
                ratio_wall = f"{r.wall_s / ray.wall_s:.2f}" if ray and r is not ray else ""
                ratio_table = (
                    f"{r.table_s / ray.table_s:.2f}" if ray and r is not ray and math.isfinite(ray.table_s) else ""
                )
                table = f"{r.table_s:.1f}" if math.isfinite(r.table_s) else "–"
                lines.append(
                    f"| {case} | {r.executor} | {repeat} | {r.wall_s:.1f} | {table} | {ratio_wall} | {ratio_table} | "
                    f"{r.load_before:.1f} |"
                )
    lines += ["", "Cases:", ""]
    for case in cases:
        lines.append(f"- `{case}`: {CASES[case][1]}.")
    for (case, executor), (n, worst) in diffs.items():
        lines.append(
            f"- `{case}`, `{executor}` vs `ray` (last repeat): {n} stages compared, largest absolute difference of any "
            f"final metric {worst:.3g} (timings excepted)."
        )
    lines += [
        "",
        "Protocol: each run is the real command in a fresh process, with a fresh sqlite store and a fresh cache, so "
        "every stage is computed (no reuse) and every configuration pays the same data generation. `local`: the "
        "stages one after another in the driver, a torch thread per core (`--stage-cpus` = cores); `local-1t`: the "
        "same with one torch thread (`--stage-cpus 1`), the thread count of a Ray stage here, so its metrics must "
        "equal Ray's exactly, while `local`'s differ by the order of float reductions, which a few iterations from "
        "scratch amplify (the smoke numbers are meaningless). `ray`: `--executor ray --ray-address local "
        "--ray-cpus 2 --stage-cpus 1`, i.e. a Ray cluster started by the command, 2 workers of 1 torch thread; the "
        "end-to-end time includes the cluster's start and each worker's imports. \"table\" is the parent run's "
        "`wall_time_s` (from opening the parent run to the table's runs being done). The machine was shared with "
        "other work during the session; the 1-min load average is recorded beside each run.",
        "",
    ]
    (out / "bench_executors.md").write_text("\n".join(lines))
    print(f"wrote {out / 'bench_executors.md'} and {out / 'bench_executors.csv'}")


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
