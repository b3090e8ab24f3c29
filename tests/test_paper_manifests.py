"""The paper's manifests on data laid out like COCO, Cityscapes and a user's folder (tests/layouts.py): every one
loads under the smoke profile, runs end to end into MLflow with finite metrics, takes a teacher from a file, refuses
weights of another architecture before any work, and its student exports into the plain torchvision model."""

from __future__ import annotations

import dataclasses
import math
import re

import mlflow
import pytest
import torch
from layouts import write_cityscapes, write_coco, write_folder

from experiments.cli import main
from experiments.engine.export import plain_torchvision_model
from experiments.engine.manifest import load_manifest, shipped_manifests
from experiments.engine.profiles import profile_overrides
from experiments.tasks import get_task

PAPER = sorted(n for n in shipped_manifests() if n.startswith(("coco_", "cityscapes_")))
CLASSES = 'data.classes=["background", "road", "car"]'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # a cache per test, removed with its folder when the test passes: paper-scale checkpoints are 50-250 MB each and
    # no two tests here share a stage, so a worker-wide cache would only fill the disk (CI ran out of it once)
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "maskd-cache"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {
        "coco": write_coco(tmp_path_factory.mktemp("coco")),
        "cityscapes": write_cityscapes(tmp_path_factory.mktemp("cityscapes")),
        "folder": write_folder(tmp_path_factory.mktemp("folder")),
    }


def _root(name, roots):
    return roots["coco" if name.startswith("coco_") else "cityscapes"]


def test_the_six_paper_rows_are_shipped():
    assert PAPER == [
        "cityscapes_deeplabv3_r101_mbv2",
        "cityscapes_deeplabv3_r101_r18",
        "cityscapes_pspnet_r101_r18",
        "coco_faster_rcnn_r101_r50",
        "coco_fcos_r101_r50",
        "coco_retinanet_r101_r50",
    ]


@pytest.mark.parametrize("name", PAPER)
def test_every_paper_manifest_loads_with_the_smoke_profile_on_its_layout(name, roots, capsys):
    sets = [f"data.root={_root(name, roots)}"]
    m = load_manifest(name, overrides=profile_overrides(name, "smoke", sets), sets=sets)
    full = load_manifest(name, check_data=False)
    # the smoke profile shrinks lengths and sizes only: same models (bar the weight files), methods and losses
    assert m.student_train.iterations < full.student_train.iterations and m.protocol.seeds == [0]
    assert m.methods == full.methods and m.fgd == full.fgd
    # shorter warm-up; an area epsilon in detection (an untrained teacher's masks underflow: see profiles.py)
    same = dataclasses.replace(m.maskd, custom_mask_warmup=full.maskd.custom_mask_warmup, area_eps=full.maskd.area_eps)
    assert same == full.maskd
    assert (m.teacher.arch, m.teacher.backbone, m.student.arch, m.student.backbone) == (
        full.teacher.arch,
        full.teacher.backbone,
        full.student.arch,
        full.student.backbone,
    )
    # the ImageNet files are not on this machine: the profile says so in one line each and drops them
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smoke: ")]
    assert notes and all("backbone_weights" in line and "random weights" in line for line in notes)
    assert m.student.backbone_weights == ""


def _run(argv, tmp_path, capsys):
    quiet = ["--no-progress"] if argv[0] == "run" else []
    rc = main([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *quiet])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _metrics(out: str) -> dict[str, float]:
    """``name -> primary metric`` from `maskd-bench run`'s summary lines."""
    return {name: float(value) for name, value in re.findall(r"^(\S+)\s+m(?:AP|IoU)\s+(\S+)", out, flags=re.M)}


def _runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.parametrize(
    ("name", "kind", "methods"),
    [
        ("coco_retinanet_r101_r50", "coco", ["baseline", "fgd", "maskd"]),
        ("cityscapes_deeplabv3_r101_r18", "cityscapes", ["baseline", "maskd"]),
        ("cityscapes_pspnet_r101_r18", "folder", ["baseline", "cwd"]),
    ],
)
def test_a_paper_manifest_runs_end_to_end_on_each_layout(name, kind, methods, roots, tmp_path, capsys):
    sets = ["--set", f"data.root={roots[kind]}"]
    if kind == "folder":  # the user's own data through a segmentation manifest
        sets += ["--set", "data.kind=folder", "--set", CLASSES]
    rc, out, err = _run(["run", name, "--profile", "smoke", *sets, "--methods", *methods], tmp_path, capsys)
    assert rc == 0, err
    metrics = _metrics(out)
    assert set(metrics) == {"teacher", *(f"{m}/s0" for m in methods)}, out
    assert all(math.isfinite(v) for v in metrics.values()), out
    runs = _runs(tmp_path)
    assert all(r.info.status == "FINISHED" for r in runs)
    students = {r.data.tags["method"] for r in runs if r.data.tags.get("kind") == "student"}
    assert students == set(methods)
    stage_runs = [r for r in runs if r.data.tags.get("kind") in ("teacher", "tokens", "student")]
    assert {r.data.tags["manifest"] for r in stage_runs} == {load_manifest(name, check_data=False).name}


def test_a_teacher_from_a_file_is_evaluated_not_trained_and_a_student_exports_to_torchvision(roots, tmp_path, capsys):
    name, root = "coco_fcos_r101_r50", roots["coco"]
    sets = [f"data.root={root}"]
    m = load_manifest(name, overrides=profile_overrides(name, "smoke", sets), sets=sets)
    capsys.readouterr()
    teacher_file = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(get_task("detection").build_model(m.teacher).state_dict(), teacher_file)
    argv = ["run", name, "--profile", "smoke", "--set", f"data.root={root}", "--set", f"teacher.weights={teacher_file}"]
    rc, out, err = _run([*argv, "--methods", "fitnet"], tmp_path, capsys)
    assert rc == 0, err
    runs = _runs(tmp_path)
    teacher = next(r for r in runs if r.data.tags.get("kind") == "teacher")
    assert teacher.data.tags.get("teacher_source") == "weights"
    assert not any(k.startswith("loss/") for k in teacher.data.metrics)  # evaluated, not trained
    assert math.isfinite(teacher.data.metrics["mAP"])

    student = next(r for r in runs if r.data.tags.get("kind") == "student")
    out_file = tmp_path / "student.pth"
    rc, out, err = _run(["export", student.info.run_id, str(out_file)], tmp_path, capsys)
    assert rc == 0, err
    state = torch.load(out_file, weights_only=True)
    plain = plain_torchvision_model(m.student)
    assert type(plain).__module__.startswith("torchvision.")
    plain.load_state_dict(state, strict=True)
    assert not any(k.startswith(("teacher", "align", "mask")) for k in state)

    # a teacher run's id is refused in one line
    rc, out, err = _run(["export", teacher.info.run_id, str(tmp_path / "x.pth")], tmp_path, capsys)
    assert rc == 2 and "student run" in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_architecture_are_refused_before_any_work(roots, tmp_path, capsys):
    name, root = "coco_retinanet_r101_r50", roots["coco"]
    wrong = tmp_path / "resnet18_detector.pth"
    m = load_manifest(
        name, overrides=profile_overrides(name, "smoke", [f"data.root={root}"]), sets=[f"data.root={root}"]
    )
    torch.save(
        get_task("detection").build_model(dataclasses.replace(m.teacher, backbone="resnet18")).state_dict(), wrong
    )
    capsys.readouterr()
    argv = ["run", name, "--profile", "smoke", "--set", f"data.root={root}", "--set", f"teacher.weights={wrong}"]
    rc, out, err = _run(argv, tmp_path, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("smoke: ")]
    assert rc == 2 and len(lines) == 1, err
    assert "teacher.weights" in lines[0] and str(wrong) in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, no run left RUNNING
