"""Several processes with torchrun: the data order is the seed's and the epoch's whatever the process count, the
batch layout is checked before any work, and two gloo processes on the CPU train the student that one process
accumulating the same micro-batches trains, with one MLflow run per stage written by rank 0 alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from experiments.cli import main
from experiments.engine.batches import Geometry, StepSampler, geometry
from experiments.engine.manifest import ManifestError, Train
from experiments.engine.runtime import Distributed
from experiments.engine.tracking import Tracker

TORCHRUN = [str(Path(sys.executable).parent / "torchrun")]
if not Path(TORCHRUN[0]).is_file():
    TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _steps(sampler: StepSampler, steps: int, per_step: int) -> list[list[list[int]]]:
    it = iter(sampler)
    return [[next(it) for _ in range(per_step)] for _ in range(steps)]


def test_plain_order_is_the_shuffled_loaders():
    """One forward of the whole batch takes the batches today's DataLoader(shuffle=True) drew, epoch after
    epoch (drop_last when the data set holds a batch)."""
    n, batch, seed = 21, 4, 3
    geo = geometry(Train(batch_size=batch), "student_train")
    ours = [[i for i, _ in b[0]] for b in _steps(StepSampler(n, seed, geo, 0, 0), 10, 1)]
    loaders = []
    for epoch in range(2):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=g, drop_last=True)
        loaders += [b.tolist() for b in loader]
    assert ours == loaders[:10]


@pytest.mark.parametrize("start", [0, 7])
def test_micro_batches_do_not_depend_on_the_process_count(start):
    """Step s uses the same images in the same micro-batches with 1, 2 or 4 processes (accumulating the rest),
    and a sampler started at step s (resume) gives what a sampler from 0 gives there."""
    n, seed, cfg = 50, 1, Train(batch_size=8, batch_per_device=2)
    layouts = {}
    for world in (1, 2, 4):
        geo = geometry(cfg, "student_train", Distributed(0, world, 0, "cpu"))
        assert geo.micro_batch == 2 and geo.accumulation * world == 4 and geo.step_batch == 8
        per_rank = [_steps(StepSampler(n, seed, geo, rank, start), 9, geo.accumulation) for rank in range(world)]
        # micro-batch a * world + rank of each step, in the one-process order
        layouts[world] = [
            [per_rank[j % world][s][j // world] for j in range(geo.accumulation * world)] for s in range(9)
        ]
    assert layouts[1] == layouts[2] == layouts[4]
    from_zero = _steps(StepSampler(n, seed, geometry(cfg, "student_train"), 0, 0), start + 9, 4)
    assert layouts[1] == from_zero[start:]


class _RandomItems(torch.utils.data.Dataset):
    """An item is its index and a draw from torch's RNG, as a random transform makes one."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int):
        return index, torch.rand(()).item()


def test_augmentation_is_a_function_of_seed_step_and_image_alone():
    """Random transforms give the same draws with 0 or 2 loader workers and after a resume at step 3, and they
    leave the process's RNG alone (a resume restores it; the transforms must not move it)."""
    from experiments.engine.batches import step_batches

    geo = geometry(Train(batch_size=4), "student_train")

    def items(workers: int, start: int, steps: int) -> list:
        stream = step_batches(_RandomItems(), list, 5, geo, start, workers)
        return [next(stream) for _ in range(steps)]

    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    plain = items(0, 0, 6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert plain == items(2, 0, 6)
    assert plain[3:] == items(0, 3, 3)
    assert len({draw for batch in plain for _, draw in batch}) == 24  # an image's draws differ step to step


def test_batch_layouts_and_their_errors():
    two = Distributed(0, 2, 0, "cpu")
    assert geometry(Train(batch_size=8), "student_train", two) == Geometry(2, 4, 1, 8, 1.0, False)
    assert geometry(Train(batch_size=8, batch_per_device=2), "student_train", two).accumulation == 2
    linear = geometry(Train(batch_size=8, batch_per_device=2, batch_scaling="linear_lr"), "student_train", two)
    assert (linear.step_batch, linear.accumulation, linear.lr_scale) == (4, 1, 0.5)
    with pytest.raises(ManifestError, match=r"student_train.batch_size = 8 is not a multiple of student_train"):
        geometry(Train(batch_size=8, batch_per_device=4), "student_train", Distributed(0, 3, 0, "cpu"))
    with pytest.raises(ManifestError, match="does not split over 3 processes; set teacher_train.batch_per_device"):
        geometry(Train(batch_size=8), "teacher_train", Distributed(0, 3, 0, "cpu"))
    cuda_bn = geometry(Train(batch_size=8, sync_bn=True), "student_train", Distributed(0, 2, 0, "cuda"))
    assert cuda_bn.sync_bn and cuda_bn.hash_part()["bn_batch"] == 8
    cpu_bn = geometry(Train(batch_size=8, sync_bn=True), "student_train", two)
    assert not cpu_bn.sync_bn and "CUDA only" in cpu_bn.tags()["sync_bn"]
    assert geometry(Train(batch_size=8), "student_train").hash_part() is None  # old hashes stand


def test_a_batch_that_does_not_split_is_one_line_before_any_work(tmp_path, capsys):
    args = ["run", "embedded_detection_smoke", "--methods", "fitnet", "--seeds", "0", "--no-progress"]
    args += ["--set", "student_train.batch_per_device=3", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "student_train.batch_per_device = 3" in err
    assert not (tmp_path / "m.db").exists()


def test_under_torchrun_only_run_and_only_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tables", "--check"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: only `maskd-bench run` runs under torchrun with several processes, not `tables`"
    )
    args = ["run", "embedded_detection_smoke", "--executor", "ray", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "error: --executor ray does not run under torchrun; use one or the other"


ARGS = [
    "run", "embedded_detection_smoke", "--methods", "fitnet", "--seeds", "0", "--no-progress",
    "--set", "teacher_train.iterations=4", "--set", "teacher_train.warmup_iters=0",
    "--set", "teacher_train.batch_per_device=4",  # the same teacher hash with 1 and 2 processes: cached once
    "--set", "student_train.batch_per_device=2",  # 2 processes x 2 forwards, or 1 process x 4 forwards, of 2 images
    "--set", "student_train.optimizer=sgd",  # see below
    "--set", "student_train.sync_bn=true",  # not applied on the CPU: the tags say so
]  # fmt: skip


def _student(uri: str) -> tuple[dict[str, torch.Tensor], object]:
    tracker = Tracker(uri)
    (run,) = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'student'")
    with tracker.downloaded(run.info.run_id, "checkpoint/student.pt") as path:
        return torch.load(path, weights_only=True), run


def test_two_gloo_processes_train_the_accumulating_single_process_student(tmp_path):
    """Tolerance: max abs difference of the student's parameters <= 1e-5 after 6 SGD steps (measured: 1.8e-6).
    Not bitwise: DDP all-reduces the two processes' gradient sums, one process adds its four micro-batches in
    order, so the float sums differ in their last bits. SGD, because Adam's per-parameter normalisation turns
    those last bits of a near-zero gradient into a step of up to lr (AdamW here: 3e-4 at lr 2e-3). BatchNorm's
    running statistics are not compared: rank 0's see only its own micro-batches (DDP broadcasts them)."""
    env = {**os.environ, "MASKD_BENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one, two = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
    cli = [sys.executable, "-m", "experiments.cli"]
    single = subprocess.run([*cli, *ARGS, "--tracking-uri", one], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "experiments.cli", *ARGS, "--tracking-uri", two]
    ddp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("fitnet/s0") == 1  # the report: rank 0's alone

    tracker = Tracker(two)
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert sorted(r.data.tags["kind"] for r in runs) == ["manifest", "student", "teacher"]
    assert all(r.info.status == "FINISHED" for r in runs)
    teacher = next(r for r in runs if r.data.tags["kind"] == "teacher")
    assert teacher.data.tags.get("from_cache") == "true"  # same hash as the one-process teacher

    (a, run_one), (b, run_two) = _student(one), _student(two)
    layout = ("world_size", "accumulation", "micro_batch", "effective_batch", "lr_scale")
    assert [run_two.data.tags[k] for k in layout] == ["2", "2", "2", "8", "1"]
    assert [run_one.data.tags[k] for k in layout] == ["1", "4", "2", "8", "1"]
    assert run_two.data.tags["sync_bn"] == "not applied: torch's SyncBatchNorm runs on CUDA only"
    assert run_one.data.tags["config_hash"] == run_two.data.tags["config_hash"]
    params = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    diff = max((a[k] - b[k]).abs().max().item() for k in params)
    assert diff <= 1e-5, diff
