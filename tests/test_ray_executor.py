"""``--executor ray``: the smoke table on a local Ray cluster with 2 workers equals the local executor's; a worker
SIGKILLed mid-stage is retried without a duplicate or a RUNNING run; two drivers on one ``ray start`` cluster and
one ``mlflow server`` (the README's commands) train each run once.

Tolerance: every metric of every run within 1e-6 (absolute) of the local executor's, timings excepted; on this
machine they are bitwise equal (same seeds, one torch thread per stage in both).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.checks.screenshot import mlflow_server as serve
from experiments.engine.executors import LocalExecutor, RayExecutor, StageGraph
from experiments.engine.manifest import load_manifest
from experiments.engine.pipeline import count_stages
from experiments.engine.tracking import Tracker
from experiments.tables.ablations import ablation_graph, build_ablations, count_ablation_stages
from experiments.tables.reproduce import PROFILES, reproduce

TOL = 1e-6
TINY = [
    "--set", "teacher_train.iterations=2", "--set", "teacher_train.warmup_iters=0",
    "--set", "student_train.iterations=2", "--set", "student_train.warmup_iters=0",
]  # fmt: skip
BIN = Path(sys.executable).parent


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", *args]


def _stage_runs(uri: str, multipliers: bool = False) -> dict[tuple[str, ...], list]:
    """Computed (not reuse-record) stage runs by (kind, task, method, seed) and, with ``multipliers``, the loss
    weight's multiplier of the tuning grid."""
    tracker = Tracker(uri)
    out: dict[tuple[str, ...], list] = {}
    for run in tracker.client.search_runs([tracker.experiment_id], max_results=5000):
        tags = run.data.tags
        if tags.get("kind") in ("teacher", "tokens", "student") and "reused_from" not in tags:
            key = (tags["kind"], tags["task"], tags["method"], tags["seed"])
            key += (tags.get("weight_multiplier", ""),) if multipliers else ()
            out.setdefault(key, []).append(run)
    return out


# ------------------------------------------------------------------------------------------ the graph
def test_graph_has_every_stage_and_its_inputs():
    for name in PROFILES["smoke"]:
        m = load_manifest(name)
        graph = StageGraph()
        graph.add_manifest(m)
        assert len(graph) == count_stages(m)
        nodes = list(graph.nodes.values())
        assert nodes[0].kind == "teacher" and not nodes[0].deps
        for node in nodes:
            if node.method == "baseline":
                assert node.deps == []  # starts at once, beside the teacher
            elif node.kind == "student":
                assert node.teacher == f"{m.task}/teacher"
                assert (node.tokens is not None) == (node.method == "maskd")
            keys = list(graph.nodes)
            assert all(keys.index(d) < keys.index(node.key) for d in node.deps)  # topological
    a = build_ablations("smoke")["tokens"]
    graph = ablation_graph(a)
    assert len(graph) == count_ablation_stages(a)
    assert graph.nodes["baseline/segmentation/baseline/s0"].labels == {"ablation": "tokens", "variant": "baseline"}


# ------------------------------------------------------------------------------------------ smoke table
def test_smoke_table_on_two_ray_workers_equals_local(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache-local"))
    local_uri = f"sqlite:///{tmp_path / 'local.db'}"
    local_csv, _, _ = reproduce("smoke", local_uri, tmp_path / "local", progress=False, executor=LocalExecutor())

    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache-ray"))  # nothing cached: Ray trains everything
    ray_uri = f"sqlite:///{tmp_path / 'ray.db'}"
    lines: list[str] = []
    with RayExecutor("local", stage_cpus=1, local_cpus=2) as executor:
        executor.lines = lines.append
        ray_csv, _, parent = reproduce("smoke", ray_uri, tmp_path / "ray", progress=False, executor=executor)

    # The smoke table: tuning (2 teachers, 2 token sets, 11 methods x 2 weight multipliers at seed 0), then the
    # table (2 + 2 reused, 13 methods x 2 seeds); the table's teachers, tokens and the seed-0 runs of the 11
    # distillation methods at their chosen weight are the tuning phase's runs, reused.
    tracker = Tracker(ray_uri)
    children = tracker.children(parent)
    assert len(children) == 26 + 30 and all(r.info.status == "FINISHED" for r in children)
    assert len([r for r in children if "reused_from" in r.data.tags]) == 4 + 11
    assert len(lines) == 56 and all(line.startswith("done") for line in lines)
    hosts_pids = {r.data.tags["pid"] for r in children if "reused_from" not in r.data.tags}
    assert len(hosts_pids) >= 2 and str(os.getpid()) not in hosts_pids  # run by the workers, not the driver

    local_runs, ray_runs = _stage_runs(local_uri, True), _stage_runs(ray_uri, True)
    assert set(local_runs) == set(ray_runs) and len(ray_runs) == 56 - 15
    for key, runs in ray_runs.items():
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", key  # trained exactly once
        mine, theirs = runs[0].data.metrics, local_runs[key][0].data.metrics
        assert set(mine) == set(theirs), key
        for name, value in theirs.items():
            if "time" not in name:
                assert math.isclose(mine[name], value, rel_tol=0, abs_tol=TOL) or (
                    math.isnan(mine[name]) and math.isnan(value)
                ), (key, name, mine[name], value)

    a, b = pd.read_csv(local_csv), pd.read_csv(ray_csv)
    assert list(a.columns) == list(b.columns) and a[["task", "method"]].equals(b[["task", "method"]])
    for column in a.columns:
        if a[column].dtype.kind == "f" and "time" not in column:
            assert np.allclose(a[column], b[column], rtol=0, atol=TOL, equal_nan=True), column
        elif a[column].dtype.kind != "f":
            assert a[column].equals(b[column]), column


# ------------------------------------------------------------------------------------------ a worker dies
def test_worker_killed_mid_stage_is_retried(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MASKD_BENCH_CACHE": str(tmp_path / "cache")}
    args = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "--seeds", "0", "--tracking-uri", uri]
    long_student = ["--set", "student_train.iterations=10"]
    ray_args = ["--executor", "ray", "--ray-cpus", "2", "--stage-cpus", "1", "--no-progress"]
    cmd = _cli(*args, *TINY, *long_student, *ray_args)
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    killed = None
    try:
        deadline = time.time() + 180
        while killed is None and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            if not (tmp_path / "mlflow.db").exists():
                continue
            tracker = Tracker(uri)
            where = "tags.kind = 'student' and attributes.status = 'RUNNING'"
            for run in tracker.client.search_runs([tracker.experiment_id], filter_string=where):
                pid = int(run.data.tags["pid"])
                assert pid != driver.pid
                os.kill(pid, signal.SIGKILL)  # the Ray worker training the student
                killed = (run.info.run_id, pid)
                break
        assert killed is not None, log.read_text()[-3000:]
        assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    students = [r for r in runs if r.data.tags.get("kind") == "student"]
    by_status = {r.info.status: r for r in students}
    assert sorted(r.info.status for r in students) == ["FAILED", "FINISHED"]  # the killed attempt, the retry
    assert by_status["FAILED"].info.run_id == killed[0]
    assert by_status["FAILED"].data.tags["failure"].startswith("abandoned")
    assert by_status["FINISHED"].data.tags["pid"] != str(killed[1])
    assert by_status["FINISHED"].data.metrics["mIoU"] >= 0
    parent = next(r for r in runs if r.data.tags.get("kind") == "manifest")
    assert parent.info.status == "FINISHED"


def test_failed_stage_shows_its_error_and_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MASKD_BENCH_CACHE": str(tmp_path / "cache")}
    args = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "--seeds", "0", "--tracking-uri", uri]
    diverge = ["--set", "student_train.lr=1e30"]  # the student's loss is nan at its first step
    cmd = _cli(*args, *TINY, *diverge, "--executor", "ray", "--ray-cpus", "2", "--stage-cpus", "1", "--no-progress")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=100)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    failed = {r.data.tags["kind"]: r.info.run_id for r in runs if r.info.status == "FAILED"}
    assert set(failed) == {"student", "manifest"}
    line = next(x for x in proc.stderr.splitlines() if x.startswith("FAILED"))
    assert "segmentation/baseline/s0" in line and "NonFiniteLoss" in line and failed["student"] in line
    assert proc.stderr.strip().splitlines()[-1].startswith("error: segmentation/baseline/s0: loss term 'loss/ce'")
    assert "done   segmentation/teacher" in proc.stderr


# ------------------------------------------------------------------------------------------ a real cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """``ray start --head`` as the README starts it (2 CPUs), stopped with its process group afterwards."""
    port = _free_port()
    exe = shutil.which("ray", path=str(BIN)) or "ray"
    cmd = [exe, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false"]
    log = tmp_path / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--disable-usage-stats", "--block"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: stops the cluster's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_drivers_on_one_cluster_and_tracking_server(tmp_path, ray_cluster):
    artifacts = ("--artifacts-destination", str(tmp_path / "server-artifacts"))
    with serve(f"sqlite:///{tmp_path / 'server.db'}", log=tmp_path / "server.log", extra_args=artifacts) as url:
        env = {**os.environ, "MASKD_BENCH_CACHE": str(tmp_path / "cache")}
        args = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "maskd", "--seeds", "0", *TINY]
        cluster = ["--executor", "ray", "--ray-address", ray_cluster, "--stage-cpus", "1", "--tracking-uri", url]
        cluster.append("--no-progress")
        drivers = []
        for i in range(2):
            cwd = tmp_path / f"driver{i}"
            cwd.mkdir()
            with (tmp_path / f"driver{i}.log").open("w") as out:
                drivers.append(
                    subprocess.Popen(_cli(*args, *cluster), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
                )
        codes = [d.wait(timeout=300) for d in drivers]
        logs = [(tmp_path / f"driver{i}.log").read_text()[-3000:] for i in range(2)]
        assert codes == [0, 0], logs

        runs = _stage_runs(url)
        assert sorted(runs) == [
            ("student", "segmentation", "baseline", "0"),
            ("student", "segmentation", "maskd", "0"),
            ("teacher", "segmentation", "teacher", "0"),
            ("tokens", "segmentation", "maskd", "0"),
        ]
        assert all(len(v) == 1 and v[0].info.status == "FINISHED" for v in runs.values())  # each trained once
        tracker = Tracker(url)
        parents = [
            r for r in tracker.client.search_runs([tracker.experiment_id]) if r.data.tags.get("kind") == "manifest"
        ]
        assert len(parents) == 2
        for parent in parents:
            children = tracker.children(parent.info.run_id)
            assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
        tokens = runs[("tokens", "segmentation", "maskd", "0")][0]
        stored = {a.path for a in tracker.client.list_artifacts(tokens.info.run_id, "checkpoint")}
        assert "checkpoint/tokens.pt" in stored
        assert list((tmp_path / "server-artifacts").rglob("tokens.pt"))  # stored by the server
        for i in range(2):  # nothing written beside the drivers
            assert not list((tmp_path / f"driver{i}").iterdir())
