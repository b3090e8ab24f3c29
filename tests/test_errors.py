"""One-line errors: a real non-finite loss stops the run with one line naming run, term and step, and the MLflow
run ends FAILED; bad input exits 2; --debug shows the traceback; torch's weights_only=False advice never shows."""

from __future__ import annotations

import pytest
import torch

from experiments.cli import main
from experiments.engine.checkpoints import CheckpointError, clean_torch_message, load_checked
from experiments.engine.manifest import ManifestError
from experiments.engine.tracking import Tracker

TINY = [
    "--set", "teacher_train.iterations=2", "--set", "teacher_train.warmup_iters=0",
    "--set", "student_train.iterations=2", "--set", "student_train.warmup_iters=0",
    "--set", "tokens.iterations=2", "--no-progress",
]  # fmt: skip


def test_nan_in_training_is_one_line_and_the_run_ends_failed(tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "maskd-cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # float32 overflow: the MasKD term is +inf at the first step, through the real loss and training loop.
    args = ["run", "embedded_segmentation_smoke", "--methods", "maskd", "--seeds", "0", "--tracking-uri", uri]
    code = main([*args, *TINY, "--set", "maskd.loss_weight=1e39"])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(
        "error: segmentation/maskd/s0: loss term 'loss/kd_maskd/logits' is inf at step 0; lower the learning rate"
    )
    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    student = next(r for r in runs if r.data.tags.get("kind") == "student")
    assert student.info.status == "FAILED" and "kd_maskd/logits" in student.data.tags["failure"]
    assert f"(MLflow run {student.info.run_id} ended FAILED)" in errors[0]


def test_bad_input_exits_2_in_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "embedded_segmentation_smoke", "--tracking-uri", uri, "--set", "student_train.iterations=-3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "student_train.iterations" in err
    with pytest.raises(ManifestError):
        main([*args, "--debug"])
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched


def test_stage_cpus_below_one_exits_2_before_any_work(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", "embedded_segmentation_smoke", "--tracking-uri", uri, "--stage-cpus", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --stage-cpus 0: must be at least 1"
    assert not (tmp_path / "mlflow.db").exists()
    assert torch.get_num_threads() == 1  # untouched (conftest's one thread per worker)


class NotATensor:  # a pickled object that torch.load(weights_only=True) refuses
    pass


def test_torch_weights_only_advice_is_never_repeated(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": NotATensor()}, path)
    with pytest.raises(Exception) as raw:
        torch.load(path, weights_only=True)
    assert "weights_only` set to `False`" in str(raw.value)  # what torch says...
    with pytest.raises(CheckpointError) as caught:
        load_checked(path)
    message = str(caught.value)
    assert "\n" not in message and "False" not in message and "Re-running" not in message
    assert "refused by torch.load(weights_only=True): Unsupported global" in message
    text = (
        "x. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it can result in "
        "arbitrary code execution. Do it only if you got the file from a trusted source. y"
    )
    assert clean_torch_message(text) == "x. y"
    assert "weights_only=False" not in clean_torch_message("a. Try torch.load(f, weights_only=False) instead. b")
