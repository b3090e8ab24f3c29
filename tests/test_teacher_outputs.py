"""The teacher-output cache (``distill.teacher_cache``): served features bitwise equal to the live teacher's at every
step of a real run, the same student with and without it, computed once, keyed by the teacher's weights, refused
where an image's teacher features change from step to step."""

from __future__ import annotations

import pytest
import torch

from experiments.datasets import get_kind
from experiments.engine import distill, stages
from experiments.engine import teacher_outputs as outputs
from experiments.engine.manifest import ManifestError, load_manifest
from experiments.engine.pipeline import student_hash
from experiments.engine.tokens import teacher_features
from experiments.tasks import get_task


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "maskd-cache"  # the scenes are shared with the other tests
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(root))
    return root


def _manifest(name: str, cached: bool, **train):
    return load_manifest(
        name, {"distill": {"teacher_cache": cached}, "student_train": {"iterations": 4, "log_every": 1, **train}}
    )


def _random_teacher(m, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return stages.cpu_state(get_task(m.task).build_model(m.teacher))


def _train(m, teacher_state):
    logged = []
    result = stages.train_student(m, "cwd", 0, teacher_state, None, lambda v, s: logged.append((s, v)), False)
    return logged, result


# detection: the teacher reads the student's transformed batch; segmentation: two forwards per step (accumulation)
@pytest.mark.parametrize(
    ("name", "train"),
    [("embedded_detection_smoke", {}), ("embedded_segmentation_smoke", {"batch_per_device": 4})],
)
def test_cached_features_are_the_live_ones_and_the_student_is_the_same(cache, monkeypatch, name, train):
    live_m, cached_m = _manifest(name, False, **train), _manifest(name, True, **train)
    teacher_state = _random_teacher(live_m)
    live_logged, live = _train(live_m, teacher_state)

    original = distill.distillation_terms
    compared: list[bool] = []

    def checked(manifest, method, distillation, teacher, images, feats, step, extras, teacher_feats=None):
        task = get_task(manifest.task)
        fresh = teacher_features(manifest, teacher, task.teacher_input(images, extras), distillation.names)
        compared.append(all(torch.equal(a, b) for a, b in zip(fresh, teacher_feats, strict=True)))
        return original(manifest, method, distillation, teacher, images, feats, step, extras, teacher_feats)

    monkeypatch.setattr(distill, "distillation_terms", checked)
    cached_logged, cached = _train(cached_m, teacher_state)

    forwards = 4 * (2 if train else 1)
    assert compared == [True] * forwards  # every forward's served features, bitwise
    assert cached_logged == live_logged  # every logged loss, bitwise
    assert live.state_dict.keys() == cached.state_dict.keys()
    assert all(torch.equal(live.state_dict[k], cached.state_dict[k]) for k in live.state_dict)
    timing = {"step_time_s"}
    assert {k: v for k, v in cached.metrics.items() if k not in timing} == {
        k: v for k, v in live.metrics.items() if k not in timing
    }


def test_computed_once_then_loaded(cache, monkeypatch):
    m = _manifest("embedded_segmentation_smoke", True)
    teacher = stages.freeze(stages.load_model(m, "teacher", _random_teacher(m, seed=7)))
    calls = []
    compute = outputs.compute_outputs
    monkeypatch.setattr(outputs, "compute_outputs", lambda *a, **k: calls.append(1) or compute(*a, **k))
    first = outputs.load_or_compute(m, teacher, ["logits"], 8, progress=False)
    second = outputs.load_or_compute(m, teacher, ["logits"], 8, progress=False)
    assert (first.computed, second.computed, len(calls)) == (True, False, 1)
    assert first.path == second.path and first.path.is_relative_to(cache)
    assert torch.equal(first.features["logits"], second.features["logits"])
    assert first.features["logits"].shape[0] == m.data.num_train
    # a corrupt file is recomputed, not served
    first.path.write_bytes(b"not a checkpoint")
    third = outputs.load_or_compute(m, teacher, ["logits"], 8, progress=False)
    assert third.computed and torch.equal(third.features["logits"], first.features["logits"])


def test_key_follows_the_teacher_state_features_and_batch(cache):
    m = _manifest("embedded_segmentation_smoke", True)
    teacher = stages.freeze(stages.load_model(m, "teacher", _random_teacher(m)))
    key = outputs.outputs_key(m, teacher, ["logits"], 8)
    assert key == outputs.outputs_key(m, teacher, ["logits"], 8)
    assert key != outputs.outputs_key(m, teacher, ["backbone"], 8)
    assert key != outputs.outputs_key(m, teacher, ["logits"], 4)
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1e-6
    assert key != outputs.outputs_key(m, teacher, ["logits"], 8)


def test_refused_with_random_transforms_or_multiscale_teacher_input(cache, monkeypatch):
    with pytest.raises(ManifestError, match=r"distill.teacher_cache = True is not allowed.*multiscale_short"):
        load_manifest("embedded_detection_smoke", {"student": {"multiscale_short": [96, 128]}})
    monkeypatch.setattr(get_kind("embedded"), "random_transforms", True)
    with pytest.raises(ManifestError, match=r"teacher_cache = True is not allowed.*augmented at random") as err:
        load_manifest("embedded_segmentation_smoke")
    assert "\n" not in str(err.value)
    assert not load_manifest("embedded_segmentation_smoke", {"distill": {"teacher_cache": False}}).distill.teacher_cache


def test_student_hash_changes_only_when_set(cache):
    on, off = (load_manifest("embedded_segmentation_smoke", {"distill": {"teacher_cache": v}}) for v in (True, False))
    assert student_hash(on, "cwd", 0) != student_hash(off, "cwd", 0)
    assert student_hash(on, "baseline", 0) == student_hash(off, "baseline", 0)
