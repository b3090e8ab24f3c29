"""MGD (baselines/mgd.py): golden values of the authors' FeatureLoss, the draw, fast == literal, bad input.

Golden data: tests/data/reference (read-only); spec in shared/reference/README.md §4b and §6. Every ``mgd*`` case
listed in golden.json is checked, so cases added later are picked up without editing this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baselines.mgd import MGDLevels, MGDLoss, mgd_mask

IMPLS = ("literal", "fast")
_GOLDEN_INDEX = Path(__file__).parent / "data" / "reference" / "golden.json"
MGD_CASES = sorted(name for name in json.loads(_GOLDEN_INDEX.read_text()) if name.startswith("mgd"))


def _load_case(reference_dir: Path, case: str):
    meta = json.loads((reference_dir / "golden.json").read_text())[case]
    inputs = torch.load(reference_dir / meta["inputs"])
    grads = torch.load(reference_dir / meta["grads"])
    outputs = torch.load(reference_dir / meta["outputs"])
    return meta, inputs, grads, outputs


def _module_from_case(meta, inputs, impl: str) -> MGDLoss:
    module = MGDLoss(**meta["kwargs"], impl=impl)
    module.load_state_dict(inputs["state_dict"], strict=True)
    return module


def _feats(n, cs, ct, h, w, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, ct, h, w, generator=gen, dtype=dtype)
    student = torch.randn(n, cs, h, w, generator=gen, dtype=dtype)
    if cs == ct:
        student = 0.6 * teacher + 0.8 * student
    return student, teacher


def _seeded(module: torch.nn.Module, seed: int, dtype=torch.float64) -> torch.nn.Module:
    """Parameters as in the golden cases (weights randn·0.1, biases randn·0.05), from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    module.to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * (0.1 if name.endswith("weight") else 0.05))
    return module


def _value_and_grads(module, student, teacher, rand):
    student = student.detach().clone().requires_grad_()
    loss, mask = module(student, teacher, rand=rand, return_mask=True)
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, [student, *params])
    return loss.detach(), mask, grads


# ------------------------------------------------------------------------------------------------ golden
def test_cases_present():
    assert {"mgd_same", "mgd_align", "mgd_unit"} <= set(MGD_CASES)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", MGD_CASES)
def test_golden_value_grads_and_mask(golden_mode, reference_dir, case, impl):
    meta, inputs, grads, outputs = _load_case(reference_dir, case)
    module = _module_from_case(meta, inputs, impl)
    assert set(module.state_dict()) == set(inputs["state_dict"])
    student = inputs["preds_S"].clone().requires_grad_()
    loss, mask = module(student, inputs["preds_T"], rand=inputs["rand"], return_mask=True)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    torch.testing.assert_close(mask, outputs["mask"], rtol=0, atol=0)
    loss.backward()
    expected_keys = {"preds_S"} | {f"params.{name}" for name, _ in module.named_parameters()}
    assert set(grads) == expected_keys
    torch.testing.assert_close(student.grad, grads["preds_S"], rtol=1e-8, atol=1e-14)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, grads[f"params.{name}"], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("case", MGD_CASES)
def test_golden_mask_is_the_official_where(golden_mode, reference_dir, case):
    """λ is the masked fraction: M = where(U > 1 − λ, 0, 1), one mask for all channels."""
    meta, inputs, _, outputs = _load_case(reference_dir, case)
    mask = mgd_mask(inputs["rand"], meta["kwargs"]["lambda_mgd"])
    assert mask.dtype == torch.int64
    torch.testing.assert_close(mask.double(), outputs["mask"], rtol=0, atol=0)


@pytest.mark.parametrize("case", MGD_CASES)
def test_golden_draw_comes_from_the_case_generator(golden_mode, reference_dir, case):
    """The stored draw is what ``generator=`` draws from a generator seeded with the case seed after the stored
    parameters and features were drawn from it (observed on the shipped cases; README §6.3 names the generator)."""
    meta, inputs, _, outputs = _load_case(reference_dir, case)
    gen = torch.Generator().manual_seed(meta["seed"])
    for tensor in [*inputs["state_dict"].values(), inputs["preds_T"], inputs["preds_S"]]:
        torch.randn(tensor.shape, generator=gen)  # consume as the generation did
    module = _module_from_case(meta, inputs, "fast")  # construction draws the default init from the global RNG
    state = torch.random.get_rng_state()
    loss, mask = module(inputs["preds_S"], inputs["preds_T"], generator=gen, return_mask=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(mask, outputs["mask"], rtol=0, atol=0)
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)


def test_seeded_construction_draws_like_the_original(golden_mode):
    """Default init from the global RNG in definition order: align (1x1), then the two 3x3 convs."""
    torch.manual_seed(123)
    module = MGDLoss(8, 16)
    torch.manual_seed(123)
    align = torch.nn.Conv2d(8, 16, 1)
    conv0 = torch.nn.Conv2d(16, 16, 3, padding=1)
    conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
    expected = {"align": align, "generation.0": conv0, "generation.2": conv2}
    for prefix, conv in expected.items():
        for key, value in conv.state_dict().items():
            torch.testing.assert_close(module.state_dict()[f"{prefix}.{key}"], value, rtol=0, atol=0)
    assert MGDLoss(16, 16).align is None and "align.weight" not in MGDLoss(16, 16).state_dict()


# ------------------------------------------------------------------------------------ fast == literal
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cs, ct", [(6, 6), (4, 6)])
def test_fast_equals_literal(cs, ct, dtype, rtol):
    student, teacher = _feats(2, cs, ct, 7, 9, seed=cs, dtype=dtype)
    rand = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(1), dtype=dtype)
    literal = _seeded(MGDLoss(cs, ct, 2e-5, 0.65, impl="literal"), seed=2, dtype=dtype)
    fast = _seeded(MGDLoss(cs, ct, 2e-5, 0.65, impl="fast"), seed=2, dtype=dtype)
    lit, lit_mask, lit_grads = _value_and_grads(literal, student, teacher, rand)
    val, mask, grads = _value_and_grads(fast, student, teacher, rand)
    assert val.dtype == lit.dtype == dtype and mask.dtype == lit_mask.dtype == dtype
    assert torch.equal(mask, lit_mask)
    torch.testing.assert_close(val, lit, rtol=rtol, atol=0)
    for g_fast, g_lit in zip(grads, lit_grads):
        torch.testing.assert_close(g_fast, g_lit, rtol=rtol, atol=rtol * g_lit.abs().max().item())


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_equals_literal_non_contiguous(dtype, rtol):
    student, teacher = _feats(2, 6, 6, 5, 8, seed=3, dtype=dtype)
    rand = torch.rand(2, 1, 5, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    s_cl = student.contiguous(memory_format=torch.channels_last)
    t_tr = teacher.transpose(2, 3).contiguous().transpose(2, 3)
    r_tr = rand.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (s_cl.is_contiguous() or t_tr.is_contiguous() or r_tr.is_contiguous())
    literal = _seeded(MGDLoss(6, 6, impl="literal"), seed=5, dtype=dtype)
    fast = _seeded(MGDLoss(6, 6, impl="fast"), seed=5, dtype=dtype)
    ref, _, ref_grads = _value_and_grads(literal, student, teacher, rand)
    for module in (literal, fast):
        val, _, grads = _value_and_grads(module, s_cl, t_tr, r_tr)
        torch.testing.assert_close(val, ref, rtol=rtol, atol=0)
        for g, g_ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())


# ------------------------------------------------------------------------------------- the random draw
@pytest.mark.parametrize("impl", IMPLS)
def test_generator_draw_is_reproducible_and_leaves_global_rng_alone(impl):
    student, teacher = _feats(2, 4, 4, 6, 6, seed=6, dtype=torch.float32)
    module = _seeded(MGDLoss(4, 4, impl=impl), seed=7, dtype=torch.float32)
    state = torch.random.get_rng_state()
    first = module(student, teacher, generator=torch.Generator().manual_seed(42), return_mask=True)
    second = module(student, teacher, generator=torch.Generator().manual_seed(42), return_mask=True)
    other = module(student, teacher, generator=torch.Generator().manual_seed(43), return_mask=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    # float32 features: the draw is float32 (the official default dtype) from the generator
    rand = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(42), dtype=torch.float32)
    assert torch.equal(module(student, teacher, rand=rand), first[0])


def test_masked_fraction_is_lambda():
    student, teacher = _feats(4, 2, 2, 64, 64, seed=8, dtype=torch.float32)
    for lam in (0.5, 0.65, 0.75):
        _, mask = MGDLoss(2, 2, lambda_mgd=lam)(
            student, teacher, generator=torch.Generator().manual_seed(9), return_mask=True
        )
        assert mask.shape == (4, 1, 64, 64)
        assert 1 - mask.mean().item() == pytest.approx(lam, abs=0.02)


@pytest.mark.parametrize("impl", IMPLS)
def test_lambda_zero_keeps_everything(impl):
    student, teacher = _feats(2, 3, 3, 4, 5, seed=10)
    module = _seeded(MGDLoss(3, 3, alpha_mgd=0.5, lambda_mgd=0.0, impl=impl), seed=11)
    loss, mask = module(student, teacher, generator=torch.Generator().manual_seed(0), return_mask=True)
    assert mask.min().item() == 1.0
    expected = 0.5 * ((module.generation(student) - teacher) ** 2).sum() / 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_gradients_reach_student_and_params_not_teacher_when_detached():
    student, teacher = _feats(2, 4, 6, 5, 5, seed=12, dtype=torch.float32)
    student.requires_grad_()
    module = MGDLoss(4, 6)
    module(student, teacher, generator=torch.Generator().manual_seed(1)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# ------------------------------------------------------------------------------------------- levels
def _levels_setup(impl="fast", seed=13):
    channels_s, channels_t, sizes = [4, 6, 6], [6, 6, 6], [(8, 10), (4, 5), (2, 3)]
    levels = _seeded(MGDLevels(channels_s, channels_t, 2e-5, 0.65, impl=impl), seed=seed)
    students, teachers = [], []
    for i, (cs, ct, (h, w)) in enumerate(zip(channels_s, channels_t, sizes)):
        s, t = _feats(2, cs, ct, h, w, seed=100 + i)
        students.append(s)
        teachers.append(t)
    return levels, students, teachers, sizes


@pytest.mark.parametrize("impl", IMPLS)
def test_levels_draw_level_by_level_from_one_generator(impl):
    levels, students, teachers, sizes = _levels_setup(impl)
    assert "levels.0.align.weight" in levels.state_dict() and "levels.1.align.weight" not in levels.state_dict()
    state = torch.random.get_rng_state()
    per_level, masks = levels.forward_levels(
        students, teachers, generator=torch.Generator().manual_seed(5), return_masks=True
    )
    total, masks_again = levels(students, teachers, generator=torch.Generator().manual_seed(5), return_masks=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    gen = torch.Generator().manual_seed(5)
    rands = [torch.rand(2, 1, h, w, generator=gen, dtype=torch.float64) for h, w in sizes]
    for i, (level, s, t, r) in enumerate(zip(levels.levels, students, teachers, rands)):
        loss, mask = level(s, t, rand=r, return_mask=True)
        assert torch.equal(per_level[i], loss) and torch.equal(masks[i], mask) and torch.equal(masks_again[i], mask)
    assert torch.equal(total, per_level[0] + per_level[1] + per_level[2])
    assert torch.equal(levels(students, teachers, rand=rands), total)
    assert len(levels.forward_levels(students, teachers, rand=rands)) == 3


def test_levels_single_tensor_for_one_level():
    levels = MGDLevels([4], [4])
    student, teacher = _feats(2, 4, 4, 3, 3, seed=14)
    rand = torch.rand(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    levels.double()
    torch.testing.assert_close(levels(student, teacher, rand=rand), levels.levels[0](student, teacher, rand=rand))


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_raises(impl):
    student, teacher = _feats(2, 4, 6, 5, 5, seed=15, dtype=torch.float32)
    rand = torch.rand(2, 1, 5, 5)
    gen = torch.Generator().manual_seed(0)
    module = MGDLoss(4, 6, impl=impl)
    with pytest.raises(ValueError, match="pass rand= .* or generator= .*never draws from the global RNG"):
        module(student, teacher)
    with pytest.raises(ValueError, match="either rand or generator, not both"):
        module(student, teacher, rand=rand, generator=gen)
    with pytest.raises(ValueError, match=r"rand has shape \(2, 1, 5, 4\), expected \[N, 1, H, W\] = \(2, 1, 5, 5\)"):
        module(student, teacher, rand=rand[..., :4])
    with pytest.raises(ValueError, match="rand must be a floating-point"):
        module(student, teacher, rand=(rand > 0.5).long())
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        module(student, teacher, generator=0)
    with pytest.raises(ValueError, match=r"student_feats has 6 channels .*student_channels=4"):
        module(teacher, teacher, rand=rand)
    with pytest.raises(ValueError, match=r"teacher_feats has 4 channels .*teacher_channels=6"):
        module(student, student, rand=rand)
    with pytest.raises(ValueError, match=r"student_feats has shape \(2, 4, 5, 4\) but teacher_feats has shape"):
        module(student[..., :4], teacher, rand=rand)
    with pytest.raises(ValueError, match="same N, H, W"):
        module(student[:1], teacher, rand=rand)
    with pytest.raises(ValueError, match="4-D"):
        module(student[0], teacher[0], rand=rand)
    with pytest.raises(ValueError, match="lambda_mgd"):
        MGDLoss(4, 4, lambda_mgd=1.5)
    with pytest.raises(ValueError, match="alpha_mgd"):
        MGDLoss(4, 4, alpha_mgd=float("nan"))
    with pytest.raises(ValueError, match="student_channels must be a positive int"):
        MGDLoss(0, 4)
    with pytest.raises(ValueError, match="impl"):
        MGDLoss(4, 4, impl="quick")


def test_levels_bad_input_raises():
    levels, students, teachers, sizes = _levels_setup()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="student_feats has 2 levels, the loss was built for 3"):
        levels(students[:2], teachers, generator=gen)  # a shorter tuple is rejected, not truncated
    with pytest.raises(ValueError, match="teacher_feats has 2 levels, the loss was built for 3"):
        levels(students, teachers[:2], generator=gen)
    with pytest.raises(ValueError, match="pass rand= .* or generator="):
        levels(students, teachers)
    with pytest.raises(ValueError, match="either rand or generator"):
        levels(students, teachers, rand=[], generator=gen)
    with pytest.raises(ValueError, match=r"rand has 2 draws, expected one \[N, 1, H, W\] tensor per level \(3\)"):
        levels(students, teachers, rand=[torch.rand(2, 1, h, w) for h, w in sizes[:2]])
    with pytest.raises(ValueError, match=r"rand\[1\] has shape \(2, 1, 8, 10\)"):
        levels(students, teachers, rand=[torch.rand(2, 1, *sizes[0]) for _ in sizes])
    with pytest.raises(ValueError, match=r"student_feats\[1\] has 4 channels"):
        levels([students[0], students[0][:, :, :4, :5], students[2]], teachers, generator=gen)
    with pytest.raises(ValueError, match="student_channels has 2 levels but teacher_channels has 1"):
        MGDLevels([4, 4], [4])
    with pytest.raises(ValueError, match="non-empty sequence"):
        MGDLevels(4, 4)
