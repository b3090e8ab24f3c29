"""The golden checker and its console command: 22/22 on the reference set, and every way a case can fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from experiments.cli import main
from experiments.checks.golden import check_golden, summary_line


@pytest.fixture
def case_dir(tmp_path, reference_dir):
    target = tmp_path / "cases"
    shutil.copytree(reference_dir, target)
    for p in target.iterdir():
        p.chmod(0o644)
    return target


def _edit_golden(directory, edit):
    path = directory / "golden.json"
    cases = json.loads(path.read_text())
    edit(cases)
    path.write_text(json.dumps(cases))


def test_all_reference_cases_pass(reference_dir, capsys):
    assert main(["check-golden", str(reference_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    cases = json.loads((reference_dir / "golden.json").read_text())
    assert len(cases) == 22
    assert len(out) == 23 and out[-1] == "PASS: 22/22 cases within tolerance"
    assert all(line.startswith("OK") and "value rel" in line for line in out[:-1])


def test_literal_forms_pass_too(reference_dir):
    results = check_golden(reference_dir, impl="literal")
    assert [r.name for r in results if not r.passed] == []


def test_console_script_runs(reference_dir):
    exe = shutil.which("maskd-bench") or None
    cmd = [exe] if exe else [sys.executable, "-m", "experiments.cli"]
    proc = subprocess.run([*cmd, "check-golden", str(reference_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS: 22/22")


def test_dispatch_does_not_depend_on_case_names(case_dir):
    def rename(cases):
        cases["renamed_fpn_case"] = cases.pop("maskd_loss_fpn3")
        cases["another_fgd"] = cases.pop("fgd_edge_boxes")

    _edit_golden(case_dir, rename)
    (case_dir / "meta.json").unlink()
    results = {r.name: r for r in check_golden(case_dir)}
    assert results["renamed_fpn_case"].passed and results["another_fgd"].passed


def test_value_off_fails(case_dir, capsys):
    def nudge(cases):
        cases["cwd_tau4"]["value"] *= 1 + 1e-8

    _edit_golden(case_dir, nudge)
    assert main(["check-golden", str(case_dir)]) == 1
    out = capsys.readouterr().out
    assert "OFF     cwd_tau4" in out and out.strip().splitlines()[-1].startswith("FAIL: 21/22")


def test_gradient_off_fails(case_dir):
    path = case_dir / "grads_maskd_loss_wm1_cm1.pt"
    grads = torch.load(path)
    grads["y_s"] = grads["y_s"] * (1 + 1e-6)
    torch.save(grads, path)
    results = {r.name: r for r in check_golden(case_dir)}
    assert results["maskd_loss_wm1_cm1"].status == "off"
    assert results["maskd_loss_wm1_cm1"].worst_grad == "y_s"


def test_missing_file_and_missing_case_fail(case_dir, capsys):
    (case_dir / "inputs_fitnet_mse_fpn3.pt").unlink()
    _edit_golden(case_dir, lambda cases: cases.pop("dice_coeff"))
    (case_dir / "inputs_dice_coeff.pt").unlink()
    assert main(["check-golden", str(case_dir)]) == 1
    out = capsys.readouterr().out
    assert "MISSING fitnet_mse_fpn3" in out
    assert "MISSING dice_coeff" in out and "meta.json" in out


def test_unknown_case_fails(case_dir):
    def add(cases):
        cases["mystery"] = dict(cases["cwd_tau1"], loss="SomeOtherLoss()(x)", source="elsewhere/other.py")

    _edit_golden(case_dir, add)
    torch.save({}, case_dir / "inputs_stray.pt")
    results = {r.name: r for r in check_golden(case_dir)}
    assert results["mystery"].status == "unknown"
    assert results["stray"].status == "unknown"
    assert summary_line(list(results.values())).startswith("FAIL")


def test_missing_golden_json_is_an_error(tmp_path, capsys):
    assert main(["check-golden", str(tmp_path)]) == 2
    assert "golden.json" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "check-golden" in capsys.readouterr().out
