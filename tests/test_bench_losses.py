"""The loss benchmark's machinery on tiny shapes (its numbers are measured by ``nox -s bench_losses``)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from experiments.checks import bench_losses as bench


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "FPN_SHAPES", [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)])
    monkeypatch.setattr(bench, "CHANNELS", 16)
    monkeypatch.setattr(bench, "IMAGE_HW", (64, 96))
    monkeypatch.setattr(bench, "BOXES_PER_IMAGE", 3)


def test_every_case_runs_and_the_report_is_written(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "peak_memory_mb", lambda *args: bench._memory_case(args[0], args[1], args[3]))
    rows = bench.run_benchmark("cpu", torch.float32, warmup=1, repeats=1, progress=False)
    assert [(r.loss, r.impl) for r in rows] == bench.CASES
    for loss in ("pkd", "mgd"):  # the PKD and MGD baselines, fast against literal and the MSE floor
        assert {r.impl for r in rows if r.loss == loss} == {"fast", "literal", "mse"}
    assert all(r.fwd_bwd_ms > 0 and r.peak_mem_mb >= 0 for r in rows)
    env = bench.environment("cpu", torch.float32)
    csv_path, md_path = bench.write_reports(rows, tmp_path, env, warmup=1)
    table = pd.read_csv(csv_path)
    assert {"loss", "impl", "fwd_bwd_ms", "peak_mem_mb"} <= set(table.columns)
    assert set(table.impl) == {"fast", "literal", "mse"}
    text = md_path.read_text()
    assert "MasKD literal / fast" in text and "FGD literal / fast" in text and "## Protocol" in text
    assert "| pkd | literal |" in text and "| mgd | fast |" in text and "generation" in text
    assert {"pkd", "mgd"} <= set(table.loss)


@pytest.mark.parametrize("loss", ["pkd", "mgd"])
def test_pkd_and_mgd_cases_compute_the_same_loss_fast_and_literal(tiny, loss):
    # The two forms of each case see the same inputs and (seeded default-init) parameters, so the gradients agree.
    grads = {}
    for impl in ("fast", "literal"):
        torch.manual_seed(0)
        run = bench.build_case(loss, impl, "cpu", torch.float64)
        run()
        grads[impl] = [p.grad.clone() for p in run.params]
    assert len(grads["fast"]) == (5 if loss == "pkd" else 5 + 5 * 4)  # MGD: + 2 convs (weight, bias) per level
    for fast, literal in zip(grads["fast"], grads["literal"]):
        torch.testing.assert_close(fast, literal, rtol=1e-9, atol=1e-12)


def test_targets_are_judged_from_the_rows():
    rows = [
        bench.Row("maskd", "fast", 10.0, 1, 5),
        bench.Row("maskd", "literal", 150.0, 1, 5),
        bench.Row("maskd", "mse", 4.0, 1, 5),
        bench.Row("fgd", "fast", 10.0, 1, 5),
        bench.Row("fgd", "literal", 20.0, 1, 5),
    ]
    verdicts = {name: met for name, _, _, met in bench.targets(rows)}
    assert verdicts == {"MasKD literal / fast": True, "MasKD fast / mse": True, "FGD literal / fast": False}


def test_fewer_than_five_repeats_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "3", "--out", "/nonexistent"])
