"""A real ``mlflow server`` on 127.0.0.1: a smoke manifest logs its runs over HTTP, artifacts included."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from experiments.manifest import load_manifest
from experiments.pipeline import Pipeline
from experiments.tracking import Tracker, parent_tags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    assert mlflow_exe, "the mlflow command is not installed"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            mlflow_exe,
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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
