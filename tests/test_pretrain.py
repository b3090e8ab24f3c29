"""The pretraining stage (the embedded stand-in for ImageNet weights): deterministic, cached once, loaded exactly
into the task models' bodies, hashed only when on, refused where it cannot apply. Tiny settings: seconds each."""

from __future__ import annotations

import pytest
import torch

from experiments.engine import pipeline, pretrain
from experiments.engine.manifest import ManifestError, load_manifest
from experiments.engine.paths import CACHE_ENV_VAR
from experiments.engine.weights import _backbone_body
from experiments.tasks import get_task

# 32-pixel images, 3 steps of 8; 480 train digits per class leave 10 held-out val digits per class (100 images).
TINY = {
    "pretrain": {
        "enabled": True,
        "image_size": 32,
        "num_images": 64,
        "iterations": 3,
        "batch_size": 8,
        "warmup_iters": 1,
    },
    "data": {"train_digits_per_class": 480},
}


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def tiny(name: str = "embedded_detection_smoke", **extra: dict):
    return load_manifest(name, _merge(TINY, extra), check_data=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_two_computations_are_bitwise_equal_and_leave_the_callers_rng(tmp_path, monkeypatch):
    m = tiny()
    states = []
    for run in ("a", "b"):
        monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / run))
        before = torch.get_rng_state()
        states.append(
            (pretrain.pretrained_backbone(m, "student", progress=False), pretrain.pretrain_metrics(m, "student"))
        )
        assert torch.equal(torch.get_rng_state(), before)  # a cached or computed start trains the same afterwards
    (first, metrics_a), (second, metrics_b) = states
    assert first.keys() == second.keys() and any(k.startswith("layer4.") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert metrics_a["top1"] == metrics_b["top1"] and metrics_a["train_loss"] == metrics_b["train_loss"]
    assert 0.0 <= metrics_a["top1"] <= 100.0 and metrics_a["wall_time_s"] > 0


def test_second_call_reads_the_file(cache, monkeypatch):
    m = tiny()
    state = pretrain.pretrained_backbone(m, "student", progress=False)
    files = sorted(p.name for p in (cache / "pretrained").iterdir())
    digest = pretrain._digest(pretrain.pretrain_spec(m, "student"))
    assert f"{digest}.pt" in files and f"{digest}.json" in files and f"{digest}.pt.sha256" in files

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again instead of reading the cache")

    monkeypatch.setattr(pretrain, "_train", no_training)
    again = pretrain.pretrained_backbone(m, "student", progress=False)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert set(pretrain.pretrain_metrics(m, "student")) == {"top1", "train_loss", "wall_time_s"}
    # a corrupted file is computed again, not loaded
    weights = cache / "pretrained" / f"{digest}.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(AssertionError, match="pretrained again"):
        pretrain.pretrained_backbone(m, "student", progress=False)


@pytest.mark.parametrize("name", ["embedded_detection_smoke", "embedded_segmentation_smoke"])
def test_loaded_body_equals_the_pretrained_state(cache, name):
    m = tiny(name)
    model = get_task(m.task).build_model(m.student)
    metrics = pretrain.load_pretrained(model, m, "student", progress=False)
    assert set(metrics) == {f"pretrain/student/{k}" for k in ("top1", "train_loss", "wall_time_s")}
    state = pretrain.pretrained_backbone(m, "student", progress=False)
    _, body = _backbone_body(model, m.student)
    own = body.state_dict()
    assert own.keys() <= state.keys()  # the segmenter's dilated body and the detector's take the same tensors
    assert all(torch.equal(own[k], state[k]) for k in own)
    # disabled: nothing loaded, nothing reported
    off = tiny(name, pretrain={"enabled": False})
    fresh = get_task(off.task).build_model(off.student)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert pretrain.load_pretrained(fresh, off, "student") == {}
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_mismatched_body_is_refused(cache):
    m = tiny()
    wider = tiny(student={"width": 32})
    model = get_task(m.task).build_model(wider.student)
    state = pretrain.pretrained_backbone(m, "student", progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain, "_cached", lambda *args: (state, {"top1": 0.0}))
        with pytest.raises(ValueError, match="does not fit the backbone body"):
            pretrain.load_pretrained(model, wider, "student", progress=False)


def test_hashes_change_with_the_section_and_stay_when_it_is_off(monkeypatch):
    on = tiny()
    changed = tiny(pretrain={"iterations": 4})
    off = tiny(pretrain={"enabled": False})
    off_other = tiny(pretrain={"enabled": False, "iterations": 5, "lr": 0.5})
    for fn in (pipeline.teacher_hash, lambda m: pipeline.student_hash(m, "baseline", 0)):
        assert fn(on) != fn(changed) != fn(off)
        assert fn(off) == fn(off_other)  # a disabled section is not hashed at all
    assert pipeline.student_hash(on, "maskd", 0) != pipeline.student_hash(changed, "maskd", 0)
    # the student's own width makes its spec; the teacher's pretraining enters the student through teacher_hash
    assert pretrain.pretrain_spec(on, "student") != pretrain.pretrain_spec(tiny(student={"width": 32}), "student")
    teacher_wider = tiny(teacher={"width": 32})
    assert pipeline.student_hash(on, "baseline", 0) == pipeline.student_hash(teacher_wider, "baseline", 0)
    assert pipeline.student_hash(on, "maskd", 0) != pipeline.student_hash(teacher_wider, "maskd", 0)
    # off: the hashed dicts are exactly those of before the section existed (no "pretrain" key)
    seen = []
    real = pipeline.digest
    monkeypatch.setattr(pipeline, "digest", lambda obj: seen.append(obj) or real(obj))
    pipeline.teacher_hash(off)
    pipeline.student_hash(off, "maskd", 0)
    assert seen and all("pretrain" not in spec for spec in seen)
    seen.clear()
    pipeline.student_hash(on, "maskd", 0)
    assert {"pretrain" in spec for spec in seen if spec.get("stage") in ("teacher", "student")} == {True}


def test_spec_is_json_and_shared_by_the_two_tasks():
    det, seg = tiny(), tiny("embedded_segmentation_smoke")
    spec = pretrain.pretrain_spec(det, "student")
    assert spec["body"] == {"backbone": "resnet10", "width": 16}
    assert spec["scenes"]["train_digits_per_class"] == 480 and spec["pretrain"]["iterations"] == 3
    assert spec == pretrain.pretrain_spec(seg, "student")  # one ResNet-10/16 body for detection and segmentation
    assert pretrain.pretrain_spec(det, "teacher")["body"] == {"backbone": "resnet18", "width": 64}
    assert pretrain.pretrain_spec(tiny(pretrain={"enabled": False}), "teacher") is None


@pytest.mark.parametrize(
    ("overrides", "name", "pattern"),
    [
        ({"student": {"backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"}}, None, "student.backbone_weights"),
        ({"teacher": {"backbone_weights": "/some/resnet18.pth"}}, None, "teacher.backbone_weights"),
        ({"teacher": {"weights": "/some/teacher.pt"}}, None, "teacher.weights"),
        ({"pretrain": {"warmup_iters": 3}}, None, "pretrain.warmup_iters"),
        ({"pretrain": {"enabled": True}}, "coco_fcos_r101_r50", "pretrain.enabled.*data.kind = 'coco'"),
        ({"pretrain": {"unknown": 1}}, None, "unknown key 'pretrain.unknown'"),
    ],
)
def test_validation_refuses_what_cannot_be_pretrained(overrides, name, pattern):
    with pytest.raises(ManifestError, match=pattern):
        if name is None:
            load_manifest("embedded_detection_smoke", _merge(TINY, overrides), check_data=False)
        else:
            load_manifest(name, overrides, check_data=False)


def test_shipped_embedded_manifests_pretrain():
    for name in ("embedded_detection", "embedded_segmentation"):
        p = load_manifest(name, check_data=False).pretrain
        assert (p.enabled, p.image_size, p.num_images, p.iterations, p.batch_size) == (True, 64, 24000, 600, 32)
    for name in ("embedded_detection_smoke", "embedded_segmentation_smoke"):
        p = load_manifest(name, check_data=False).pretrain
        assert (p.enabled, p.iterations, p.batch_size, p.num_images) == (True, 4, 16, 200)
