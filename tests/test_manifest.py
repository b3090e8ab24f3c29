"""Manifests: every shipped one loads; unknown keys, wrong types and bad values are one-line errors."""

from __future__ import annotations

import pytest

from experiments.engine.manifest import (
    ManifestError,
    digest,
    load_manifest,
    parse_override,
    shipped_manifests,
)
from experiments.engine.models import DetectorConfig, SegmenterConfig
from experiments.engine.pipeline import student_hash, teacher_hash, tokens_hash


@pytest.mark.parametrize("name", shipped_manifests())
def test_every_shipped_manifest_loads_and_flattens(name):
    # the paper manifests name a data root and weight files the user gives: their structure is checked here,
    # the files by tests/test_paper_manifests.py on fixture layouts
    m = load_manifest(name, check_data=False)
    assert m.paper_row and m.protocol.seeds
    assert isinstance(m.teacher, DetectorConfig if m.task == "detection" else SegmenterConfig)
    flat = m.flat()
    assert flat["task"] == m.task and "student_train.iterations" in flat and "data.kind" in flat
    if flat["data.kind"] == "embedded":
        assert "data.num_train" in flat
    for method in m.methods:
        assert m.features_for(method)


def test_shipped_set_covers_both_tasks_and_profiles():
    names = set(shipped_manifests())
    assert {
        "embedded_detection",
        "embedded_detection_smoke",
        "embedded_segmentation",
        "embedded_segmentation_smoke",
    } <= names


def _write(tmp_path, text, name="m.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = 'base = "{base}"\n'


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    path = _write(tmp_path, BASE.format(base=_shipped("embedded_detection_smoke")) + "[student_train]\nlr_sched = 3\n")
    with pytest.raises(
        ManifestError,
        match=r"unknown key 'student_train.lr_sched' in m.toml; allowed in "
        r"student_train: iterations",
    ):
        load_manifest(path)
    path = _write(tmp_path, BASE.format(base=_shipped("embedded_detection_smoke")) + "colour = 'red'\n")
    with pytest.raises(ManifestError, match=r"unknown key 'colour'"):
        load_manifest(path)
    path = _write(tmp_path, BASE.format(base=_shipped("embedded_detection_smoke")) + "[teacher]\ndepth = 3\n")
    with pytest.raises(ManifestError, match=r"unknown key 'teacher.depth'"):
        load_manifest(path)


def _shipped(name):
    from experiments.engine.manifest import MANIFEST_DIR

    return str(MANIFEST_DIR / f"{name}.toml")


@pytest.mark.parametrize(
    "body, pattern",
    [
        (
            "[student_train]\niterations = 'many'\n",
            r"student_train.iterations must be an integer in m.toml, got str",
        ),
        ("[student_train]\nlr = true\n", r"student_train.lr must be a number"),
        (
            "[student_train]\noptimizer = 'lion'\n",
            r"student_train.optimizer = 'lion' in m.toml; allowed: 'sgd'",
        ),
        ("[protocol]\nseeds = 3\n", r"protocol.seeds must be a list"),
        ("[maskd]\ncustom_mask = 1\n", r"maskd.custom_mask must be bool"),
        ("methods = ['baseline', 'kd']\n", r"m.toml: methods = 'kd' is not allowed; allowed: baseline, fitnet"),
        ("[teacher]\nbackbone = 'vgg16'\n", r"teacher in m.toml: .*backbone"),
        (
            "[teacher]\nimage_size = 256\n",
            r"m.toml: teacher.image_size = 256 differs from data.image_size = 128",
        ),
        ("[data]\ndigits_per_image = [1]\n", r"data"),
    ],
)
def test_wrong_types_and_values_are_named(tmp_path, body, pattern):
    path = _write(tmp_path, BASE.format(base=_shipped("embedded_detection_smoke")) + body)
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(path)


def test_fgd_is_refused_for_segmentation(tmp_path):
    path = _write(
        tmp_path,
        BASE.format(base=_shipped("embedded_segmentation_smoke")) + "methods = ['baseline', 'fgd']\n",
    )
    with pytest.raises(ManifestError, match="fgd needs boxes for segmentation"):
        load_manifest(path)


def test_missing_manifest_and_base_cycle(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "absent.toml")
    _write(tmp_path, 'base = "b.toml"\n', "a.toml")
    _write(tmp_path, 'base = "a.toml"\n', "b.toml")
    with pytest.raises(ManifestError, match="base cycle"):
        load_manifest(tmp_path / "a.toml")


def test_child_is_a_small_change_to_its_base():
    full, smoke = load_manifest("embedded_detection"), load_manifest("embedded_detection_smoke")
    assert smoke.student_train.iterations < full.student_train.iterations
    assert smoke.maskd.loss_weight == full.maskd.loss_weight and smoke.fgd == full.fgd


def test_overrides_and_hashes():
    assert parse_override("student_train.lr=0.5") == {"student_train": {"lr": 0.5}}
    assert parse_override("maskd.masks=uniform") == {"maskd": {"masks": "uniform"}}
    base = load_manifest("embedded_detection_smoke")
    changed = load_manifest("embedded_detection_smoke", parse_override("student_train.lr=0.5"))
    assert changed.student_train.lr == 0.5
    assert teacher_hash(base) == teacher_hash(changed) and tokens_hash(base) == tokens_hash(changed)
    assert student_hash(base, "maskd", 0) != student_hash(changed, "maskd", 0)
    assert student_hash(base, "maskd", 0) != student_hash(base, "maskd", 1)
    assert student_hash(base, "baseline", 0) == student_hash(
        load_manifest("embedded_detection_smoke", parse_override("maskd.loss_weight=1.0")), "baseline", 0
    )
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    with pytest.raises(ManifestError, match="section.key=value"):
        parse_override("nonsense")
