"""The runtime switch (device, bf16 autocast, torch threads): clear errors before any work, data moved
recursively, the CPU bf16 path trains finite, and bf16 runs and CPU runs with another thread count get their own
hashes."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.cli import build_parser, main
from experiments.engine import stages
from experiments.engine.manifest import load_manifest
from experiments.engine.pipeline import student_hash, with_runtime
from experiments.tasks import get_task


def test_runtime_errors_are_one_line_and_early():
    with pytest.raises(stages.RuntimeConfigError, match="amp = 'fp8'; allowed: 'none', 'bf16'"):
        stages.Runtime("cpu", "fp8")
    with pytest.raises(stages.RuntimeConfigError, match="device = 'tpu'"):
        stages.Runtime("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(stages.RuntimeConfigError, match="CUDA is not available"):
            stages.Runtime("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_without_cuda(tmp_path, capsys):
    code = main(
        ["run", "embedded_segmentation_smoke", "--device", "cuda", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: device = 'cuda' but CUDA is not available on this machine"
    assert not (tmp_path / "m.db").exists()  # refused before the store was touched


def test_to_device_moves_nested_targets_and_context_restores():
    batch = ([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1), "image_id": 3}])
    moved = stages.to_device(batch)
    assert isinstance(moved, tuple) and moved[1][0]["image_id"] == 3
    assert moved[1][0]["boxes"].device.type == "cpu"
    assert stages.current_runtime() == stages.Runtime()
    with stages.use_runtime(stages.Runtime("cpu", "bf16")) as rt:
        assert stages.current_runtime() is rt
    assert stages.current_runtime().amp == "none"


def test_amp_and_cpu_thread_counts_are_other_runs():
    m = load_manifest("embedded_segmentation_smoke")
    h = student_hash(m, "maskd", 0)
    one = with_runtime(h, stages.Runtime("cpu"), threads=1)
    assert one == with_runtime(h, stages.Runtime("cpu"), threads=1)  # a pure function of config and runtime
    assert len({h, one, with_runtime(h, stages.Runtime("cpu"), threads=2)}) == 3
    assert with_runtime(h, stages.Runtime("cpu", "bf16"), threads=1) != one
    torch.set_num_threads(1)  # default: this process's threads
    assert with_runtime(h, stages.Runtime("cpu")) == one


def test_bf16_autocast_trains_a_student_on_the_cpu(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "maskd-cache"))
    m = load_manifest("embedded_segmentation_smoke", {"student_train": {"iterations": 3}})
    with stages.use_runtime(stages.Runtime("cpu", "bf16")):
        teacher = stages.cpu_state(get_task(m.task).build_model(m.teacher))
        result = stages.train_student(m, "cwd", 0, teacher, None, lambda v, s: None, progress=False)
    assert math.isfinite(result.metrics["mIoU"])
    assert all(v.dtype != torch.bfloat16 for v in result.state_dict.values())  # weights stay float32


def test_table_commands_run_stages_in_parallel_with_one_thread_each_by_default():
    parser = build_parser()
    for command in ("reproduce", "ablations"):
        args = parser.parse_args([command])
        assert (args.executor, args.stage_cpus) == ("ray", 1)
    args = parser.parse_args(["run", "embedded_segmentation_smoke"])
    assert (args.executor, args.stage_cpus) == ("local", 1)
