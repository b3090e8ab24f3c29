"""PKD (baselines/pkd.py): golden values of mmrazor's PKDLoss, fast == literal, properties, bad input.

Golden data: tests/data/reference (read-only); spec in shared/reference/README.md §4a and §6. Every ``pkd*`` case
listed in golden.json is checked, so cases added later are picked up without editing this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baselines.pkd import PKDLoss, pkd_level_loss, pkd_loss, pkd_standardize

IMPLS = ("literal", "fast")
_GOLDEN_INDEX = Path(__file__).parent / "data" / "reference" / "golden.json"
PKD_CASES = sorted(name for name in json.loads(_GOLDEN_INDEX.read_text()) if name.startswith("pkd"))


def _load_case(reference_dir: Path, case: str):
    meta = json.loads((reference_dir / "golden.json").read_text())[case]
    inputs = torch.load(reference_dir / meta["inputs"])
    grads = torch.load(reference_dir / meta["grads"])
    return meta, inputs, grads


def _as_call(feats: list):
    """Golden inputs store lists; a one-element list stands for a single-tensor call (README §4b, last note)."""
    return feats[0] if len(feats) == 1 else tuple(feats)


def _pair(shape_s, shape_t=None, seed=0, dtype=torch.float64, scale_t=3.0, shift=0.3):
    gen = torch.Generator().manual_seed(seed)
    shape_t = shape_t or shape_s
    teacher = scale_t * torch.randn(shape_t, generator=gen, dtype=dtype) + shift
    student = torch.randn(shape_s, generator=gen, dtype=dtype)
    if shape_s == shape_t:
        student = 0.6 * teacher + 0.8 * student
    return student, teacher


def _value_and_grads(crit, student, teacher):
    """Loss and gradients w.r.t. every student and teacher level (both require grad)."""
    students = [s.detach().clone().requires_grad_() for s in student]
    teachers = [t.detach().clone().requires_grad_() for t in teacher]
    loss = crit(_as_call(students), _as_call(teachers))
    grads = torch.autograd.grad(loss, students + teachers)
    return loss.detach(), grads


# ------------------------------------------------------------------------------------------------ golden
def test_cases_present():
    assert {"pkd_single", "pkd_fpn3", "pkd_resize_stu", "pkd_resize_tea"} <= set(PKD_CASES)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PKD_CASES)
def test_golden_value_and_grad(golden_mode, reference_dir, case, impl):
    meta, inputs, grads = _load_case(reference_dir, case)
    students = [s.clone().requires_grad_() for s in inputs["preds_S"]]
    loss = PKDLoss(**meta["kwargs"], impl=impl)(_as_call(students), _as_call(inputs["preds_T"]))
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    assert set(grads) == {f"preds_S.{i}" for i in range(len(students))}
    for i, s in enumerate(students):
        torch.testing.assert_close(s.grad, grads[f"preds_S.{i}"], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("case", PKD_CASES)
def test_golden_functional_and_levels(golden_mode, reference_dir, case):
    meta, inputs, _ = _load_case(reference_dir, case)
    kwargs = meta["kwargs"]
    weight, resize_stu = kwargs.get("loss_weight", 1.0), kwargs.get("resize_stu", True)
    value = pkd_loss(_as_call(inputs["preds_S"]), _as_call(inputs["preds_T"]), weight, resize_stu)
    assert value.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    # Lists (as stored) are the same call as tensors / tuples.
    assert pkd_loss(inputs["preds_S"], inputs["preds_T"], weight, resize_stu).item() == value.item()
    for impl in IMPLS:
        crit = PKDLoss(**kwargs, impl=impl)
        levels = crit.forward_levels(inputs["preds_S"], inputs["preds_T"])
        assert len(levels) == len(inputs["preds_S"]) and all(v.dim() == 0 for v in levels)
        assert sum(levels).item() == pytest.approx(meta["value"], rel=1e-12, abs=0)
        for level, s, t in zip(levels, inputs["preds_S"], inputs["preds_T"]):
            expected = weight * pkd_level_loss(s, t, resize_stu, impl=impl)
            torch.testing.assert_close(level, expected, rtol=1e-14, atol=0)


def test_golden_resize_rule(golden_mode, reference_dir):
    """resize_stu=True resizes the student to the teacher's size (bilinear, align_corners=False), and vice versa."""
    meta, inputs, _ = _load_case(reference_dir, "pkd_resize_stu")
    (s,), (t,) = inputs["preds_S"], inputs["preds_T"]
    resized = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
    assert pkd_loss(resized, t).item() == pytest.approx(meta["value"], rel=1e-12, abs=0)
    meta, inputs, _ = _load_case(reference_dir, "pkd_resize_tea")
    (s,), (t,) = inputs["preds_S"], inputs["preds_T"]
    resized = F.interpolate(t, size=s.shape[2:], mode="bilinear", align_corners=False)
    assert pkd_loss(s, resized, loss_weight=2.0).item() == pytest.approx(meta["value"], rel=1e-12, abs=0)


# ------------------------------------------------------------------------------------ fast == literal
FAST_CASES = [  # (student shapes, teacher shapes, resize_stu)
    ([(2, 16, 9, 12)], [(2, 16, 9, 12)], True),
    ([(2, 8, 10, 12), (2, 8, 5, 6), (2, 8, 3, 3)], [(2, 8, 10, 12), (2, 8, 5, 6), (2, 8, 3, 3)], True),
    ([(3, 5, 12, 14)], [(3, 5, 6, 7)], True),
    ([(2, 6, 6, 7)], [(2, 6, 11, 13)], False),
    ([(1, 4, 2, 1)], [(1, 4, 2, 1)], True),  # N·H·W = 2, the smallest allowed
]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shapes_s, shapes_t, resize_stu", FAST_CASES)
def test_fast_equals_literal(shapes_s, shapes_t, resize_stu, dtype, rtol):
    students, teachers = [], []
    for i, (shape_s, shape_t) in enumerate(zip(shapes_s, shapes_t)):
        s, t = _pair(shape_s, shape_t, seed=10 + i, dtype=dtype)
        students.append(s)
        teachers.append(t)
    lit, lit_grads = _value_and_grads(PKDLoss(2.5, resize_stu, impl="literal"), students, teachers)
    fast, fast_grads = _value_and_grads(PKDLoss(2.5, resize_stu, impl="fast"), students, teachers)
    assert fast.dtype == lit.dtype == dtype
    torch.testing.assert_close(fast, lit, rtol=rtol, atol=0)
    for g_fast, g_lit in zip(fast_grads, lit_grads):
        # Gradients are O(1/numel); with N·H·W = 2 a standardised channel is ±1/√2 whatever the values, so the
        # true gradient is only the 1e-6 term's and the computed one mostly rounding: compare on that scale.
        scale = max(g_lit.abs().max().item(), 1.0 / g_lit.numel())
        torch.testing.assert_close(g_fast, g_lit, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_equals_literal_non_contiguous(dtype, rtol):
    s, t = _pair((2, 6, 7, 9), seed=3, dtype=dtype)
    s_cl = s.contiguous(memory_format=torch.channels_last)
    t_tr = t.transpose(2, 3).contiguous().transpose(2, 3)
    s_sliced = torch.stack([s, s], dim=2).flatten(1, 2)[:, ::2]  # strided channels, same values
    assert not t_tr.is_contiguous() and not s_cl.is_contiguous() and not s_sliced.is_contiguous()
    expected = pkd_loss(s, t)
    for student in (s_cl, s_sliced):
        lit, lit_grads = _value_and_grads(PKDLoss(impl="literal"), [student], [t_tr])
        fast, fast_grads = _value_and_grads(PKDLoss(impl="fast"), [student], [t_tr])
        torch.testing.assert_close(lit, expected, rtol=rtol, atol=0)
        torch.testing.assert_close(fast, lit, rtol=rtol, atol=0)
        for g_fast, g_lit in zip(fast_grads, lit_grads):
            torch.testing.assert_close(g_fast, g_lit, rtol=rtol, atol=rtol * g_lit.abs().max().item())


def test_fast_teacher_without_grad_and_student_only():
    s, t = _pair((2, 4, 5, 6), seed=4)
    s.requires_grad_()
    loss = PKDLoss(impl="fast")(s, t)
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------- properties
def _pearson_form(student, teacher):
    """Independent spelling: (M−1)/M · mean_c (1 − r_c), r_c = Pearson correlation of channel c over (N, H, W)."""
    n, c, h, w = student.shape
    m = n * h * w
    flat_s = student.transpose(0, 1).reshape(c, m)
    flat_t = teacher.transpose(0, 1).reshape(c, m)
    r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(flat_s, flat_t)])
    return (m - 1) / m * (1 - r).mean()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pearson_correlation_form(impl, seed):
    s, t = _pair((2, 5, 6, 7), seed=seed)
    got = PKDLoss(impl=impl)(s, t)
    torch.testing.assert_close(got, _pearson_form(s, t), rtol=1e-5, atol=0)  # 1e-6 on the std: not exact


@pytest.mark.parametrize("impl", IMPLS)
def test_invariant_to_positive_affine_maps_per_channel(impl):
    s, t = _pair((2, 5, 6, 7), seed=5)
    gen = torch.Generator().manual_seed(6)
    scale = torch.rand(1, 5, 1, 1, generator=gen, dtype=torch.float64) * 4 + 0.5
    shift = torch.randn(1, 5, 1, 1, generator=gen, dtype=torch.float64) * 10
    crit = PKDLoss(loss_weight=6.0, impl=impl)
    torch.testing.assert_close(crit(s * scale + shift, t), crit(s, t), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_when_student_equals_teacher(impl):
    _, t = _pair((2, 4, 5, 6), seed=7)
    s = t.clone().requires_grad_()
    loss = PKDLoss(loss_weight=6.0, impl=impl)(s, t)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_permutation_invariance(impl):
    s, t = _pair((4, 3, 5, 6), seed=8)
    perm = torch.tensor([2, 0, 3, 1])
    crit = PKDLoss(impl=impl)
    torch.testing.assert_close(crit(s[perm], t[perm]), crit(s, t), rtol=1e-12, atol=0)


def test_statistics_are_per_channel_over_the_batch():
    """Standardised features have zero mean and (M−1)/M·σ²/(σ+ε)² ≈ unit variance per channel over (N, H, W)."""
    x, _ = _pair((3, 4, 5, 6), seed=9)
    z = pkd_standardize(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=z.dtype), rtol=0, atol=1e-14)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4, dtype=z.dtype), rtol=1e-5, atol=0)
    # Changing one image changes the standardisation of the others.
    y = x.clone()
    y[0] *= 3
    assert not torch.allclose(pkd_standardize(y)[1], z[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_channel_is_finite(impl):
    s, t = _pair((2, 3, 4, 4), seed=11)
    s[:, 1] = 0.5  # std 0: the official 1e-6 keeps the value finite; std's backward is 0 there
    t[:, 2] = -1.25
    s.requires_grad_()
    t.requires_grad_()
    loss = PKDLoss(impl=impl)(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_constant_channel_fast_equals_literal():
    s, t = _pair((2, 3, 4, 4), seed=12)
    s[:, 1] = 0.5
    t[:, 2] = -1.25
    lit, lit_grads = _value_and_grads(PKDLoss(impl="literal"), [s], [t])
    fast, fast_grads = _value_and_grads(PKDLoss(impl="fast"), [s], [t])
    torch.testing.assert_close(fast, lit, rtol=1e-10, atol=0)
    for g_fast, g_lit in zip(fast_grads, lit_grads):
        torch.testing.assert_close(g_fast, g_lit, rtol=1e-10, atol=1e-10 * g_lit.abs().max().item())


def test_bf16_features_stay_finite():
    s, t = _pair((2, 4, 6, 6), seed=13, dtype=torch.float32)
    s16 = s.bfloat16().requires_grad_()
    fast = PKDLoss(impl="fast")(s16, t.bfloat16())
    assert fast.dtype == torch.float32  # statistics of 16-bit features are taken in float32
    fast.backward()
    assert torch.isfinite(fast) and s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()
    assert fast.item() == pytest.approx(pkd_loss(s, t).item(), rel=5e-2)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_raises(impl):
    s, t = _pair((2, 4, 6, 7), seed=14)
    crit = PKDLoss(impl=impl)
    with pytest.raises(ValueError, match="student_feats has 2 levels but teacher_feats has 3"):
        crit((s, s), (t, t, t))  # the official zip would silently drop the third level
    with pytest.raises(ValueError, match="student_feats has 3 levels but teacher_feats has 2"):
        crit([s, s, s], [t, t])
    with pytest.raises(ValueError, match=r"student_feats\[1\] has 3 channels but teacher_feats\[1\] has 4.*no align"):
        crit([s, s[:, :3]], [t, t])
    with pytest.raises(ValueError, match="student_feats has 4 channels but teacher_feats has 5.*no align conv"):
        crit(s, torch.cat([t, t[:, :1]], dim=1))
    with pytest.raises(ValueError, match="batch size 1 but teacher_feats has 2"):
        crit(s[:1], t)
    with pytest.raises(ValueError, match=r"after the height-only resize rule"):
        crit(s, t[..., :5])  # equal heights are never resized, so different widths fail
    with pytest.raises(ValueError, match="4-D"):
        crit(s[0], t[0])
    with pytest.raises(ValueError, match="both be tensors or both be sequences"):
        crit(s, [t])
    with pytest.raises(ValueError, match="empty"):
        crit([], [])
    with pytest.raises(ValueError, match="must be tensors"):
        crit([s, None], [t, t])
    with pytest.raises(ValueError, match="N\\*H\\*W = 1"):
        crit(s[:1, :, :1, :1], t[:1, :, :1, :1])
    with pytest.raises(ValueError, match="floating-point"):
        crit(s.long(), t.long())
    with pytest.raises(ValueError, match="impl"):
        PKDLoss(impl="quick")
    with pytest.raises(ValueError, match="levels"):
        pkd_loss((s, s), (t,))


def test_repr_names_the_settings():
    assert "loss_weight=6.0, resize_stu=False, impl='literal'" in repr(PKDLoss(6, False, impl="literal"))
