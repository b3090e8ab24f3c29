"""``nox -s reproduce_table``: run (or reuse) everything for the embedded main table and write it from MLflow."""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..cpu_isa import cpu_kernels, cpu_model
from ..engine.executors import Executor, LocalExecutor, StageGraph
from ..engine.manifest import Manifest, load_manifest
from ..engine.pipeline import Pipeline
from ..engine.tracking import Tracker, parent_tags
from ..tasks import get_task
from .export import EXPORT_NAME, TableRecord, read_export, write_export
from .report import main_table, markdown, on_split, runs_frame, with_choices, write_table
from .tuning import (
    Choice,
    add_main,
    add_tuning,
    check_reported,
    choose,
    table_rows,
    tunes,
    tuning_markdown,
    tuning_table,
)

PROFILES: dict[str, list[str]] = {
    "default": ["embedded_detection", "embedded_segmentation"],
    "smoke": ["embedded_detection_smoke", "embedded_segmentation_smoke"],
}


def default_out_dir(profile: str) -> Path:
    # relative to where the command runs (nox runs from the repository root), never into an installed package's tree
    base = Path.cwd() / "reports" / "embedded"
    return base if profile == "default" else base / profile


def environment_line(executor: Executor | None = None) -> str:
    """Where the runs ran; the torch threads are each stage's (``--stage-cpus``), which are part of its hash."""
    threads = getattr(executor, "threads", None) or torch.get_num_threads()
    runner = f", {executor.name} executor" if executor is not None else ""
    return (
        f"torch {torch.__version__} on {platform.machine()} CPU ({cpu_model()}), {os.cpu_count()} cores, "
        f"{threads} torch thread{'s' if threads != 1 else ''} per stage{runner}, CPU kernels {cpu_kernels()}, "
        f"Python {platform.python_version()}"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )


class TableError(RuntimeError):
    """The runs behind a table are incomplete or not finite; no table is written."""


def check_runs(frame, manifests: list[Manifest]) -> None:
    """Every run the table needs is FINISHED, once, with a finite metric (a FAILED attempt beside its retried
    FINISHED run is not counted)."""
    frame = table_rows(frame)  # the tuning runs are checked by tuning.choose
    for m in manifests:
        metric = get_task(m.task).primary_metric
        sub = frame[frame.task == m.task] if not frame.empty else frame
        for method in ["teacher", *m.methods]:
            rows = sub[(sub.method == method) & (sub.status == "FINISHED")] if not sub.empty else sub
            expected = 1 if method == "teacher" else len(m.protocol.seeds)
            if len(rows) != expected:
                raise TableError(f"{m.task}/{method}: {len(rows)} runs in MLflow, expected {expected}")
            bad = [r for r in rows[metric] if not math.isfinite(float(r))]
            if bad:
                raise TableError(f"{m.task}/{method}: non-finite {metric} {bad}")


def export_mask_figures(tracker: Tracker, parent_id: str, out_dir: Path) -> list[Path]:
    """Copy each task's receptive-token mask grid (logged with its token-learning run) to ``out_dir``."""
    written = []
    for run in tracker.children(parent_id):
        if run.data.tags.get("kind") != "tokens":
            continue
        source = run.data.tags.get("reused_from", run.info.run_id)
        try:
            png = tracker.download(source, "figures/masks.png")
        except Exception:  # a store without the artifact: the table stands without the figure
            continue
        target = out_dir / f"masks_{run.data.tags.get('task', 'task')}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png.read_bytes())
        written.append(target)
    return written


def table_choices(frame, manifests: list[Manifest]) -> list[Choice]:
    """Each tuned manifest's loss-weight choices, made on the val metrics of its tuning runs."""
    return [c for m in manifests if tunes(m) for c in choose(frame, m).values()]


def write_main_table(out_dir: Path, check: bool = False) -> tuple[Path, ...] | list[Path]:
    """``main_table.md`` and ``.csv`` (and, where the manifests tune the loss weights, ``tuning.md`` and ``.csv``)
    in ``out_dir`` from ``out_dir/runs.jsonl`` alone (no store, no training). With ``check``, nothing is written:
    the paths of the committed files that differ are returned."""
    record, runs = read_export(out_dir / EXPORT_NAME)
    manifests = [load_manifest(name) for name in record.manifests]
    frame = runs_frame(runs)
    check_runs(frame, manifests)
    choices = table_choices(frame, manifests)
    for m in manifests:
        if tunes(m):
            check_reported(frame, m, choose(frame, m))
    reported = on_split(table_rows(frame), manifests)
    table = with_choices(main_table(reported, {m.task: m.teacher.arch for m in manifests}), manifests, choices)
    md = markdown(
        table, manifests, record.environment, record.wall_time_s, record.profile, record.parent_run_id, choices
    )

    def write(target: Path) -> list[Path]:
        written = list(write_table(table, md, target))
        if choices:
            tuning_md = tuning_markdown(choices, manifests, record.parent_run_id)
            written += write_table(tuning_table(choices), tuning_md, target, stem="tuning")
        return written

    if not check:
        return tuple(write(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write(Path(tmp))
        return [out_dir / f.name for f in fresh if not _same(out_dir / f.name, f)]


def _same(committed: Path, fresh: Path) -> bool:
    return committed.is_file() and committed.read_bytes() == fresh.read_bytes()


def rebuild_tables(reports: Path, check: bool = False) -> tuple[list[Path], list[Path]]:
    """Every table under ``reports`` that has a shipped export beside it, rebuilt from the export (``nox -s
    tables``); with ``check``, only compared. Returns (tables handled, tables that differ)."""
    from .ablations import write_ablation_table  # it builds on this module

    handled, differing = [], []
    for export in sorted(reports.rglob(f"*.{EXPORT_NAME}")):  # an ablation's record: <knob>.runs.jsonl
        result = write_ablation_table(export, check=check)
        stem = export.name[: -len(EXPORT_NAME) - 1]
        handled += [export.parent / f"{stem}{suffix}" for suffix in (".csv", ".md", ".png")]
        if check:
            differing += result
    for export in sorted(reports.rglob(EXPORT_NAME)):
        out_dir = export.parent
        result = write_main_table(out_dir, check=check)
        handled += [out_dir / "main_table.csv", out_dir / "main_table.md"]
        if check:
            differing += result
        else:
            handled += [p for p in result if p.stem == "tuning"]
    return handled, differing


def _run_graph(executor: Executor, graph: StageGraph, pipeline: Pipeline, parent_id: str, desc: str, progress: bool):
    with tqdm(total=len(graph), desc=desc, unit="run", disable=not progress, dynamic_ncols=True) as overall:
        executor.run(graph, pipeline, parent_id, overall)


def reproduce(
    profile: str = "default",
    tracking_uri: str | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    reuse: bool = True,
    runtime=None,
    executor: Executor | None = None,
) -> tuple[Path, Path, str]:
    """Run or reuse every stage of ``profile`` with ``executor`` (default: in this process), then write the table
    from MLflow; nothing is written unless every run it needs is FINISHED."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    manifests = [load_manifest(name) for name in PROFILES[profile]]  # every manifest checked before any work
    out_dir = out_dir or default_out_dir(profile)
    tracker = Tracker(tracking_uri)
    tracker.fail_stale_runs()
    pipeline = Pipeline(tracker, progress=progress, reuse=reuse, runtime=runtime)
    start = time.perf_counter()
    tags = parent_tags("table", profile=profile)
    params = {f"manifest.{m.task}": m.name for m in manifests}
    with tracker.run(f"table/{profile}", tags, params) as parent:
        parent_id = parent.info.run_id
        executor = executor or LocalExecutor()
        # Phase 1, the equal tuning budget: teachers, tokens and every method x weight multiplier at the tuning
        # seed, then the choices on val. Phase 2: every seed at the chosen weights (the tuning seed's run at the
        # chosen weight is the same stage, reused).
        tuning = StageGraph()
        for m in manifests:
            if tunes(m):
                add_tuning(tuning, m)
        if len(tuning):
            _run_graph(executor, tuning, pipeline, parent_id, f"tuning[{profile}]", progress)
        frame = runs_frame(tracker.children(parent_id))
        graph = StageGraph()
        for m in manifests:
            chosen = choose(frame, m) if tunes(m) else {}
            add_main(graph, m, {method: c.multiplier for method, c in chosen.items()})
        _run_graph(executor, graph, pipeline, parent_id, f"reproduce_table[{profile}]", progress)
        wall = time.perf_counter() - start
        children = tracker.children(parent_id)
        check_runs(runs_frame(children), manifests)
        # The table is computed from its shipped record, so that `maskd-bench tables` rebuilds it byte for byte.
        record = TableRecord(
            profile, [Path(m.source).stem for m in manifests], environment_line(executor), wall, parent_id
        )
        write_export(out_dir / EXPORT_NAME, record, [r for r in children if r.info.status == "FINISHED"])
        written = write_main_table(out_dir)
        csv_path, md_path = written[0], written[1]
        for extra in written[2:]:
            tracker.client.log_artifact(parent_id, str(extra), "table")
        tracker.client.log_artifact(parent_id, str(out_dir / EXPORT_NAME), "table")
        tracker.log_metrics(parent_id, {"wall_time_s": wall})
        tracker.client.log_artifact(parent_id, str(csv_path), "table")
        tracker.client.log_artifact(parent_id, str(md_path), "table")
        export_mask_figures(tracker, parent_id, out_dir)
    return csv_path, md_path, parent_id
