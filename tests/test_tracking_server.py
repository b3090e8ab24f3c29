"""A real ``mlflow server`` on 127.0.0.1: a smoke manifest logs its runs over HTTP, artifacts included."""

from __future__ import annotations

import math
import socket

import pytest

from experiments.checks.screenshot import mlflow_server as serve
from experiments.engine.manifest import load_manifest
from experiments.engine.pipeline import Pipeline
from experiments.engine.tracking import Tracker, parent_tags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    artifacts = ("--artifacts-destination", str(tmp_path / "artifacts"))
    with serve(f"sqlite:///{tmp_path / 'server.db'}", log=tmp_path / "server.log", extra_args=artifacts) as url:
        yield url


def test_smoke_run_logged_over_http(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache"))
    manifest = load_manifest("embedded_detection_smoke", {"methods": ["baseline", "maskd"]})
    tracker = Tracker(mlflow_server)
    assert tracker.uri.startswith("http://127.0.0.1")
    pipeline = Pipeline(tracker, progress=False)
    tags = parent_tags("manifest", manifest.task)
    with tracker.run("manifest/http-smoke", tags, manifest.flat()) as parent:
        pipeline.run_manifest(manifest, parent.info.run_id, seeds=[0])

    # Read back through the server's REST API with a fresh client.
    remote = Tracker(mlflow_server)
    children = remote.children(parent.info.run_id)
    assert sorted(r.data.tags["kind"] for r in children) == ["student", "student", "teacher", "tokens"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert all(math.isfinite(v) for v in run.data.metrics.values())
    maskd = next(r for r in children if r.data.tags["method"] == "maskd" and r.data.tags["kind"] == "student")
    paths = {a.path for a in remote.client.list_artifacts(maskd.info.run_id, "figures")}
    assert "figures/masks.png" in paths
    assert remote.client.get_run(parent.info.run_id).info.status == "FINISHED"
