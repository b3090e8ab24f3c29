"""Several processes on one new sqlite store and one new cache: all succeed, every run ends FINISHED, and a
stage wanted by several of them at once (the shared teacher, a duplicated student) is computed once; a run left
RUNNING by a killed owner is marked FAILED by the next claimant."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import traceback

import pytest

from experiments.engine.manifest import load_manifest
from experiments.engine.pipeline import Pipeline, stage_fingerprint, student_hash, with_runtime
from experiments.engine.runtime import Runtime
from experiments.engine.tracking import Tracker, parent_tags

TINY = [
    "--set", "teacher_train.iterations=2", "--set", "teacher_train.warmup_iters=0",
    "--set", "student_train.iterations=2", "--set", "student_train.warmup_iters=0", "--no-progress",
]  # fmt: skip


def _worker(args: list[str], log: str, barrier) -> None:
    code = 99
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        from experiments.cli import main

        barrier.wait(timeout=60)
        code = main(args)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl")
def test_four_processes_on_a_new_store(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "--tracking-uri", uri, *TINY]
    seeds = [0, 0, 1, 2]  # the first two want the same student
    ctx = multiprocessing.get_context("fork")  # no re-import of torch and mlflow per process
    barrier = ctx.Barrier(len(seeds))
    procs = []
    for i, seed in enumerate(seeds):
        p = ctx.Process(target=_worker, args=([*base, "--seeds", str(seed)], str(tmp_path / f"p{i}.log"), barrier))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(timeout=300)
    logs = {i: (tmp_path / f"p{i}.log").read_text() for i in range(len(seeds))}
    assert [p.exitcode for p in procs] == [0] * len(seeds), logs

    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    computed = [r for r in runs if "reused_from" not in r.data.tags and r.data.tags.get("kind") != "manifest"]
    trained = sorted((r.data.tags["kind"], r.data.tags["seed"]) for r in computed)
    assert trained == [("student", "0"), ("student", "1"), ("student", "2"), ("teacher", "0")]
    reuses = [r for r in runs if "reused_from" in r.data.tags]
    assert sorted(r.data.tags["kind"] for r in reuses) == ["student"] + ["teacher"] * 3
    assert not list((cache / "checkpoints").glob(".*.tmp"))

    # A killed owner left a run RUNNING (its pid is gone): the next process to claim that stage marks it FAILED.
    m = load_manifest("embedded_segmentation_smoke", sets=[s for s in TINY if "=" in s])
    h = with_runtime(student_hash(m, "baseline", 3), Runtime())  # the hash a CPU stage runs under (its threads)
    fp = stage_fingerprint(m, "student", "baseline")
    dead = procs[0].pid
    abandoned = tracker.client.create_run(
        tracker.experiment_id,
        run_name="segmentation/baseline/s3",
        tags={
            "kind": "student",
            "config_hash": h,
            "code_fingerprint": fp,
            "host": socket.gethostname(),
            "pid": str(dead),
        },
    ).info.run_id
    pipeline = Pipeline(tracker, progress=False)
    with tracker.run("manifest/after-kill", parent_tags("manifest", m.task), {}) as parent:
        pipeline.run_manifest(m, parent.info.run_id, ["baseline"], [3])
    run = tracker.client.get_run(abandoned)
    assert run.info.status == "FAILED" and run.data.tags["failure"].startswith("abandoned")
