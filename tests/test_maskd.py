"""MasKD core: golden values (both forms), fast == literal, properties, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.checks.golden import check_case
from maskd import MasKDLoss, MaskLearning, ReceptiveTokens, dice_coeff

MASKD_CASES = [
    "maskd_mask_gen",
    "maskd_mask_gen_refinit",
    "dice_coeff",
    "maskd_mask_learning_wm1",
    "maskd_mask_learning_wm0",
    "maskd_loss_wm0_cm0",
    "maskd_loss_wm1_cm0",
    "maskd_loss_wm0_cm1",
    "maskd_loss_wm1_cm1",
    "maskd_loss_wm1_cm1_prewarmup",
    "maskd_loss_fpn3",
    "maskd_seg",
]


@pytest.mark.parametrize("impl", ["fast", "literal"])
@pytest.mark.parametrize("case", MASKD_CASES)
def test_golden_case(reference_dir, case, impl):
    cases = json.loads((reference_dir / "golden.json").read_text())
    assert case in cases, f"golden case {case} is missing from {reference_dir}"
    result = check_case(reference_dir, case, cases[case], impl=impl)
    assert result.passed, result.line()
    assert result.value_rel <= 1e-10


def test_golden_intermediates(reference_dir, golden_mode):
    """Masks, token weights and per-level values equal the reference intermediates."""
    inputs = torch.load(reference_dir / "inputs_maskd_loss_wm1_cm1.pt")
    outputs = torch.load(reference_dir / "outputs_maskd_loss_wm1_cm1.pt")
    tokens = ReceptiveTokens(16, 6, weight_head=True)
    tokens.load_state_dict({k.removeprefix("mask_modules.0."): v for k, v in inputs["state_dict"].items()})
    torch.testing.assert_close(tokens.masks(inputs["y_t"]), outputs["mask_t"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tokens.masks(inputs["y_s"]), outputs["mask_s"], rtol=1e-12, atol=1e-14)
    for impl in ("fast", "literal"):
        torch.testing.assert_close(
            tokens.token_weights(inputs["y_t"], impl=impl), outputs["weights"], rtol=1e-12, atol=1e-14
        )
    fpn_in = torch.load(reference_dir / "inputs_maskd_loss_fpn3.pt")
    fpn_out = torch.load(reference_dir / "outputs_maskd_loss_fpn3.pt")
    loss = MasKDLoss([16] * 3, 6, custom_mask_warmup=3, loss_weight=7.0)
    loss.load_tokens(fpn_in["checkpoint_state_dict"])
    per_level = [
        7.0 * loss.level_loss(loss.mask_modules[i], fpn_in[f"y_s_{i}"], fpn_in[f"y_t_{i}"], True) for i in range(3)
    ]
    torch.testing.assert_close(torch.stack(per_level), fpn_out["per_level"], rtol=1e-10, atol=0)


def test_reference_init_consumes_rng_like_the_original(reference_dir, golden_mode):
    """Seeded construction draws the same tokens as the official MaskModule (case maskd_mask_gen_refinit)."""
    case = json.loads((reference_dir / "golden.json").read_text())["maskd_mask_gen_refinit"]
    torch.manual_seed(case["seed"])
    tokens = ReceptiveTokens(case["kwargs"]["channels"], case["kwargs"]["num_tokens"])
    stored = torch.load(reference_dir / case["inputs"])["mask_token"]
    torch.testing.assert_close(tokens.mask_token.detach(), stored, rtol=0, atol=0)


def test_weight_head_init_is_fan_out_normal():
    torch.manual_seed(0)
    tokens = ReceptiveTokens(64, 6, weight_head=True)
    conv3 = tokens.prob[0].weight
    assert abs(conv3.std().item() - (2 / (9 * 64)) ** 0.5) < 0.01 * (2 / (9 * 64)) ** 0.5 * 5
    assert torch.count_nonzero(tokens.prob[0].bias) == 0 and torch.count_nonzero(tokens.prob[2].bias) == 0


# ------------------------------------------------------------------------------------------ fast == literal
def _random_loss(seed, levels, channels, tokens, weight_head, custom, variant, frozen, impl, mask_power=2):
    torch.manual_seed(seed)
    loss = MasKDLoss(
        [channels] * levels,
        tokens,
        weight_head=weight_head,
        custom_mask=custom,
        custom_mask_warmup=2,
        variant=variant,
        frozen=frozen,
        impl=impl,
        mask_power=mask_power,
    )
    with torch.no_grad():
        for m in loss.mask_modules:
            m.mask_token.normal_(0, 0.3)
            if m.prob is not None:
                m.prob[0].bias.normal_(0, 0.1)
                m.prob[2].bias.normal_(0, 0.1)
    return loss


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    levels=st.integers(1, 3),
    channels=st.integers(1, 9),
    tokens=st.integers(1, 5),
    batch=st.integers(1, 3),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    weight_head=st.booleans(),
    custom=st.booleans(),
    step=st.integers(0, 4),
    variant=st.sampled_from(["detection", "segmentation"]),
    mask_power=st.sampled_from([1, 2]),
)
def test_fast_equals_literal(
    seed, levels, channels, tokens, batch, height, width, weight_head, custom, step, variant, mask_power
):
    with torch.autocast("cpu", enabled=False):
        torch.set_default_dtype(torch.float64)
        try:
            losses = {
                impl: _random_loss(
                    seed, levels, channels, tokens, weight_head, custom, variant, False, impl, mask_power
                )
                for impl in ("fast", "literal")
            }
            g = torch.Generator().manual_seed(seed)
            shapes = [(batch, channels, max(1, height >> i), max(1, width >> i)) for i in range(levels)]
            teacher = [torch.randn(s, generator=g) for s in shapes]
            student = [(0.6 * t + 0.8 * torch.randn(t.shape, generator=g)) for t in teacher]
            values, grads = {}, {}
            for impl, loss in losses.items():
                leaves = [s.clone().requires_grad_() for s in student]
                value = loss(leaves, teacher, step=step)
                value.backward()
                values[impl] = value.detach()
                grads[impl] = [leaf.grad for leaf in leaves] + [p.grad for p in loss.parameters()]
            torch.testing.assert_close(values["fast"], values["literal"], rtol=1e-12, atol=1e-14)
            for a, b in zip(grads["fast"], grads["literal"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        finally:
            torch.set_default_dtype(torch.float32)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    channels=st.integers(1, 8),
    tokens=st.integers(1, 5),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    weight_head=st.booleans(),
)
def test_mask_learning_fast_equals_literal(seed, channels, tokens, height, width, weight_head):
    torch.manual_seed(seed)
    fast = MaskLearning([channels], tokens, weight_head=weight_head, impl="fast").double()
    literal = MaskLearning([channels], tokens, weight_head=weight_head, impl="literal").double()
    literal.load_state_dict(fast.state_dict())
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    a, b = fast(x), literal(x)
    torch.testing.assert_close(a.features[0], b.features[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.dice, b.dice, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ properties
def _pair(shape=(2, 8, 5, 6), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=dtype)
    return (0.6 * t + 0.8 * torch.randn(shape, generator=g, dtype=dtype)), t


@pytest.mark.parametrize("impl", ["fast", "literal"])
def test_zero_when_student_equals_teacher(impl):
    loss = MasKDLoss([8], 4, impl=impl)
    _, t = _pair()
    assert loss(t.clone(), t, step=5000).item() == 0.0


@pytest.mark.parametrize("impl", ["fast", "literal"])
def test_no_gradient_reaches_teacher_or_frozen_tokens(impl):
    loss = MasKDLoss([8], 4, impl=impl)
    s, t = _pair()
    s.requires_grad_()
    t.requires_grad_()
    loss(s, t, step=5000).backward()
    assert t.grad is None
    assert s.grad is not None and torch.count_nonzero(s.grad) > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.parameters())


def test_unfrozen_tokens_receive_gradient_like_the_official_code():
    loss = MasKDLoss([8], 4, frozen=False)
    s, t = _pair()
    loss(s.requires_grad_(), t, step=0).backward()
    assert all(p.grad is not None for p in loss.parameters())


@pytest.mark.parametrize("shape", [(2, 8, 1, 1), (1, 8, 1, 7), (3, 8, 4, 1)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_finite_on_zero_features_tiny_maps_and_one_token(shape, tokens):
    for impl in ("fast", "literal"):
        loss = MasKDLoss([8], tokens, impl=impl)
        zeros = torch.zeros(shape)
        assert torch.isfinite(loss(zeros.clone().requires_grad_(), zeros, step=5000))
        s, t = _pair(shape)
        value = loss(s.requires_grad_(), t, step=5000)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
        out = MaskLearning([8], tokens, impl=impl)(t)
        assert torch.isfinite(out.dice).all() and torch.isfinite(out.features[0]).all()


def test_dice_of_one_token_is_zero_not_nan():
    assert dice_coeff(torch.rand(2, 1, 10)).item() == 0.0


@pytest.mark.parametrize("impl", ["fast", "literal"])
def test_batch_permutation_invariance(impl):
    loss = _random_loss(3, 2, 8, 4, True, True, "detection", True, impl)
    student = [_pair((4, 8, 6, 5), seed=i)[0] for i in range(2)]
    teacher = [_pair((4, 8, 6, 5), seed=i)[1] for i in range(2)]
    perm = torch.tensor([2, 0, 3, 1])
    a = loss(student, teacher, step=5)
    b = loss([s[perm] for s in student], [t[perm] for t in teacher], step=5)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_float32_agrees_with_float64():
    loss64 = _random_loss(5, 2, 8, 4, True, True, "detection", True, "fast").double()
    loss32 = _random_loss(5, 2, 8, 4, True, True, "detection", True, "fast")
    pairs = [_pair((2, 8, 9, 7), seed=i, dtype=torch.float64) for i in range(2)]
    v64 = loss64([p[0] for p in pairs], [p[1] for p in pairs], step=5)
    v32 = loss32([p[0].float() for p in pairs], [p[1].float() for p in pairs], step=5)
    assert abs(v32.item() - v64.item()) / abs(v64.item()) < 1e-5


@pytest.mark.parametrize("impl", ["fast", "literal"])
def test_bf16_autocast_runs(impl):
    loss = MasKDLoss([8, 8], 4, impl=impl)
    student = [_pair((2, 8, 6, 5), seed=i)[0].requires_grad_() for i in range(2)]
    teacher = [_pair((2, 8, 6, 5), seed=i)[1] for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss([s * 1.0 for s in student], teacher, step=5000)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(s.grad).all() for s in student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskLearning([8, 8], 4, impl=impl)(teacher)
    assert torch.isfinite(out.dice).all()


def test_customisation_follows_the_step_argument():
    loss = _random_loss(7, 1, 8, 4, True, True, "detection", True, "fast")
    s, t = _pair()
    before, at, later = (loss(s, t, step=k).item() for k in (1, 2, 100))
    assert before != at and at == later
    assert loss(s, t, step=1).item() == before  # no hidden state: the same step gives the same value


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors_name_the_tensor():
    loss = MasKDLoss([8, 8], 4)
    s, t = _pair()
    with pytest.raises(ValueError, match=r"student_feats has 1 levels but the loss was built for 2"):
        loss([s], [t], step=0)
    with pytest.raises(
        ValueError,
        match=r"student_feats\[1\] has shape \(2, 8, 5, 6\) but teacher_feats\[1\] "
        r"has shape \(2, 8, 4, 6\)",
    ):
        loss([s, s], [t, t[:, :, :4]], step=0)
    with pytest.raises(ValueError, match=r"teacher_feats\[0\] has shape \(2, 6, 5, 6\) with 6 channels"):
        loss([s[:, :6], s], [t[:, :6], t], step=0)
    with pytest.raises(ValueError, match="needs the training step"):
        loss([s, s], [t, t])
    with pytest.raises(ValueError, match=r"student_feats has 2 levels but teacher_feats has 1"):
        loss([s, s], [t], step=0)


def test_token_checkpoint_errors():
    loss = MasKDLoss([8, 8], 4)
    good = MasKDLoss([8, 8], 4).state_dict()
    loss.load_tokens({"state_dict": {"distiller.losses." + k: v for k, v in good.items()}})
    for k, v in good.items():
        torch.testing.assert_close(loss.state_dict()[k], v)
    wrong = dict(good)
    wrong["mask_modules.1.mask_token"] = torch.zeros(6, 8)
    with pytest.raises(ValueError, match=r"mask_modules\.1\.mask_token has shape \(6, 8\), expected \(4, 8\)"):
        loss.load_tokens(wrong)
    with pytest.raises(ValueError, match=r"lacks mask_modules\.1\.mask_token"):
        loss.load_tokens({k: v for k, v in good.items() if not k.startswith("mask_modules.1.mask_token")})
    with pytest.raises(ValueError, match=r"unexpected tensor mask_modules\.2\.mask_token"):
        loss.load_tokens({**good, "mask_modules.2.mask_token": torch.zeros(4, 8)})


def test_constructor_errors():
    with pytest.raises(ValueError, match="variant"):
        MasKDLoss([8], variant="classification")
    with pytest.raises(ValueError, match="impl"):
        MasKDLoss([8], impl="quick")
    with pytest.raises(ValueError, match="num_tokens=0"):
        ReceptiveTokens(8, 0)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 5),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    weight_head=st.booleans(),
    mask_power=st.sampled_from([1, 2]),
)
def test_frozen_fast_path_equals_literal(seed, tokens, height, width, weight_head, mask_power):
    """The frozen fast path (custom autograd function) against the literal form, value and student gradient."""
    losses = {
        impl: _random_loss(seed, 2, 6, tokens, weight_head, True, "detection", True, impl, mask_power).double()
        for impl in ("fast", "literal")
    }
    g = torch.Generator().manual_seed(seed)
    teacher = [
        torch.randn(2, 6, max(1, height >> i), max(1, width >> i), generator=g, dtype=torch.float64) for i in range(2)
    ]
    student = [0.6 * t + 0.8 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in teacher]
    out = {}
    for impl, loss in losses.items():
        leaves = [s.clone().requires_grad_() for s in student]
        value = loss(leaves, teacher, step=3)
        value.backward()
        out[impl] = (value.detach(), [leaf.grad for leaf in leaves])
    torch.testing.assert_close(out["fast"][0], out["literal"][0], rtol=1e-12, atol=1e-14)
    for a, b in zip(out["fast"][1], out["literal"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_frozen_fast_path_gradient_to_an_undetached_teacher():
    loss = MasKDLoss([8], 4, detach_teacher=False).double()
    s, t = (x.double().requires_grad_() for x in _pair())
    loss(s, t, step=0).backward()
    torch.testing.assert_close(t.grad, -s.grad)


def test_frozen_fast_path_refuses_a_second_backward():
    loss = MasKDLoss([8], 4)
    s, t = _pair()
    value = loss(s.requires_grad_(), t, step=0)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        value.backward()


def test_saturated_masks_official_nan_and_area_eps():
    """A token whose mask underflows to 0 on every pixel (teacher logits below about -104 in float32): the official
    detection loss divides 0 by 0; ``area_eps`` (the segmentation variant's 1e-5) keeps it finite."""
    s, t = _pair()
    t = t.abs() + 1.0  # positive features: a negative token is negative at every pixel
    for impl in ("fast", "literal"):
        official = MasKDLoss([8], 2, weight_head=False, custom_mask=False, impl=impl)
        with torch.no_grad():
            official.mask_modules[0].mask_token[0].fill_(-100.0)
        assert (official.mask_modules[0].masks(t)[:, 0] == 0).all()
        assert torch.isnan(official(s, t))
        safe = MasKDLoss([8], 2, weight_head=False, custom_mask=False, impl=impl, area_eps=1e-5)
        safe.load_tokens(official.state_dict())
        assert torch.isfinite(safe(s, t))


@pytest.mark.parametrize("impl", ["fast", "literal"])
@pytest.mark.parametrize("mask_power", [1, 2])
def test_fixed_masks_follow_the_formula(impl, mask_power):
    # Fixed masks (the gt_box ablation) replace the tokens: sum_t mean_c sum_hw M^p D^2 / (sum_hw M + eps), mean
    # over n and t, no weight head, no customisation even when it is on.
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [(torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64) > 0.5).double() for _ in range(2)]
    loss = MasKDLoss(
        [5, 5],
        4,
        weight_head=True,
        custom_mask=True,
        custom_mask_warmup=0,
        impl=impl,
        area_eps=1e-5,
        mask_power=mask_power,
        loss_weight=2.0,
    ).double()
    got = loss(s, t, step=100, masks=masks)
    want = 0.0
    for si, ti, m in zip(s, t, masks):
        sq = (si - ti).pow(2).unsqueeze(1) * m.unsqueeze(2).pow(mask_power)  # [N, T, C, H, W]
        want = want + (sq.sum((3, 4)) / (m.sum((2, 3)).unsqueeze(-1) + 1e-5)).mean()
    torch.testing.assert_close(got, 2.0 * want)


def test_fixed_mask_shape_errors_name_the_level():
    loss = MasKDLoss([4], 2, custom_mask=False)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(2, 2, 4, 5\), expected \(2, T, 5, 5\)"):
        loss(s, t, masks=[torch.ones(2, 2, 4, 5)])
    with pytest.raises(ValueError, match="masks has 2 levels but student_feats has 1"):
        loss(s, t, masks=[torch.ones(2, 2, 5, 5)] * 2)
