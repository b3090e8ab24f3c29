"""The shipped record of a table's runs: everything a table is computed from, in a diff-friendly file.

``runs.jsonl`` beside a table holds one JSON object per line: first the table's own record (profile, manifests,
environment, wall time, parent run id), then one line per child run of the table (name, status, start and end time,
tags, params, final metrics), sorted by run name, keys sorted. No checkpoints. From it alone
:func:`experiments.tables.reproduce.write_main_table` rebuilds the table byte for byte (``nox -s tables``), and
:func:`import_runs` loads it into any MLflow store so that ``mlflow ui`` shows the runs behind a committed table on a
machine that never trained them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from ..engine.tracking import Tracker

EXPORT_NAME = "runs.jsonl"
FORMAT = "maskd-bench-runs/1"


@dataclass
class TableRecord:
    """What a table needs besides its runs."""

    profile: str
    manifests: list[str]
    environment: str
    wall_time_s: float | None
    parent_run_id: str
    extra: dict[str, Any] = field(default_factory=dict)


def _run_line(run) -> dict[str, Any]:
    return {
        "name": run.info.run_name,
        "run_id": run.info.run_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.")},
        "params": dict(sorted(run.data.params.items())),
        "metrics": dict(sorted(run.data.metrics.items())),
    }


def write_export(path: Path, record: TableRecord, runs: Iterable) -> Path:
    """Write ``path`` atomically: the table's record, then one line per run (sorted by name)."""
    lines = [json.dumps({"format": FORMAT, "table": record.__dict__}, sort_keys=True)]
    for row in sorted((_run_line(r) for r in runs), key=lambda r: (r["name"], r["run_id"])):
        lines.append(json.dumps(row, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


class ExportError(ValueError):
    """An export file that cannot be read; the message names the file and the line."""


def read_export(path: Path) -> tuple[TableRecord, list[SimpleNamespace]]:
    """The table's record and its runs, each shaped like an MLflow ``Run`` (``.info``, ``.data``) for the table
    code, which reads runs the same way from a store or from an export."""
    if not path.is_file():
        raise ExportError(f"{path}: no export here (run the table once to write it)")
    text = path.read_text().splitlines()
    try:
        head = json.loads(text[0])
        if head.get("format") != FORMAT:
            raise ExportError(f"{path}:1: format {head.get('format')!r}, expected {FORMAT!r}")
        record = TableRecord(**head["table"])
        runs = []
        for number, line in enumerate(text[1:], start=2):
            row = json.loads(line)
            info = SimpleNamespace(
                run_id=row["run_id"],
                run_name=row["name"],
                status=row["status"],
                start_time=row["start_time"],
                end_time=row["end_time"],
            )
            data = SimpleNamespace(tags=row["tags"], params=row["params"], metrics=row["metrics"])
            runs.append(SimpleNamespace(info=info, data=data, line=number))
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ExportError(f"{path}: unreadable export ({exc})") from None
    return record, runs


def import_runs(path: Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Load an export into the store at ``tracking_uri``: a parent run for the table and a child per run, with
    the exported tags (plus ``imported_from``), params, metrics and times. Returns the new parent id and the number
    of runs. Importing the same export twice gives two copies (MLflow run ids cannot be chosen)."""
    record, runs = read_export(path)
    tracker = Tracker(tracking_uri)
    client = tracker.client
    parent = client.create_run(
        tracker.experiment_id,
        run_name=f"imported/{record.profile}",
        tags={"kind": "table", "profile": record.profile, "imported_from": str(path)},
    )
    for run in runs:
        child = client.create_run(
            tracker.experiment_id,
            run_name=run.info.run_name,
            start_time=run.info.start_time,
            tags={**run.data.tags, "mlflow.parentRunId": parent.info.run_id, "imported_run_id": run.info.run_id},
        )
        rid = child.info.run_id
        stamp = run.info.end_time or run.info.start_time or 0
        params = [Param(k, str(v)[:6000]) for k, v in run.data.params.items()]
        metrics = [Metric(k, float(v), stamp, 0) for k, v in run.data.metrics.items()]
        for start in range(0, max(len(params), len(metrics)), 100):
            client.log_batch(rid, metrics=metrics[start : start + 100], params=params[start : start + 100])
        client.log_batch(rid, tags=[RunTag("imported_from", str(path))])
        client.set_terminated(rid, status=run.info.status, end_time=run.info.end_time)
    client.set_terminated(parent.info.run_id, status="FINISHED")
    return parent.info.run_id, len(runs)
