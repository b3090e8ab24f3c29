"""`maskd-bench verify-teacher`: a table's teacher retrained from nothing equals its exported run bit for bit, and a
changed metric or manifest is caught (experiments/tables/verify.py)."""

from __future__ import annotations

import json

import pytest

from experiments.engine.manifest import load_manifest
from experiments.engine.pipeline import Pipeline
from experiments.engine.tracking import Tracker, parent_tags
from experiments.tables.export import ExportError, TableRecord, write_export
from experiments.tables.verify import verify_teacher

SMOKE = "embedded_segmentation_smoke"


@pytest.fixture
def export(tmp_path, monkeypatch):
    """The export of a one-teacher 'table' trained in its own cache and store."""
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.run("table/verify", parent_tags("table"), {}) as parent:
        Pipeline(tracker, progress=False).teacher(load_manifest(SMOKE), parent.info.run_id)
    path = tmp_path / "runs.jsonl"
    record = TableRecord("smoke", [SMOKE], "env", 1.0, parent.info.run_id)
    write_export(path, record, tracker.children(parent.info.run_id))
    return path


def _edit_teacher(path, edit) -> None:
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    for row in rows:
        if row["tags"].get("kind") == "teacher":
            edit(row)
    path.write_text("\n".join([lines[0], *(json.dumps(r, sort_keys=True) for r in rows)]) + "\n")


def test_retrained_teacher_equals_its_export_and_a_changed_metric_is_caught(export):
    rows, where = verify_teacher(export, "segmentation", progress=False)
    assert rows and all(r.equal for r in rows), [r for r in rows if not r.equal]
    assert {"mIoU", "test/mIoU"} <= {r.metric for r in rows} and "retrained here" in where
    assert not any("time" in r.metric for r in rows)  # durations are not compared

    _edit_teacher(export, lambda row: row["metrics"].update(mIoU=row["metrics"]["mIoU"] + 1e-12))
    rows, _ = verify_teacher(export, "segmentation", progress=False)
    assert [r.metric for r in rows if not r.equal] == ["mIoU"]


def test_a_manifest_changed_since_the_table_is_refused(export):
    _edit_teacher(export, lambda row: row["tags"].update(config_hash="0" * 16))
    with pytest.raises(ExportError, match="now makes teacher .* the export's teacher is 0000"):
        verify_teacher(export, "segmentation", progress=False)
    with pytest.raises(ExportError, match="no detection teacher run"):
        verify_teacher(export, "detection", progress=False)


def test_another_teacher_seed_gives_the_seed_spread(export, capsys):
    """--seed 1 trains the same stage at another seed: its metrics differ from the table's seed-0 teacher, and the
    command reports the spread with exit status 0 (a measurement, not a reproduction check)."""
    from experiments.cli import main

    rows, where = verify_teacher(export, "segmentation", progress=False, seed=1)
    assert "teacher seed 1" in where
    assert {"mIoU", "test/mIoU"} <= {r.metric for r in rows}
    assert not all(r.equal for r in rows)  # another seed trains another teacher
    assert main(["verify-teacher", str(export), "--task", "segmentation", "--seed", "1", "--no-progress"]) == 0
    assert "teacher seed 1 against the table's seed 0" in capsys.readouterr().out
