"""FitNet variants: golden values from the original MasKD/mdistiller/mmrazor code, properties, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from baselines.fitnet import FitNetMSE, MdistillerFitNet, MmrazorL2Loss

HYP = settings(max_examples=20, deadline=None, database=None)


def _golden(reference_dir, case):
    meta = json.loads((reference_dir / "golden.json").read_text())[case]
    inputs = torch.load(reference_dir / meta["inputs"])
    grads = torch.load(reference_dir / meta["grads"])
    return meta, inputs, grads


def _close_grad(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-14)


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _identity_align(model):
    with torch.no_grad():
        for conv in model.align:
            conv.weight.zero_()
            conv.weight[:, :, 0, 0].copy_(torch.eye(conv.out_channels, conv.in_channels))
            conv.bias.zero_()


# --------------------------------------------------------------------------------------------- golden
def test_golden_fitnet_mse_align(golden_mode, reference_dir):
    meta, inputs, grads = _golden(reference_dir, "fitnet_mse_align")
    model = FitNetMSE(8, 16, **meta["kwargs"])
    model.align[0].load_state_dict(inputs["align_state_dict"])
    s = inputs["y_s"].clone().requires_grad_()
    loss = model(s, inputs["y_t"])
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    _close_grad(s.grad, grads["y_s"])
    _close_grad(model.align[0].weight.grad, grads["align.weight"])
    _close_grad(model.align[0].bias.grad, grads["align.bias"])


def test_golden_fitnet_mse_fpn3(golden_mode, reference_dir):
    meta, inputs, grads = _golden(reference_dir, "fitnet_mse_fpn3")
    model = FitNetMSE([8, 8, 8], [16, 16, 16], **meta["kwargs"])
    model.align.load_state_dict(inputs["align_state_dict"])
    ss = [inputs[f"y_s_{i}"].clone().requires_grad_() for i in range(3)]
    loss = model(ss, tuple(inputs[f"y_t_{i}"] for i in range(3)))
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    for i in range(3):
        _close_grad(ss[i].grad, grads[f"y_s_{i}"])


def test_golden_mdistiller_convreg(golden_mode, reference_dir):
    meta, inputs, grads = _golden(reference_dir, "fitnet_mdistiller_convreg")
    model = MdistillerFitNet(inputs["y_s"].shape, inputs["y_t"].shape, feat_weight=100.0, use_relu=True)
    assert set(model.state_dict()) == set(inputs["state_dict"])
    model.load_state_dict(inputs["state_dict"])
    model.train()
    s = inputs["y_s"].clone().requires_grad_()
    loss = model(s, inputs["y_t"])
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    _close_grad(s.grad, grads["y_s"])


def test_golden_mmrazor_l2(golden_mode, reference_dir):
    meta, inputs, grads = _golden(reference_dir, "fitnet_mmrazor_l2")
    align = nn.Conv2d(8, 16, 1)
    align.load_state_dict(inputs["align_state_dict"])
    s = inputs["y_s"].clone().requires_grad_()
    loss = MmrazorL2Loss(**meta["kwargs"])(align(s), inputs["y_t"])
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    _close_grad(s.grad, grads["y_s"])


# -------------------------------------------------------------------------------------- FitNetMSE
def test_fitnet_mse_structure_and_default_init():
    model = FitNetMSE([8, 4, 4], 16, loss_weight=2.0)
    assert model.num_levels == 3 and model.teacher_channels == (16, 16, 16)
    keys = [f"{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert list(model.align.state_dict()) == keys  # the golden fpn3 align_state_dict layout
    assert list(model.state_dict()) == [f"align.{k}" for k in keys]
    assert [tuple(c.weight.shape) for c in model.align] == [(16, 8, 1, 1), (16, 4, 1, 1), (16, 4, 1, 1)]
    torch.manual_seed(123)
    a = FitNetMSE(8, 16)
    torch.manual_seed(123)
    b = nn.Conv2d(8, 16, 1)
    torch.testing.assert_close(a.align[0].weight, b.weight, rtol=0, atol=0)
    torch.testing.assert_close(a.align[0].bias, b.bias, rtol=0, atol=0)
    assert all(p.requires_grad for p in a.parameters())
    assert len(list(FitNetMSE(8, 8, align=False).parameters())) == 0


@HYP
@given(
    levels=st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
        min_size=1,
        max_size=3,
    ),
    n=st.integers(1, 3),
    weight=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fitnet_mse_matches_formula(levels, n, weight, seed):
    torch.manual_seed(seed)
    model = FitNetMSE([lv[0] for lv in levels], [lv[1] for lv in levels], loss_weight=weight).double()
    ss = [_randn((n, cs, h, w), seed + i) for i, (cs, ct, h, w) in enumerate(levels)]
    ts = [_randn((n, ct, h, w), seed + 100 + i) for i, (cs, ct, h, w) in enumerate(levels)]
    expected = 0.0
    for conv, s, t in zip(model.align, ss, ts, strict=True):
        proj = torch.einsum("oi,nihw->nohw", conv.weight[:, :, 0, 0], s) + conv.bias[:, None, None]
        expected = expected + ((proj - t) ** 2).sum() / t.numel()
    got = model(ss, ts) if len(levels) > 1 else model(ss[0], ts[0])
    torch.testing.assert_close(got, weight * expected, rtol=1e-10, atol=1e-12)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = model([s[perm] for s in ss], [t[perm] for t in ts])
    torch.testing.assert_close(permuted, got.reshape(()), rtol=1e-12, atol=1e-14)


@HYP
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**31 - 1),
)
def test_fitnet_mse_zero_with_identity_align(shape, seed):
    model = FitNetMSE([shape[1]] * 2, [shape[1]] * 2).double()
    _identity_align(model)
    t = _randn(shape, seed)
    s = t.clone().requires_grad_()
    loss = model([s, s], [t, t])
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() == 0.0
    assert FitNetMSE(shape[1], shape[1], align=False)(t, t).item() == 0.0


def test_fitnet_mse_no_gradient_reaches_teacher():
    model = FitNetMSE(4, 6)
    s, t = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 6, 5, 5, requires_grad=True)
    model(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and model.align[0].weight.grad is not None


@pytest.mark.parametrize("hw", [(1, 1), (6, 7)])
def test_fitnet_mse_all_zero_and_tiny_maps_finite(hw):
    model = FitNetMSE([3, 3], 5)
    s = torch.zeros(2, 3, *hw, requires_grad=True)
    t = torch.zeros(2, 5, *hw)
    loss = model([s, s], [t, torch.randn_like(t)])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fitnet_mse_float32_matches_float64():
    torch.manual_seed(0)
    m32 = FitNetMSE([8, 8], 16)
    m64 = FitNetMSE([8, 8], 16)
    m64.load_state_dict(m32.state_dict())
    m64.double()
    ss = [_randn((2, 8, 10, 12), 1), _randn((2, 8, 5, 6), 2)]
    ts = [_randn((2, 16, 10, 12), 3), _randn((2, 16, 5, 6), 4)]
    v64 = m64(ss, ts).item()
    v32 = m32([s.float() for s in ss], [t.float() for t in ts])
    assert v32.dtype == torch.float32
    assert v32.item() == pytest.approx(v64, rel=1e-5)


def test_fitnet_mse_bf16_autocast_cpu():
    torch.manual_seed(0)
    model = FitNetMSE(4, 6, loss_weight=1.0)
    s, t = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.isfinite(model.align[0].weight.grad).all()


def test_fitnet_mse_non_contiguous_input():
    torch.manual_seed(0)
    model = FitNetMSE(4, 6).double()
    s, t = _randn((2, 4, 5, 7), 0), _randn((2, 6, 5, 7), 1)
    expected = model(s, t)
    t_nc = t.transpose(2, 3).contiguous().transpose(2, 3)
    got = model(s.contiguous(memory_format=torch.channels_last), t_nc)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_fitnet_mse_bad_input():
    model = FitNetMSE([8, 8, 16], 16)
    s = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2), torch.randn(2, 8, 1, 1)]
    t = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2), torch.randn(2, 16, 1, 1)]
    with pytest.raises(ValueError, match=r"student_feats\[2\] has 8 channels, the align conv expects 16"):
        model(s, t)
    s[2] = torch.randn(2, 16, 1, 1)
    assert torch.isfinite(model(s, t))
    with pytest.raises(ValueError, match=r"teacher_feats\[1\] has 15 channels, expected 16"):
        model(s, [t[0], torch.randn(2, 15, 2, 2), t[2]])
    with pytest.raises(ValueError, match=r"student_feats\[0\] has shape \(2, 8, 4, 4\) but teacher_feats\["):
        model(s, [torch.randn(2, 16, 4, 5), t[1], t[2]])
    with pytest.raises(ValueError, match=r"student_feats\[0\] has shape .* batch and spatial"):
        model(s, [torch.randn(3, 16, 4, 4), t[1], t[2]])
    with pytest.raises(ValueError, match="student_feats has 2 levels, the loss was built for 3"):
        model(s[:2], t)
    with pytest.raises(ValueError, match="teacher_feats has 2 levels, the loss was built for 3"):
        model(s, t[:2])
    with pytest.raises(ValueError, match="built for 3 levels"):
        model(s[0], t[0])
    with pytest.raises(ValueError, match="both be tensors or both be sequences"):
        FitNetMSE(8, 16)(s[0], t)
    with pytest.raises(ValueError, match="4-D"):
        FitNetMSE(8, 16)(s[0][0], t[0][0])
    with pytest.raises(ValueError, match="student_channels has 2 levels but teacher_channels has 3"):
        FitNetMSE([8, 8], [16, 16, 16])
    with pytest.raises(ValueError, match="align=False needs equal channels"):
        FitNetMSE(8, 16, align=False)
    with pytest.raises(ValueError, match="positive"):
        FitNetMSE(0, 16)


# ------------------------------------------------------------------------------- MdistillerFitNet
@pytest.mark.parametrize(
    ("s_hw", "t_hw", "conv_type", "kernel"),
    [
        ((8, 10), (4, 5), nn.Conv2d, (3, 3)),
        ((4, 5), (8, 10), nn.ConvTranspose2d, (4, 4)),
        ((8, 10), (8, 10), nn.Conv2d, (1, 1)),
        ((7, 9), (5, 6), nn.Conv2d, (3, 4)),
    ],
)
def test_mdistiller_conv_choice(s_hw, t_hw, conv_type, kernel):
    model = MdistillerFitNet((2, 6, *s_hw), (2, 12, *t_hw))
    assert type(model.conv) is conv_type and tuple(model.conv.kernel_size) == kernel
    s = torch.randn(2, 6, *s_hw, requires_grad=True)
    t = torch.relu(torch.randn(2, 12, *t_hw))
    loss = model(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert model.regress(s).shape == t.shape
    assert set(model.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    }  # fmt: skip


def test_mdistiller_formula_relu_eval_and_teacher():
    torch.manual_seed(0)
    model = MdistillerFitNet((6, 5, 5), (12, 5, 5), feat_weight=7.0, use_relu=False).double()
    s = _randn((3, 6, 5, 5), 1).requires_grad_()
    t = _randn((3, 12, 5, 5), 2).requires_grad_()
    y = model.conv(s)
    mu, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    bn = (y - mu) / torch.sqrt(var + model.bn.eps)
    expected = 7.0 * ((bn - t) ** 2).mean()
    loss = model(s, t)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    loss.backward()
    assert t.grad is None
    # eval mode uses the running statistics (updated once by the train-mode call above)
    model.eval()
    rm, rv = model.bn.running_mean[:, None, None], model.bn.running_var[:, None, None]
    expected_eval = 7.0 * (((model.conv(s) - rm) / torch.sqrt(rv + model.bn.eps) - t) ** 2).mean()
    torch.testing.assert_close(model(s, t), expected_eval, rtol=1e-10, atol=0)
    # ReLU on: the regressed feature is non-negative
    assert (MdistillerFitNet((6, 5, 5), (12, 5, 5)).regress(s.float()) >= 0).all()


def test_mdistiller_batch_permutation_float32_bf16():
    torch.manual_seed(0)
    m32 = MdistillerFitNet((2, 8, 8, 10), (2, 16, 4, 5))
    m64 = MdistillerFitNet((2, 8, 8, 10), (2, 16, 4, 5))
    m64.load_state_dict(m32.state_dict())
    m64.double()
    s, t = _randn((4, 8, 8, 10), 1), torch.relu(_randn((4, 16, 4, 5), 2))
    v64 = m64(s, t)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(m64(s[perm], t[perm]), v64, rtol=1e-12, atol=0)
    assert m32(s.float(), t.float()).item() == pytest.approx(v64.item(), rel=1e-5)
    sb = s.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m32(sb, t.float())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sb.grad).all()


def test_mdistiller_bad_input():
    with pytest.raises(ValueError, match="unsupported sizes for ConvReg"):
        MdistillerFitNet((2, 8, 3, 3), (2, 16, 5, 5))
    with pytest.raises(ValueError, match="kernel"):
        MdistillerFitNet((8, 5, 3), (16, 5, 6))
    with pytest.raises(ValueError, match="student_shape"):
        MdistillerFitNet((8, 5), (16, 5, 6))
    model = MdistillerFitNet((2, 8, 6, 6), (2, 16, 6, 6))
    with pytest.raises(ValueError, match="student_feats has 4 channels, the regressor conv expects 8"):
        model(torch.randn(2, 4, 6, 6), torch.randn(2, 16, 6, 6))
    with pytest.raises(ValueError, match="teacher_feats has 8 channels, expected 16"):
        model(torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6))
    with pytest.raises(ValueError, match=r"regressed student_feats has shape \(2, 16, 6, 6\).*16, 5, 5"):
        model(torch.randn(2, 8, 6, 6), torch.randn(2, 16, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(8, 6, 6), torch.randn(16, 6, 6))


# ---------------------------------------------------------------------------------- MmrazorL2Loss
def _l2_formula(s, t, lw, normalize, mult, div_element, dist):
    if normalize:
        s = s.reshape(len(s), -1)
        t = t.reshape(len(t), -1)
        s = s / torch.sqrt((s**2).sum(1, keepdim=True)) * mult
        t = t / torch.sqrt((t**2).sum(1, keepdim=True)) * mult
    total = ((s - t) ** 2).sum()
    if dist:
        return lw * torch.sqrt(total)
    return lw * total / (s.numel() if div_element else s.shape[0])


@HYP
@given(
    shape=st.sampled_from([(2, 5), (3, 4, 2, 3), (1, 2, 1, 1), (4, 3, 5, 2)]),
    normalize=st.booleans(),
    mult=st.sampled_from([1.0, 0.5, 3.0]),
    div_element=st.booleans(),
    dist=st.booleans(),
    lw=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_l2_options_match_formula(shape, normalize, mult, div_element, dist, lw, seed):
    s, t = _randn(shape, seed), _randn(shape, seed + 1)
    crit = MmrazorL2Loss(lw, normalize, mult, div_element, dist)
    got = crit(s, t)
    expected = _l2_formula(s, t, lw, normalize, mult, div_element, dist)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(crit(s[perm], t[perm]), got, rtol=1e-12, atol=1e-14)


@HYP
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    scale=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_l2_scale_invariant_zero_and_bounded(shape, scale, seed):
    t = _randn(shape, seed)
    s = (scale * t).requires_grad_()
    crit = MmrazorL2Loss(loss_weight=10.0)
    loss = crit(s, t)
    assert abs(loss.item()) < 1e-10
    other = crit(_randn(shape, seed + 1), t)
    assert 0.0 <= other.item() <= 4 * 10.0 + 1e-9


def test_l2_all_zero_literal_nan_and_safe_eps():
    s = torch.zeros(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    assert torch.isnan(MmrazorL2Loss()(s, t))  # literal mmrazor: 0 / ‖0‖ = NaN
    loss = MmrazorL2Loss(eps=1e-12)(s, t)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, rel=1e-6)  # each teacher sample has unit norm, /N
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(MmrazorL2Loss(normalize=False)(s, t))


def test_l2_teacher_detached_float32_bf16_non_contiguous():
    s, t = _randn((2, 6, 5, 4), 0).requires_grad_(), _randn((2, 6, 5, 4), 1).requires_grad_()
    crit = MmrazorL2Loss(loss_weight=10.0)
    v64 = crit(s, t)
    v64.backward()
    assert t.grad is None and s.grad is not None
    assert crit(s.detach().float(), t.detach().float()).item() == pytest.approx(v64.item(), rel=1e-5)
    nc = crit(s.detach().transpose(2, 3), t.detach().transpose(2, 3))  # view() in mmrazor would fail here
    assert torch.isfinite(nc)
    conv = nn.Conv2d(6, 6, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = crit(conv(s.detach().float()), t.detach().float())
    lb.backward()
    assert torch.isfinite(lb) and torch.isfinite(conv.weight.grad).all()


def test_l2_bad_input():
    with pytest.raises(ValueError, match=r"student_feats has shape \(2, 8, 4, 4\) but teacher_feats has"):
        MmrazorL2Loss()(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="at least 2-D"):
        MmrazorL2Loss()(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="eps"):
        MmrazorL2Loss(eps=-1.0)
    with pytest.raises(ValueError, match="must be tensors"):
        MmrazorL2Loss()([torch.randn(2, 3)], [torch.randn(2, 3)])
