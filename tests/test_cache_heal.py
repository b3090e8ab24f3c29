"""A cache that heals: a cached teacher checkpoint that is corrupt (truncated, or a pickle torch refuses) is found
out by its recorded sha256 before use, deleted with one line, fetched again from the run's artifacts, and the run
finishes."""

from __future__ import annotations

import pickle

import torch

from experiments.cli import main
from experiments.engine.checkpoints import sha256_file
from experiments.engine.tracking import Tracker

TINY = [
    "--set", "teacher_train.iterations=2", "--set", "teacher_train.warmup_iters=0",
    "--set", "student_train.iterations=2", "--set", "student_train.warmup_iters=0", "--no-progress",
]  # fmt: skip


class Payload:  # an object torch.load(weights_only=True) refuses
    pass


def test_corrupt_cached_teacher_is_replaced_from_the_run(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "--seeds", "0", "--tracking-uri", uri, *TINY]
    assert main(args) == 0
    capsys.readouterr()
    [cached] = (cache / "checkpoints").glob("teacher-*.pt")
    tracker = Tracker(uri)
    teacher = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'teacher'")[0]
    recorded = teacher.data.tags["checkpoint_sha256"]
    assert sha256_file(cached) == recorded

    corruptions = {
        "truncated": lambda: cached.write_bytes(cached.read_bytes()[:200]),
        "refused": lambda: torch.save({"w": Payload()}, cached, pickle_protocol=pickle.HIGHEST_PROTOCOL),
    }
    for what, corrupt in corruptions.items():
        corrupt()
        assert sha256_file(cached) != recorded, what
        assert main(args) == 0, what
        out, err = capsys.readouterr()
        healed = [line for line in err.splitlines() if line.startswith("cache: deleted")]
        assert len(healed) == 1, (what, err)
        assert cached.name in healed[0] and f"fetching it again from run {teacher.info.run_id}" in healed[0]
        assert "weights_only=False" not in err and "Re-running" not in err
        assert "(reused)" in out.splitlines()[0]  # the teacher was reused, not retrained
        assert sha256_file(cached) == recorded, what
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len([r for r in runs if r.data.tags.get("kind") == "teacher" and "reused_from" not in r.data.tags]) == 1
    assert not list((cache / "checkpoints").glob("*.tmp"))
