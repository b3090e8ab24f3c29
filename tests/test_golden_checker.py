"""The golden checker and its console command: 29/29 on the reference set, every way a case can fail, and
directories of the same format with other shapes, seeds and level counts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from experiments.checks.golden import check_golden, summary_line
from experiments.cli import main


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
    assert len(cases) == 29
    assert len(out) == 30 and out[-1] == "PASS: 29/29 cases within tolerance"
    assert all(line.startswith("OK") and "value rel" in line for line in out[:-1])


def test_literal_forms_pass_too(reference_dir):
    results = check_golden(reference_dir, impl="literal")
    assert [r.name for r in results if not r.passed] == []


def test_console_script_runs(reference_dir):
    exe = shutil.which("maskd-bench") or None
    cmd = [exe] if exe else [sys.executable, "-m", "experiments.cli"]
    proc = subprocess.run([*cmd, "check-golden", str(reference_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS: 29/29")


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
    assert "OFF     cwd_tau4" in out and out.strip().splitlines()[-1].startswith("FAIL: 28/29")


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


# ---------------------------------------------------------------------------------------------------- new checks
def test_both_impls_get_their_own_summary_line(case_dir, capsys):
    _edit_golden(case_dir, lambda cases: cases["cwd_tau4"].__setitem__("value", cases["cwd_tau4"]["value"] * 1.01))
    assert main(["check-golden", str(case_dir), "--impl", "both"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3:] == [
        "[fast] FAIL: 28/29 cases within tolerance (off 1)",
        "[literal] FAIL: 28/29 cases within tolerance (off 1)",
        "FAIL: 56/58 cases within tolerance (off 2)",
    ]


@pytest.mark.parametrize(("case", "keyword"), [("pkd_fpn3", "reduction"), ("cwd_tau1", "temperature")])
def test_unknown_keyword_is_an_error_naming_it(case_dir, capsys, case, keyword):
    _edit_golden(case_dir, lambda cases: cases[case]["kwargs"].__setitem__(keyword, 1))
    assert main(["check-golden", str(case_dir)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    line = next(line for line in out if line.split()[1] == case)
    assert line.startswith("ERROR") and f"unknown keyword '{keyword}'" in line
    assert out[-1] == "FAIL: 28/29 cases within tolerance (error 1)"


def test_legitimate_keywords_of_every_family_are_accepted(reference_dir):
    # Every keyword the reference set carries is declared by its implementation: nothing becomes an error.
    from experiments.checks.golden import identify

    for name, case in json.loads((reference_dir / "golden.json").read_text()).items():
        impl = identify(case)
        assert impl is not None, name
        assert set(case["kwargs"]) <= impl.kwargs, (name, set(case["kwargs"]) - impl.kwargs)


def test_corrupt_or_unreadable_files_are_errors_and_the_rest_still_run(case_dir, capsys):
    import argparse

    data = (case_dir / "inputs_pkd_fpn3.pt").read_bytes()
    (case_dir / "inputs_pkd_fpn3.pt").write_bytes(data[: len(data) // 2])  # truncated
    (case_dir / "grads_mgd_same.pt").write_bytes(b"not a torch file at all\n")  # garbage
    torch.save({"ns": argparse.Namespace(a=1)}, case_dir / "outputs_maskd_seg.pt")  # refused by weights_only
    torch.save([torch.zeros(1)], case_dir / "grads_cwd_tau4.pt")  # loads, but not a dict
    assert main(["check-golden", str(case_dir)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 30
    errors = {line.split()[1]: line for line in out if line.startswith("ERROR")}
    assert set(errors) == {"pkd_fpn3", "mgd_same", "maskd_seg", "cwd_tau4"}
    assert "inputs file inputs_pkd_fpn3.pt is unreadable" in errors["pkd_fpn3"]
    assert "grads file grads_mgd_same.pt is unreadable" in errors["mgd_same"]
    assert "outputs file outputs_maskd_seg.pt is unreadable" in errors["maskd_seg"]
    assert "expected a dict" in errors["cwd_tau4"]
    assert sum(line.startswith("OK") for line in out) == 25
    assert out[-1] == "FAIL: 25/29 cases within tolerance (error 4)"


def test_renamed_pkd_and_mgd_cases_are_recognised(case_dir):
    def rename(cases):
        cases["case_17"] = cases.pop("pkd_resize_tea")
        cases["fgd_lookalike"] = cases.pop("mgd_align")  # an MGD case named like FGD
        cases["x"] = cases.pop("mgd_unit")

    _edit_golden(case_dir, rename)
    (case_dir / "meta.json").unlink()
    results = {r.name: r for r in check_golden(case_dir)}
    assert all(r.passed for r in results.values()), [r.line() for r in results.values() if not r.passed]
    assert results["case_17"].detail == "baselines.pkd.PKDLoss"
    assert results["fgd_lookalike"].detail == results["x"].detail == "baselines.mgd.MGDLoss"
    assert results["fgd_lookalike"].outputs_checked == 1  # the MGD mask is compared


def test_mgd_mask_is_compared(case_dir):
    path = case_dir / "outputs_mgd_same.pt"
    outputs = torch.load(path)
    outputs["mask"] = 1 - outputs["mask"]
    torch.save(outputs, path)
    result = next(r for r in check_golden(case_dir) if r.name == "mgd_same")
    assert result.status == "off" and result.outputs_rel > 0


def test_maskd_cases_run_the_frozen_fast_path(reference_dir, monkeypatch):
    from experiments.checks.golden import check_case
    from maskd import loss as maskd_loss

    cases = json.loads((reference_dir / "golden.json").read_text())
    names = ["maskd_loss_wm1_cm1", "maskd_loss_fpn3", "maskd_seg"]
    for name in names:
        result = check_case(reference_dir, name, cases[name], impl="fast")
        assert result.passed and "frozen" in result.checks and "frozen: value rel" in result.line()

    original = maskd_loss._WeightedSquaredError.backward
    calls = []

    def skewed(ctx, grad_out):  # the custom backward of the frozen path, 0.1% off
        calls.append(1)
        return tuple(None if g is None else g * 1.001 for g in original(ctx, grad_out))

    monkeypatch.setattr(maskd_loss._WeightedSquaredError, "backward", staticmethod(skewed))
    for name in names:
        result = check_case(reference_dir, name, cases[name], impl="fast")
        assert result.status == "off", result.line()
        assert result.value_rel <= 1e-10 and result.grad_rel <= 1e-8  # the unfrozen path is untouched
        assert result.checks["frozen"][0] <= 1e-10 and result.checks["frozen"][1] > 1e-4
        assert "frozen path off" in result.line()
    assert len(calls) == 1 + 3 + 1  # one backward per level: 1 + 3 (fpn3) + 1


def test_frozen_path_failure_is_an_error_naming_it(reference_dir, monkeypatch):
    from experiments.checks.golden import check_case
    from maskd import loss as maskd_loss

    def broken(ctx, grad_out):
        raise RuntimeError("boom")

    monkeypatch.setattr(maskd_loss._WeightedSquaredError, "backward", staticmethod(broken))
    cases = json.loads((reference_dir / "golden.json").read_text())
    result = check_case(reference_dir, "maskd_loss_wm0_cm0", cases["maskd_loss_wm0_cm0"], impl="fast")
    assert result.status == "error" and "frozen path: RuntimeError: boom" in result.line()


# ------------------------------------------------------------------------------- a generated directory, same format
def _randomise(module, g, scale=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _write_case(directory, name, entry, inputs, grads, outputs=None):
    torch.save(inputs, directory / f"inputs_{name}.pt")
    torch.save(grads, directory / f"grads_{name}.pt")
    if outputs is not None:
        torch.save(outputs, directory / f"outputs_{name}.pt")
    entry = dict(
        entry,
        dtype="float64",
        inputs=f"inputs_{name}.pt",
        grads=f"grads_{name}.pt",
        outputs=f"outputs_{name}.pt" if outputs is not None else None,
    )
    entry["value_hex"] = float.hex(entry["value"])
    return entry


def _pkd_case(directory, name, seed, student_hw, teacher_hw, n, c, loss_weight, resize_stu):
    from baselines.pkd import pkd_loss

    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(n, c, *hw, generator=g) * 2 + 0.5 for hw in teacher_hw]
    student = [torch.randn(n, c, *hw, generator=g).requires_grad_() for hw in student_hw]
    single = len(student) == 1
    value = pkd_loss(student[0] if single else student, teacher[0] if single else teacher, loss_weight, resize_stu)
    value.backward()
    entry = {
        "loss": f"PKDLoss(loss_weight={loss_weight}, resize_stu={resize_stu})(preds_S, preds_T)",
        "source": "open-mmlab/mmrazor@90c7af1fdf35:mmrazor/models/losses/pkd_loss.py",
        "kwargs": {"loss_weight": loss_weight, "resize_stu": resize_stu},
        "seed": seed,
        "value": value.item(),
    }
    inputs = {"preds_S": [s.detach() for s in student], "preds_T": teacher}
    return _write_case(directory, name, entry, inputs, {f"preds_S.{i}": s.grad for i, s in enumerate(student)})


def _mgd_case(directory, name, seed, n, cs, ct, hw, alpha, lam):
    from baselines.mgd import MGDLoss

    g = torch.Generator().manual_seed(seed)
    loss = MGDLoss(cs, ct, alpha, lam, impl="literal")
    _randomise(loss, g)
    teacher = torch.randn(n, ct, *hw, generator=g)
    student = torch.randn(n, cs, *hw, generator=g).requires_grad_()
    rand = torch.rand(n, 1, *hw, generator=g)
    value, mask = loss(student, teacher, rand=rand, return_mask=True)
    value.backward()
    grads = {"preds_S": student.grad, **{f"params.{k}": p.grad for k, p in loss.named_parameters()}}
    entry = {
        "loss": f"MGD FeatureLoss(student_channels={cs}, teacher_channels={ct}, name='loss_mgd', "
        f"alpha_mgd={alpha}, lambda_mgd={lam})(preds_S, preds_T)",
        "source": "yzd-v/MGD@2c9da0b28625:det/mmdet/distillation/losses/mgd.py",
        "kwargs": {"student_channels": cs, "teacher_channels": ct, "alpha_mgd": alpha, "lambda_mgd": lam},
        "seed": seed,
        "value": value.item(),
    }
    inputs = {
        "preds_S": student.detach(),
        "preds_T": teacher,
        "rand": rand,
        "state_dict": {k: v.detach().clone() for k, v in loss.state_dict().items()},
    }
    return _write_case(directory, name, entry, inputs, grads, {"mask": mask})


def _maskd_case(directory, name, seed, n, c, tokens, level_hw, warmup, step, loss_weight):
    from maskd import MasKDLoss

    g = torch.Generator().manual_seed(seed)
    kw = dict(num_tokens=tokens, weight_mask=True, custom_mask=True, custom_mask_warmup=warmup)
    loss = MasKDLoss(
        [c] * len(level_hw),
        tokens,
        weight_head=True,
        custom_mask=True,
        custom_mask_warmup=warmup,
        loss_weight=loss_weight,
        frozen=False,
        impl="literal",
    )
    _randomise(loss, g, 0.3)
    teacher = [torch.randn(n, c, *hw, generator=g) for hw in level_hw]
    student = [(0.6 * t + 0.8 * torch.randn(t.shape, generator=g)).requires_grad_() for t in teacher]
    value = loss(student, teacher, step=step)
    value.backward()
    grads = {f"y_s_{i}": s.grad for i, s in enumerate(student)}
    grads.update({f"params.{k}": p.grad for k, p in loss.named_parameters()})
    inputs = {f"y_s_{i}": s.detach() for i, s in enumerate(student)}
    inputs.update({f"y_t_{i}": t for i, t in enumerate(teacher)})
    inputs["state_dict"] = {k: v.detach().clone() for k, v in loss.state_dict().items()}
    inputs["iter"] = torch.tensor(step)
    entry = {
        "loss": f"MasKDLoss(channels={[c] * len(level_hw)}, num_tokens={tokens}, weight_mask=True, "
        f"custom_mask=True, custom_mask_warmup={warmup}, loss_weight={loss_weight})(y_s, y_t)",
        "source": "hunto/MasKD@b5af34fe343f:mmrazor/mmrazor/models/losses/maskd.py",
        "kwargs": {"channels": [c] * len(level_hw), **kw, "pretrained": None, "loss_weight": loss_weight},
        "seed": seed,
        "value": value.item(),
    }
    return _write_case(directory, name, entry, inputs, grads)


def test_a_generated_directory_with_other_shapes_seeds_and_levels_passes(tmp_path, golden_mode, capsys):
    # Golden values from this project's literal forms in float64: this guards the dispatch and the file format
    # (level counts, shapes, keys), not the maths, which the reference set pins.
    d = tmp_path / "generated"
    d.mkdir()
    cases = {
        "first": _pkd_case(
            d, "first", 7, [(11, 13), (6, 7), (3, 4), (2, 2)], [(11, 13), (4, 5), (3, 4), (2, 2)], 3, 5, 3.5, True
        ),
        "second": _pkd_case(d, "second", 8, [(5, 6)], [(9, 8)], 1, 3, 0.5, False),
        "third": _mgd_case(d, "third", 9, 3, 6, 10, (4, 9), 1e-3, 0.3),
        "fourth": _mgd_case(d, "fourth", 10, 1, 7, 7, (3, 5), 0.7, 0.9),
        "fifth": _maskd_case(d, "fifth", 11, 3, 6, 4, [(7, 9), (4, 3)], 2, 3, 2.0),
    }
    (d / "golden.json").write_text(json.dumps(cases))
    assert main(["check-golden", str(d), "--impl", "both"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3:] == [
        "[fast] PASS: 5/5 cases within tolerance",
        "[literal] PASS: 5/5 cases within tolerance",
        "PASS: 10/10 cases within tolerance",
    ]
    assert sum("frozen: value rel" in line for line in out) == 2  # the MasKD case, per impl
