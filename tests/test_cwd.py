"""CWD: golden values from the original mmrazor / TorchDistiller code, plus properties and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.cwd import ChannelWiseDivergence, channel_wise_divergence

HYP = settings(max_examples=25, deadline=None, database=None)
CASES = ["cwd_tau1", "cwd_tau4"]


def _golden(reference_dir, case):
    meta = json.loads((reference_dir / "golden.json").read_text())[case]
    inputs = torch.load(reference_dir / meta["inputs"])
    grads = torch.load(reference_dir / meta["grads"])
    outputs = torch.load(reference_dir / meta["outputs"])
    return meta, inputs, grads, outputs


def _pair(shape, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(shape, generator=g, dtype=dtype)
    s = 0.6 * t + 1.2 * torch.randn(shape, generator=g, dtype=dtype)
    return s, t


def _reference_formula(s, t, tau):
    """Independent spelling: Σ p_T (log p_T − log p_S) per channel map via torch.special / kl_div."""
    n, c = s.shape[:2]
    log_ps = torch.log_softmax(s.flatten(2) / tau, dim=-1)
    log_pt = torch.log_softmax(t.flatten(2) / tau, dim=-1)
    kl = torch.nn.functional.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    return kl.sum() * tau**2 / (n * c)


# --------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("case", CASES)
def test_golden_value_and_grad(golden_mode, reference_dir, case):
    meta, inputs, grads, outputs = _golden(reference_dir, case)
    s = inputs["preds_S"].clone().requires_grad_()
    t = inputs["preds_T"]
    loss = ChannelWiseDivergence(**meta["kwargs"])(s, t)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    assert loss.item() == pytest.approx(outputs["torchdistiller"].item(), rel=1e-10, abs=0)
    assert loss.item() == pytest.approx(outputs["maskd_repo_copy"].item(), rel=1e-10, abs=0)
    loss.backward()
    torch.testing.assert_close(s.grad, grads["preds_S"], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_golden_functional_and_mmrazor_mode(golden_mode, reference_dir, case):
    meta, inputs, grads, _ = _golden(reference_dir, case)
    tau, weight = meta["kwargs"]["tau"], meta["kwargs"]["loss_weight"]
    s = inputs["preds_S"].clone().requires_grad_()
    t = inputs["preds_T"].clone().requires_grad_()  # mmrazor mode: the gradient flows into the teacher
    loss = ChannelWiseDivergence(tau, weight, detach_teacher=False)(s, t)
    assert loss.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)
    loss.backward()
    torch.testing.assert_close(s.grad, grads["preds_S"], rtol=1e-8, atol=1e-14)
    assert t.grad is not None and torch.isfinite(t.grad).all()
    fn = weight * channel_wise_divergence(inputs["preds_S"], inputs["preds_T"], tau=tau)
    assert fn.item() == pytest.approx(meta["value"], rel=1e-10, abs=0)


def test_golden_as_fpn_levels(golden_mode, reference_dir):
    """Sequence input = sum of per-level losses (mmrazor: one loss instance per FPN level)."""
    _, i1, _, _ = _golden(reference_dir, "cwd_tau1")
    meta4, i4, _, _ = _golden(reference_dir, "cwd_tau4")
    crit = ChannelWiseDivergence(tau=4.0, loss_weight=1.0)
    total = crit([i1["preds_S"], i4["preds_S"]], (i1["preds_T"], i4["preds_T"]))
    expected = crit(i1["preds_S"], i1["preds_T"]) + meta4["value"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------- properties
shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))  # N, C, H, W
taus = st.sampled_from([0.5, 1.0, 2.0, 4.0])


@HYP
@given(shape=shapes, tau=taus, seed=st.integers(0, 2**31 - 1))
def test_matches_independent_formula_and_nonnegative(shape, tau, seed):
    s, t = _pair(shape, seed)
    got = channel_wise_divergence(s, t, tau)
    torch.testing.assert_close(got, _reference_formula(s, t, tau), rtol=1e-10, atol=1e-12)
    assert got.item() >= -1e-12


@HYP
@given(shape=shapes, tau=taus, seed=st.integers(0, 2**31 - 1), weight=st.floats(0.1, 10.0))
def test_zero_when_student_equals_teacher(shape, tau, seed, weight):
    _, t = _pair(shape, seed)
    s = t.clone().requires_grad_()
    loss = ChannelWiseDivergence(tau, weight)(s, t)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12


@HYP
@given(shape=shapes, tau=taus, seed=st.integers(0, 2**31 - 1))
def test_batch_permutation_invariance(shape, tau, seed):
    s, t = _pair(shape, seed)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
    crit = ChannelWiseDivergence(tau, 3.0)
    torch.testing.assert_close(crit(s[perm], t[perm]), crit(s, t), rtol=1e-12, atol=1e-14)


@HYP
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), shift=st.floats(-50, 50))
def test_invariant_to_per_channel_shift(shape, seed, shift):
    """Softmax over H·W: adding a constant to a whole channel map changes nothing."""
    s, t = _pair(shape, seed)
    base = channel_wise_divergence(s, t)
    torch.testing.assert_close(channel_wise_divergence(s + shift, t - shift), base, rtol=1e-9, atol=1e-12)


def test_no_gradient_reaches_teacher():
    s, t = _pair((2, 4, 5, 6), 0)
    s.requires_grad_()
    t.requires_grad_()
    ChannelWiseDivergence(tau=2.0)([s, s[:, :, :3]], [t, t[:, :, :3]]).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_all_zero_features_finite(which):
    s, t = _pair((2, 3, 4, 5), 1)
    if which in ("student", "both"):
        s = torch.zeros_like(s)
    if which in ("teacher", "both"):
        t = torch.zeros_like(t)
    s.requires_grad_()
    loss = ChannelWiseDivergence(tau=1.0, loss_weight=10.0)(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if which == "both":
        assert loss.item() == 0.0


def test_one_by_one_maps_give_zero():
    s, t = _pair((3, 7, 1, 1), 2)
    s.requires_grad_()
    loss = ChannelWiseDivergence(tau=4.0, loss_weight=5.0)(s, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(s.grad).all() and s.grad.abs().max().item() == 0.0


def test_extreme_logits_stay_finite():
    """log_softmax (mmrazor) instead of TorchDistiller's log(softmax): no -inf for far-apart logits."""
    s, t = _pair((2, 3, 4, 4), 3, dtype=torch.float32, scale=1.0)
    s = (s * 1e4).requires_grad_()
    loss = channel_wise_divergence(s, t * 1e4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_non_contiguous_input():
    s, t = _pair((2, 3, 6, 5), 4)
    expected = channel_wise_divergence(s, t, 2.0)
    s_cl = s.contiguous(memory_format=torch.channels_last)
    t_tr = t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not t_tr.is_contiguous()
    torch.testing.assert_close(channel_wise_divergence(s_cl, t_tr, 2.0), expected, rtol=1e-12, atol=0)


def test_float32_matches_float64():
    s, t = _pair((2, 8, 9, 12), 5)
    crit = ChannelWiseDivergence(tau=4.0, loss_weight=3.0)
    v64 = crit(s, t).item()
    v32 = crit(s.float(), t.float())
    assert v32.dtype == torch.float32
    assert v32.item() == pytest.approx(v64, rel=1e-5)


def test_bf16_autocast_cpu_finite():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(4, 6, 1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.randn(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = head(x)
        loss = ChannelWiseDivergence(tau=1.0, loss_weight=10.0)([s, s[..., :4]], [t, t[..., :4]])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    direct = channel_wise_divergence(s.detach().bfloat16(), t.bfloat16())
    assert torch.isfinite(direct)


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    s, t = _pair((2, 4, 5, 6), 6)
    crit = ChannelWiseDivergence()
    with pytest.raises(ValueError, match=r"student_feats has shape \(2, 4, 5, 6\) but teacher_feats"):
        crit(s, t[:, :, :4])
    with pytest.raises(ValueError, match=r"student_feats\[1\] has shape \(2, 3, 5, 6\)"):
        crit([s, s[:, :3]], [t, t])
    with pytest.raises(ValueError, match="student_feats has 2 levels but teacher_feats has 1"):
        crit([s, s], [t])
    with pytest.raises(ValueError, match="both be tensors or both be sequences"):
        crit(s, [t])
    with pytest.raises(ValueError, match="empty"):
        crit([], [])
    with pytest.raises(ValueError, match="4-D"):
        crit(s[0], t[0])
    with pytest.raises(ValueError, match="must be tensors"):
        crit([s, None], [t, t])
    with pytest.raises(ValueError, match="tau"):
        ChannelWiseDivergence(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        channel_wise_divergence(s, t, tau=-1.0)
    assert math.isfinite(crit(s, t).item())
