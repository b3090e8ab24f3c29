"""Every check before any work: malformed manifests and ``--set`` overrides are refused by ``maskd-bench run`` in
one line that names where the value came from, the key and what is allowed, with exit code 2 and no MLflow store
touched (the store is created only after the manifest has been checked)."""

from __future__ import annotations

import pytest

from experiments.cli import main
from experiments.engine.manifest import MANIFEST_DIR, ManifestError, load_manifest

DET = "embedded_detection_smoke"
SEG = "embedded_segmentation_smoke"

# (manifest, --set overrides, key the message must name)
BAD_OVERRIDES = [
    (DET, ['maskd.features=["P8"]'], "maskd.features"),
    (DET, ["student_train.iterations=0"], "student_train.iterations"),
    (DET, ["teacher_train.iterations=-5"], "teacher_train.iterations"),
    (DET, ["student_train.log_every=0"], "student_train.log_every"),
    (DET, ["student_train.lr=-0.002"], "student_train.lr"),
    (DET, ["student_train.lr=nan"], "student_train.lr"),
    (DET, ["tokens.lr=0"], "tokens.lr"),
    (DET, ["student_train.batch_size=0"], "student_train.batch_size"),
    (DET, ["tokens.batch_size=0"], "tokens.batch_size"),
    (DET, ["maskd.mask_power=3"], "maskd.mask_power"),
    (DET, ["tokens.num_tokens=0"], "tokens.num_tokens"),
    (DET, ["cwd.tau=0"], "cwd.tau"),
    (DET, ["maskd.loss_weight=inf"], "maskd.loss_weight"),
    (DET, ["fgd.weight_scale=-1"], "fgd.weight_scale"),
    (DET, ["pkd.loss_weight=nan"], "pkd.loss_weight"),
    (DET, ["mgd.lambda_mgd=1.0"], "mgd.lambda_mgd"),
    (DET, ["mgd.alpha_mgd=-1e-5"], "mgd.alpha_mgd"),
    (DET, ["student_train.warmup_iters=1000"], "student_train.warmup_iters"),
    (DET, ["maskd.custom_mask_warmup=1000"], "maskd.custom_mask_warmup"),
    (DET, ["tokens.dice_weight=-1"], "tokens.dice_weight"),
    (DET, ["tokens.weight_decay=-0.1"], "tokens.weight_decay"),
    (DET, ["student_train.momentum=1.5"], "student_train.momentum"),
    (DET, ["protocol.seeds=[0, 0]"], "protocol.seeds"),
    (DET, ["protocol.seeds=[]"], "protocol.seeds"),
    (DET, ["data.image_size=100", "data.digit_size_px=[10.0, 90.0]"], "a multiple of 32"),
    (DET, ["distill.features=[]"], "distill.features"),
    (DET, ['distill.features=["P3", "P3"]'], "distill.features"),
    (DET, ['methods=["baseline", "kd"]'], "methods"),
    (DET, ['methods=["baseline", "maskd", "maskd"]'], "methods"),
    (DET, ["student_train.optimizer=lion"], "student_train.optimizer"),
    (DET, ["student_train.lr_sched=3"], "student_train.lr_sched"),
    (DET, ["student_train.iterations=many"], "student_train.iterations"),
    (SEG, ['methods=["baseline", "fgd"]'], "methods"),
    (SEG, ["maskd.masks=gt_box"], "maskd.masks"),
    (SEG, ['cwd.features=["backbone"]'], "cwd.features"),  # student 128 vs teacher 256 channels, no align conv
    (SEG, ['pkd.features=["backbone"]'], "pkd.features"),
    (SEG, ['maskd.features=["P3"]'], "maskd.features"),
    (SEG, ['fitnet.features=["logits", "logits"]'], "fitnet.features"),
]


def _run(argv: list[str], tmp_path, capsys) -> tuple[int, str, object]:
    db = tmp_path / "mlflow.db"
    rc = main([*argv, "--tracking-uri", f"sqlite:///{db}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err, db


@pytest.mark.parametrize("manifest, sets, key", BAD_OVERRIDES, ids=[" ".join(s) for _, s, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_before_any_run(manifest, sets, key, tmp_path, capsys):
    argv = ["run", manifest]
    for text in sets:
        argv += ["--set", text]
    rc, err, db = _run(argv, tmp_path, capsys)
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "--set " in lines[0] and key in lines[0], lines[0]
    assert not db.exists(), "the MLflow store was touched before the manifest was refused"


BAD_FILES = [
    ("[student_train]\niterations = 0\n", "student_train.iterations"),
    ("[tokens]\nnum_tokens = 0\n", "tokens.num_tokens"),
    ("[maskd]\nfeatures = ['P2']\n", "maskd.features"),
    ("[cwd]\ntau = -1.0\n", "cwd.tau"),
    ("[protocol]\nseeds = [1, 1, 2]\n", "protocol.seeds"),
    ("[teacher_train]\nlr = nan\n", "teacher_train.lr"),
    ("[data]\nimage_size = 120\ndigit_size_px = [10.0, 100.0]\n", "data.image_size = 120"),
]


@pytest.mark.parametrize("body, key", BAD_FILES, ids=[k for _, k in BAD_FILES])
def test_bad_manifest_file_names_the_file_and_key(body, key, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(f'base = "{MANIFEST_DIR / (DET + ".toml")}"\n' + body)
    rc, err, db = _run(["run", str(path)], tmp_path, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "mine.toml" in err and key in err, err
    assert not db.exists()


def test_a_value_set_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.toml").write_text(f'base = "{MANIFEST_DIR / (DET + ".toml")}"\n[student_train]\nbatch_size = 0\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[student_train]\nlr = 0.1\n')
    with pytest.raises(ManifestError, match=r"^base.toml: student_train.batch_size = 0 is not allowed; allowed: >= 1"):
        load_manifest(tmp_path / "child.toml")


def test_duplicate_cli_seeds_and_methods_are_refused(tmp_path, capsys):
    rc, err, db = _run(["run", DET, "--seeds", "0", "0"], tmp_path, capsys)
    assert rc == 2 and "protocol.seeds" in err and len(err.splitlines()) == 1
    rc, err, db = _run(["run", SEG, "--methods", "baseline", "fgd"], tmp_path, capsys)
    assert rc == 2 and "fgd needs boxes" in err and len(err.splitlines()) == 1
    assert not db.exists()


def test_the_message_says_what_is_allowed():
    with pytest.raises(ManifestError) as info:
        load_manifest(DET, sets=["tokens.num_tokens=0"])
    assert str(info.value) == "--set tokens.num_tokens=0: tokens.num_tokens = 0 is not allowed; allowed: >= 1, finite"
    with pytest.raises(ManifestError, match=r"allowed: features of the teacher model: P3, P4, P5, P6, P7"):
        load_manifest(DET, sets=['maskd.features=["P8"]'])
    with pytest.raises(ManifestError, match=r"equal student and teacher channels.*backbone: student 128, teacher 256"):
        load_manifest(SEG, sets=['cwd.features=["backbone"]'])


def test_every_shipped_manifest_passes_validation():
    from experiments.engine.manifest import shipped_manifests, validate

    for name in shipped_manifests():  # data and weight files: tests/test_paper_manifests.py
        assert validate(load_manifest(name, check_data=False), check_data=False) == []
