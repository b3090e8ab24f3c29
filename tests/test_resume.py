"""Exact resume: a run killed with SIGKILL continues its own MLflow run from its last resume checkpoint when the
same command runs again, and ends bitwise equal to an uninterrupted run (CPU); a corrupt newest checkpoint is
named and the previous one is used; fp16's scaler state travels with the checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.cli import main
from experiments.engine import checkpoints as ckpt
from experiments.engine import stages
from experiments.engine.manifest import load_manifest
from experiments.engine.runtime import seed_everything
from experiments.engine.tracking import Tracker
from experiments.engine.training import Resume, train_loop
from experiments.tasks import get_task

ARGS = [
    "run", "embedded_detection_smoke", "--methods", "mgd", "--seeds", "0", "--no-progress",
    "--set", "teacher_train.iterations=6", "--set", "teacher_train.warmup_iters=0",
    "--set", "teacher_train.checkpoint_every=3",
    "--set", "student_train.iterations=6", "--set", "student_train.checkpoint_every=2",
]  # fmt: skip
# MGD: trainable generation blocks beside the student and its own torch.Generator for the masks.


def _start(root: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "MASKD_BENCH_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "experiments.cli", *ARGS, "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    with (root / log).open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)


def _finish(proc: subprocess.Popen, root: Path, log: str) -> str:
    assert proc.wait(timeout=300) == 0, (root / log).read_text()[-3000:]
    return (root / log).read_text()


def _kill_at(proc: subprocess.Popen, root: Path, pattern: str, log: str) -> Path:
    """SIGKILL ``proc`` as soon as a file matching ``pattern`` (under the cache) exists; returns that file."""
    deadline = time.time() + 240
    while time.time() < deadline:
        found = sorted((root / "cache").glob(pattern))
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return found[0]
        assert proc.poll() is None, (root / log).read_text()[-3000:]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {pattern} in time: {(root / log).read_text()[-3000:]}")


def _runs(root: Path, kind: str) -> list:
    """The runs that computed a stage of ``kind`` (not the records of its reuse)."""
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.kind = '{kind}'")
    return [r for r in runs if "reused_from" not in r.data.tags]


def _student_weights(root: Path) -> dict[str, torch.Tensor]:
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = _runs(root, "student")
    with tracker.downloaded(run.info.run_id, "checkpoint/student.pt") as path:
        return torch.load(path, weights_only=True)


def _teacher_weights(root: Path) -> dict[str, torch.Tensor]:
    (path,) = (root / "cache" / "checkpoints").glob("teacher-*.pt")
    return torch.load(path, weights_only=True)


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def test_killed_runs_resume_their_own_run_bitwise(tmp_path, monkeypatch):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir()
    interrupted.mkdir()
    # the uninterrupted run in this process (one torch thread, as the subprocesses), with its own cache and store
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(reference / "cache"))
    assert main([*ARGS, "--tracking-uri", f"sqlite:///{reference / 'mlflow.db'}"]) == 0

    # 1: killed while the teacher trains, after its first resume checkpoint (step 3 of 8).
    first = _kill_at(_start(interrupted, "1.log"), interrupted, "resume/teacher-*/step-*.pt", "1.log")
    assert first.name == "step-00000003.pt"
    (teacher_run,) = _runs(interrupted, "teacher")

    # 2: the teacher continues its run; killed again once the student has two resume checkpoints.
    _kill_at(_start(interrupted, "2.log"), interrupted, "resume/student-*/step-00000004.pt", "2.log")
    log2 = (interrupted / "2.log").read_text()
    assert "resumed detection/teacher from step 3\n" in log2, log2[-3000:]
    (student_run,) = _runs(interrupted, "student")

    # 3: the newest student checkpoint is corrupt: named in one line, and the one before it is used.
    newest, previous = ckpt.ResumeCheckpoints(next((interrupted / "cache" / "resume").glob("student-*"))).paths()
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    log3 = _finish(_start(interrupted, "3.log"), interrupted, "3.log")
    corrupt = [line for line in log3.splitlines() if "corrupt" in line]
    assert len(corrupt) == 1 and newest.name in corrupt[0] and "sha256" in corrupt[0], log3[-3000:]
    step = int(re.search(r"step-(\d+)\.pt", previous.name).group(1))
    assert f"resumed detection/mgd/s0 from step {step}\n" in log3, log3[-3000:]

    # One MLflow run per stage, the very runs that were killed, FINISHED; no resume checkpoints left over.
    for kind, killed in (("teacher", teacher_run), ("student", student_run)):
        (run,) = _runs(interrupted, kind)
        assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
        assert "failure" not in run.data.tags and run.data.tags["resumed_from_step"]
    assert not list((interrupted / "cache" / "resume").glob("*/step-*.pt"))

    _assert_bitwise(_teacher_weights(interrupted), _teacher_weights(reference))
    _assert_bitwise(_student_weights(interrupted), _student_weights(reference))


def test_fp16_resume_carries_the_scaler_and_is_exact(tmp_path, tmp_path_factory, monkeypatch):
    """fp16 on the CPU: a step the scaler skips (gradients overflow at its initial scale) does not stop the run,
    the scaler's state is in the resume checkpoint, and a resumed loop ends bitwise equal to an uninterrupted
    one. (fp16 convolutions are slow on the CPU: 3 steps.)"""
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "maskd-cache"))
    # an initial scale at which step 1's gradients overflow here (torch's default, 65536, never does on this run)
    monkeypatch.setattr(stages.Runtime, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=3e5))
    sets = ["student_train.iterations=3", "student_train.warmup_iters=0", "student_train.log_every=1"]
    sets.append("maskd.custom_mask_warmup=1")  # the smoke value (3) must be shorter than the run
    m = load_manifest("embedded_detection_smoke", sets=sets)
    store = ckpt.ResumeCheckpoints(tmp_path / "resume")

    def train(resume: Resume) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
        seed_everything(0)
        model = get_task(m.task).build_model(m.student)
        logged: list[dict[str, float]] = []
        train_loop(model, None, m, m.student_train, 0, None, lambda v, s: logged.append(v), "t", False, resume)
        return stages.cpu_state(model), logged

    with stages.use_runtime(stages.Runtime("cpu", "fp16")):
        full, logged = train(Resume(2, None, lambda state, step: store.save(state, step)))
        state, _ = store.latest(print)
        resumed, _ = train(Resume(0, state))
    scales = [v["amp_scale"] for v in logged]
    assert scales == [3e5, 1.5e5, 1.5e5] and "grad_norm" not in logged[1]  # step 1 skipped, the run went on
    assert state["step"] == 2 and state["scaler"]["scale"] == 1.5e5
    _assert_bitwise(resumed, full)
