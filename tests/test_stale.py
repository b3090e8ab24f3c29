"""Code in the hash: a stage's fingerprint covers the normalised source that computes it, so editing a loss
retrains what depends on it (and only that); --reuse-stale reuses old runs and lists them with their commits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.engine import fingerprint, tracking
from experiments.engine.fingerprint import code_fingerprint, normalised
from experiments.engine.tracking import Tracker

TINY = [
    "--set", "teacher_train.iterations=2", "--set", "teacher_train.warmup_iters=0",
    "--set", "student_train.iterations=2", "--set", "student_train.warmup_iters=0",
    "--set", "tokens.iterations=2", "--no-progress",
]  # fmt: skip


def _edited_copy(tmp_path: Path, name: str, addition: str, file: str = "maskd/loss.py") -> Path:
    """A copy of the fingerprinted source with ``addition`` appended to ``file``."""
    root = tmp_path / name
    for package in ("maskd", "baselines", "experiments"):
        shutil.copytree(fingerprint.SOURCE_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    loss = root / file
    loss.write_text(loss.read_text() + addition)
    return root


def test_comments_and_docstrings_do_not_count():
    code = "def f(x):\n    return x + 1\n"
    assert normalised(code) == normalised('"""Doc."""\n# note\ndef f(x):\n    """Doc."""\n    return x + 1  # why\n')
    assert normalised(code) != normalised(code.replace("+ 1", "+ 2"))


def test_editing_the_maskd_loss_changes_only_what_depends_on_it(tmp_path, monkeypatch):
    # Detection: its task code does not import maskd (segmentation's does, for its masked forward, so there the
    # teacher depends on maskd/ too).
    stages = [("teacher", None), ("tokens", None), ("student", "baseline"), ("student", "maskd"), ("student", "cwd")]
    before = {s: code_fingerprint(s[0], "detection", s[1]) for s in stages}
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", _edited_copy(tmp_path, "comment", "\n# a comment only\n"))
    assert {s: code_fingerprint(s[0], "detection", s[1]) for s in stages} == before
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", _edited_copy(tmp_path, "code", "\nSCALE_FIX = 2\n"))
    after = {s: code_fingerprint(s[0], "detection", s[1]) for s in stages}
    assert after[("teacher", None)] == before[("teacher", None)]
    assert after[("student", "baseline")] == before[("student", "baseline")]
    assert after[("tokens", None)] != before[("tokens", None)]
    assert after[("student", "maskd")] != before[("student", "maskd")]


def test_changed_code_retrains_and_reuse_stale_lists_old_runs(tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "maskd-cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "embedded_segmentation_smoke", "--methods", "baseline", "maskd", "--seeds", "0"]
    args += ["--tracking-uri", uri, *TINY]
    assert main(args) == 0
    tracker = Tracker(uri)

    def computed(kind: str, method: str | None = None) -> list:
        runs = tracker.client.search_runs([tracker.experiment_id], f"tags.kind = '{kind}'")
        return [
            r for r in runs if "reused_from" not in r.data.tags and (method is None or r.data.tags["method"] == method)
        ]

    assert len(computed("student", "maskd")) == 1
    first_maskd = computed("student", "maskd")[0]
    assert first_maskd.data.tags["code_fingerprint"] == code_fingerprint("student", "segmentation", "maskd")

    # The FGD loss changes (MasKD's student uses its box masks): only the MasKD student is recomputed.
    fgd = "baselines/fgd.py"
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", _edited_copy(tmp_path, "v2", "\nSCALE_FIX = 2\n", fgd))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(computed("teacher")) == 1 and len(computed("student", "baseline")) == 1
    assert len(computed("tokens")) == 1 and len(computed("student", "maskd")) == 2
    assert "reused 0" not in out and "computed by other code" not in out

    # Another edit, with --reuse-stale: nothing is recomputed, and the stale runs are listed with their commits.
    # (maskd/loss.py: every segmentation stage depends on it, as the task's masked forward imports maskd.)
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", _edited_copy(tmp_path, "v3", "\nSCALE_FIX = 3\n"))
    assert main([*args, "--reuse-stale"]) == 0
    out = capsys.readouterr().out
    assert len(computed("teacher")) == 1 and len(computed("tokens")) == 1 and len(computed("student", "maskd")) == 2
    lines = out.splitlines()
    header = "reused 4 run(s) computed by other code (--reuse-stale):"
    assert header in lines, out
    listed = lines[lines.index(header) + 1 :]
    names = ["segmentation/teacher", "segmentation/tokens", "segmentation/baseline/s0", "segmentation/maskd/s0"]
    assert [line.split()[0] for line in listed] == names
    assert all(f"git {first_maskd.data.tags['git_commit']}" in line for line in listed)
    stale = tracker.client.search_runs([tracker.experiment_id], "tags.reused_stale = 'true'")
    assert len(stale) == 4


def test_git_commit_is_read_without_the_index_lock(monkeypatch):
    calls = []

    class Done:
        stdout = "abc123\n"

    def fake_run(cmd, **kwargs):
        calls.append(kwargs.get("env") or {})
        return Done()

    monkeypatch.setattr(tracking, "_GIT_COMMIT", None)
    monkeypatch.setattr(tracking.subprocess, "run", fake_run)
    if tracking.repo_root() is None:
        pytest.skip("not a checkout")
    assert tracking.git_commit() == "abc123-dirty"
    assert calls and all(env.get("GIT_OPTIONAL_LOCKS") == "0" for env in calls)
