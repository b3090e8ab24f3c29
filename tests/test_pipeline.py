"""End to end at the smoke profile: MLflow holds the runs, FINISHED and finite; the table has every row;
a second call reuses every run; a failing stage ends FAILED and writes no table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from experiments.engine import stages
from experiments.engine.tracking import Tracker
from experiments.tables.reproduce import PROFILES, reproduce


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    # One scene/teacher cache for the module's tests; a fresh MLflow store per test.
    root = tmp_path_factory.getbasetemp() / "maskd-cache"
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(root))
    return root


def test_smoke_table_end_to_end_and_reuse(tmp_path, cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    csv_path, md_path, parent = reproduce("smoke", uri, tmp_path / "out", progress=False)
    table = pd.read_csv(csv_path)
    expected = {("detection", m) for m in ["teacher", "baseline", "fitnet", "cwd", "fgd", "pkd", "mgd", "maskd"]}
    expected |= {("segmentation", m) for m in ["teacher", "baseline", "fitnet", "cwd", "pkd", "mgd", "maskd"]}
    assert set(zip(table.task, table.method)) == expected
    assert {"task", "method", "metric", "mean", "std", "n_seeds", "ci95"} <= set(table.columns)
    assert table["mean"].map(math.isfinite).all()
    students = table[table.method != "teacher"]
    assert (students.n_seeds == 2).all() and students["std"].map(math.isfinite).all()
    assert "## Protocol" in md_path.read_text() and "Teacher − baseline student gap" in md_path.read_text()
    assert {p.name for p in (tmp_path / "out").glob("masks_*.png")} == {"masks_detection.png", "masks_segmentation.png"}

    tracker = Tracker(uri)
    children = tracker.children(parent)
    tuning = 2 + 2 + 6 * 2 + 5 * 2  # teachers, tokens, each distillation method x the grid (x0.25, x1) at seed 0
    reported = 2 + 2 + 7 * 2 + 6 * 2  # the table's teachers and tokens (reuse records), students at seeds 0 and 1
    assert len(children) == tuning + reported
    assert sum(r.data.tags.get("tuning") == "true" for r in children) == tuning
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.metrics and all(math.isfinite(v) for v in run.data.metrics.values())
        assert {"task", "method", "seed", "config_hash", "git_commit", "torch_version"} <= set(run.data.tags)
    maskd_run = next(r for r in children if r.data.tags["method"] == "maskd" and r.data.tags["kind"] == "student")
    artifacts = {a.path for a in tracker.client.list_artifacts(maskd_run.info.run_id)}
    assert {"manifest.json", "checkpoint", "figures"} <= artifacts
    step_metrics = tracker.client.get_metric_history(maskd_run.info.run_id, "loss/kd_maskd")
    assert len(step_metrics) >= 2
    assert tracker.client.get_run(parent).info.status == "FINISHED"

    # the shipped record rebuilds the table byte for byte, without the store; a hand edit is caught
    from experiments.tables.export import import_runs
    from experiments.tables.reproduce import rebuild_tables

    assert rebuild_tables(tmp_path / "out", check=True)[1] == []
    md_path.write_text(md_path.read_text().replace("maskd", "MASKD"))
    assert rebuild_tables(tmp_path / "out", check=True)[1] == [md_path]
    rebuild_tables(tmp_path / "out")
    assert rebuild_tables(tmp_path / "out", check=True)[1] == []
    imported_parent, count = import_runs(tmp_path / "out" / "runs.jsonl", f"sqlite:///{tmp_path / 'imported.db'}")
    assert count == len(children)
    imported = Tracker(f"sqlite:///{tmp_path / 'imported.db'}").children(imported_parent)
    assert sorted(r.data.metrics.get("mAP", r.data.metrics.get("mIoU", -1)) for r in imported) == sorted(
        r.data.metrics.get("mAP", r.data.metrics.get("mIoU", -1)) for r in children
    )

    _, _, parent2 = reproduce("smoke", uri, tmp_path / "out2", progress=False)
    reused = tracker.children(parent2)
    assert len(reused) == len(children)
    assert all("reused_from" in r.data.tags for r in reused)
    assert pd.read_csv(tmp_path / "out2" / "main_table.csv")["mean"].tolist() == table["mean"].tolist()


def test_failing_stage_ends_failed_and_writes_no_table(tmp_path, cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def boom(*args, **kwargs):
        raise stages.NonFiniteLoss("student: loss term 'loss/kd_cwd' is nan at step 3")

    monkeypatch.setattr(stages, "train_student", boom)
    with pytest.raises(stages.NonFiniteLoss, match="kd_cwd"):
        reproduce("smoke", uri, tmp_path / "out", progress=False, reuse=False)
    assert not (tmp_path / "out" / "main_table.md").exists()
    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert runs and all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.data.tags.get("kind") for r in failed} == {"student", "table"}
    assert "kd_cwd" in failed[0].data.tags["failure"]


def test_profiles_name_shipped_manifests():
    from experiments.engine.manifest import load_manifest

    for names in PROFILES.values():
        assert [load_manifest(n).task for n in names] == ["detection", "segmentation"]
