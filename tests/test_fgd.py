"""FGD (baselines/fgd.py): golden values of the official code, fast == literal, properties, bad input.

Golden data: tests/data/reference (read-only); spec in shared/reference/README.md §2 and §6. Every ``fgd*``
case listed in golden.json is checked, so cases added later are picked up without editing this file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines import fgd
from baselines.fgd import FGD_CONFIGS, FGDFeatureLoss, FGDLoss, fgd_box_masks

IMPLS = ("literal", "fast")
PUBLIC_FGD_CASES = {"fgd_refinit", "fgd_random_unitw", "fgd_align", "fgd_edge_boxes"}
_GOLDEN_INDEX = Path(__file__).parent / "data" / "reference" / "golden.json"
FGD_CASES = sorted(name for name in json.loads(_GOLDEN_INDEX.read_text()) if name.startswith("fgd"))
COMPONENT_KEYS = ("fg_loss", "bg_loss", "mask_loss", "rela_loss")
MASK_KEYS = ("Mask_fg", "Mask_bg")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _load_case(reference_dir: Path, case: str):
    meta = json.loads((reference_dir / "golden.json").read_text())[case]
    inputs = torch.load(reference_dir / meta["inputs"])
    grads = torch.load(reference_dir / meta["grads"])
    outputs = torch.load(reference_dir / meta["outputs"])
    return meta, inputs, grads, outputs


def _module_from_case(meta, inputs, impl: str) -> FGDFeatureLoss:
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "name"}  # `name` is unused by the reference
    module = FGDFeatureLoss(**kwargs, impl=impl)
    module.load_state_dict(inputs["state_dict"], strict=True)
    return module


def _random_case(seed: int, n: int, cs: int, ct: int, h: int, w: int, stride: int, max_boxes: int, dtype=torch.float64):
    """Features, boxes (some on the image border, some degenerate) and image shapes of a padded batch."""
    gen = torch.Generator().manual_seed(seed)
    pad_h, pad_w = h * stride, w * stride
    teacher = torch.randn(n, ct, h, w, generator=gen, dtype=dtype)
    student = torch.randn(n, cs, h, w, generator=gen, dtype=dtype)
    if cs == ct:
        student = 0.6 * teacher + 0.8 * student
    shapes, boxes = [], []
    for _ in range(n):
        img_h = int(torch.randint(max(1, pad_h // 2), pad_h + 1, (1,), generator=gen))
        img_w = int(torch.randint(max(1, pad_w // 2), pad_w + 1, (1,), generator=gen))
        count = int(torch.randint(0, max_boxes + 1, (1,), generator=gen))
        corner = torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h])
        size = torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h])
        far = torch.minimum(corner + size, torch.tensor([img_w, img_h], dtype=torch.float64))
        box = torch.cat([corner, far], dim=1)
        if count:  # exact border, whole-image and zero-size boxes hit the floor / ceil / clip edge cases
            box[0, 2:] = torch.tensor([img_w, img_h], dtype=torch.float64)
            box[-1, 2:] = box[-1, :2]
        shapes.append((img_h, img_w))
        boxes.append(box)
    return student, teacher, boxes, shapes, (pad_h, pad_w)


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Randomise all parameters (as the golden 'random' cases) so the GC branch is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _loss_and_grads(module, student, teacher, boxes, shapes, padded=None, teacher_grad=False):
    module.zero_grad(set_to_none=True)
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    parts = module.components(student, teacher, boxes, shapes, padded)
    parts["loss"].backward()
    grads = {"student": student.grad, "teacher": teacher.grad}
    grads.update({f"params.{k}": p.grad for k, p in module.named_parameters()})
    return parts, grads


def _assert_grads_close(got: dict, want: dict, rtol: float, atol_factor: float) -> None:
    # Analytically-zero entries (e.g. the conv_mask bias gradient, a softmax shift) hold rounding noise,
    # so the absolute tolerance scales with the largest gradient of the case.
    scale = max(g.abs().max().item() for g in want.values() if g is not None and g.numel())
    for key, ref in want.items():
        if ref is None:
            assert got[key] is None, key
            continue
        torch.testing.assert_close(
            got[key], ref, rtol=rtol, atol=atol_factor * scale, msg=lambda m, key=key: f"{key}: {m}"
        )


# ------------------------------------------------------------------------------------------------
# golden values of the official FeatureLoss
# ------------------------------------------------------------------------------------------------


def test_public_golden_cases_present():
    assert PUBLIC_FGD_CASES <= set(FGD_CASES)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", FGD_CASES)
def test_golden_value_components_and_grads(golden_mode, reference_dir, case, impl):
    meta, inputs, golden_grads, outputs = _load_case(reference_dir, case)
    module = _module_from_case(meta, inputs, impl)
    preds_s = inputs["preds_S"].clone().requires_grad_()
    parts = module.components(preds_s, inputs["preds_T"], inputs["gt_bboxes"], inputs["img_shapes"])
    loss = parts["loss"]
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(meta["value"]), rtol=1e-10, atol=0)
    assert float.fromhex(meta["value_hex"]) == meta["value"]
    # The golden outputs hold the masks, attentions and the four unweighted components.
    assert set(outputs) <= set(parts), set(outputs) - set(parts)
    for key, ref in outputs.items():
        if key in MASK_KEYS:
            assert torch.equal(parts[key], ref), key  # the masks are built bit-for-bit as the reference
        else:
            torch.testing.assert_close(parts[key], ref, rtol=1e-10, atol=1e-14, msg=lambda m, key=key: f"{key}: {m}")
    weighted = sum(
        getattr(module, f"{name}_fgd") * parts[f"{part}_loss"]
        for name, part in (("alpha", "fg"), ("beta", "bg"), ("gamma", "mask"), ("lambda", "rela"))
    )
    torch.testing.assert_close(weighted, loss, rtol=1e-14, atol=0)

    loss.backward()
    got = {"preds_S": preds_s.grad} | {f"params.{k}": p.grad for k, p in module.named_parameters()}
    # Every parameter has a golden gradient and vice versa (a missing key must not pass silently).
    assert set(got) == set(golden_grads)
    _assert_grads_close(got, golden_grads, rtol=1e-8, atol_factor=1e-12)


def test_seeded_construction_reproduces_reference_init(golden_mode, reference_dir):
    """Same module order and init calls as the official constructor: same draws from the RNG."""
    meta, inputs, _, _ = _load_case(reference_dir, "fgd_refinit")
    torch.manual_seed(meta["seed"])
    module = FGDFeatureLoss(**{k: v for k, v in meta["kwargs"].items() if k != "name"})
    state = module.state_dict()
    assert list(state) == list(inputs["state_dict"])
    for key, ref in inputs["state_dict"].items():
        assert torch.equal(state[key], ref), key
    # Zero-initialised last convs: the GC branch adds nothing at init.
    for side in ("s", "t"):
        last = getattr(module, f"channel_add_conv_{side}")[-1]
        assert not last.weight.any() and not last.bias.any()


def test_state_dict_keys_with_align(reference_dir):
    _, inputs, _, _ = _load_case(reference_dir, "fgd_align")
    assert list(FGDFeatureLoss(8, 16).state_dict()) == list(inputs["state_dict"])
    assert FGDFeatureLoss(16, 16).align is None


@pytest.mark.parametrize("impl", IMPLS)
def test_box_masks_public_helper(golden_mode, reference_dir, impl):
    _, inputs, _, outputs = _load_case(reference_dir, "fgd_refinit")
    mask_fg, mask_bg = fgd_box_masks(inputs["gt_bboxes"], inputs["img_shapes"], (10, 12), impl=impl)
    assert torch.equal(mask_fg, outputs["Mask_fg"]) and torch.equal(mask_bg, outputs["Mask_bg"])
    # README §2.1.2: a whole-image box on a 10x12 map covers 120 cells with weight 1/143 (unclipped area).
    whole = [torch.tensor([[0.0, 0.0, 96.0, 80.0]], dtype=torch.float64)]
    mask_fg, mask_bg = fgd_box_masks(whole, [(80, 96)], (10, 12), dtype=torch.float64, impl=impl)
    assert torch.equal(mask_fg, torch.full((1, 10, 12), 1.0 / 11 / 13, dtype=torch.float64))
    assert not mask_bg.any()  # fully covered: normalisation skipped, Mask_bg stays 0


# ------------------------------------------------------------------------------------------------
# fast == literal
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3),
    channels=st.sampled_from([(4, 4), (6, 6), (3, 4), (6, 2)]),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    stride=st.sampled_from([4, 8]),
    max_boxes=st.integers(0, 6),
    box_scale=st.sampled_from(["unpadded", "padded"]),
    teacher_grad=st.booleans(),
)
def test_fast_equals_literal(seed, n, channels, h, w, stride, max_boxes, box_scale, teacher_grad):
    cs, ct = channels
    student, teacher, boxes, shapes, padded = _random_case(seed, n, cs, ct, h, w, stride, max_boxes)
    results = {}
    for impl in IMPLS:
        torch.manual_seed(seed)
        module = FGDFeatureLoss(
            cs,
            ct,
            temp=0.8,
            alpha_fgd=1.0,
            beta_fgd=1.0,
            gamma_fgd=1.0,
            lambda_fgd=1.0,
            box_scale=box_scale,
            impl=impl,
        ).double()
        _perturb_(module, seed)
        results[impl] = _loss_and_grads(module, student, teacher, boxes, shapes, padded, teacher_grad)
    (lit_parts, lit_grads), (fast_parts, fast_grads) = results["literal"], results["fast"]
    for key in MASK_KEYS:
        assert torch.equal(fast_parts[key], lit_parts[key]), key
    for key in ("loss", *COMPONENT_KEYS, "S_attention_t", "C_attention_t", "S_attention_s", "C_attention_s"):
        torch.testing.assert_close(
            fast_parts[key], lit_parts[key], rtol=1e-12, atol=1e-13, msg=lambda m, key=key: f"{key}: {m}"
        )
    _assert_grads_close(fast_grads, lit_grads, rtol=1e-10, atol_factor=1e-12)


def test_fast_masks_in_box_chunks_equal_one_pass(monkeypatch):
    student, _, boxes, shapes, _ = _random_case(7, 3, 4, 4, 9, 11, 8, 12)
    one_pass = fgd_box_masks(boxes, shapes, (9, 11), dtype=torch.float64)
    monkeypatch.setattr(fgd, "_MASK_CHUNK_ELEMENTS", 3 * 9 * 11 * 2)  # two boxes per chunk
    chunked = fgd_box_masks(boxes, shapes, (9, 11), dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(one_pass, chunked))
    literal = fgd_box_masks(boxes, shapes, (9, 11), dtype=torch.float64, impl="literal")
    assert all(torch.equal(a, b) for a, b in zip(one_pass, literal))


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


def _unit_module(cs, ct, impl, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = FGDFeatureLoss(
        cs, ct, temp=0.8, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0, impl=impl, **kwargs
    ).double()
    _perturb_(module, seed)
    return module


@pytest.mark.parametrize("impl", IMPLS)
def test_images_without_boxes_are_finite(impl):
    student, teacher, _, shapes, _ = _random_case(1, 2, 4, 4, 5, 6, 8, 0)
    boxes = [torch.zeros(0, 4, dtype=torch.float64) for _ in range(2)]
    parts, grads = _loss_and_grads(_unit_module(4, 4, impl), student, teacher, boxes, shapes)
    assert torch.isfinite(parts["loss"]) and parts["fg_loss"] == 0
    assert not parts["Mask_fg"].any()
    assert torch.equal(parts["Mask_bg"], torch.full((2, 5, 6), 1 / 30, dtype=torch.float64))
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_box", [False, True])
def test_one_by_one_maps_are_finite(impl, with_box):
    student, teacher, _, _, _ = _random_case(2, 2, 4, 4, 1, 1, 32, 0)
    boxes = [
        torch.tensor([[3.0, 4.0, 10.0, 12.0]], dtype=torch.float64)
        if with_box
        else torch.zeros(0, 4, dtype=torch.float64),
        torch.zeros(0, 4, dtype=torch.float64),
    ]
    parts, grads = _loss_and_grads(_unit_module(4, 4, impl), student, teacher, boxes, [(32, 32), (20, 30)])
    assert torch.isfinite(parts["loss"])
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # With one cell, a box covers the whole map: Mask_bg of that image stays 0 (normalisation skipped).
    assert parts["Mask_bg"][0].item() == (0.0 if with_box else 1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_loss_when_student_equals_teacher_at_reference_init(impl):
    torch.manual_seed(3)
    module = FGDFeatureLoss(6, 6, impl=impl).double()
    _, teacher, boxes, shapes, _ = _random_case(3, 2, 6, 6, 4, 5, 8, 3)
    assert module(teacher, teacher, boxes, shapes).item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_permutation_invariance(impl):
    student, teacher, boxes, shapes, padded = _random_case(4, 3, 4, 6, 6, 7, 8, 5)
    module = _unit_module(4, 6, impl)
    parts, grads = _loss_and_grads(module, student, teacher, boxes, shapes)
    perm = [2, 0, 1]
    permuted_parts, permuted_grads = _loss_and_grads(
        module, student[perm], teacher[perm], [boxes[i] for i in perm], [shapes[i] for i in perm]
    )
    torch.testing.assert_close(permuted_parts["loss"], parts["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(permuted_parts["Mask_fg"], parts["Mask_fg"][perm], rtol=0, atol=0)
    torch.testing.assert_close(permuted_grads["student"], grads["student"][perm], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_gradient_only_when_it_requires_grad(impl):
    student, teacher, boxes, shapes, _ = _random_case(5, 2, 4, 4, 5, 6, 8, 3)
    module = _unit_module(4, 4, impl)
    _, grads = _loss_and_grads(module, student, teacher, boxes, shapes, teacher_grad=False)
    assert grads["teacher"] is None
    # Nothing is detached (README §2.1.6): the teacher-side GC block is trained by this loss ...
    assert grads["params.conv_mask_t.weight"].abs().sum() > 0
    assert grads["params.channel_add_conv_t.0.weight"].abs().sum() > 0
    # ... and teacher features that require grad receive one.
    _, grads = _loss_and_grads(module, student, teacher, boxes, shapes, teacher_grad=True)
    assert grads["teacher"] is not None and grads["teacher"].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_box_scale_differs_only_for_images_smaller_than_the_batch(impl):
    feat_hw, padded = (10, 12), (80, 96)  # stride 8
    boxes = [torch.tensor([[8.0, 8.0, 16.0, 16.0]], dtype=torch.float64)] * 2
    shapes = [(80, 96), (40, 48)]  # image 1 is half the padded size
    kwargs = dict(feat_hw=feat_hw, padded_shape=padded, dtype=torch.float64, impl=impl)
    unpadded_fg, unpadded_bg = fgd_box_masks(boxes, shapes, box_scale="unpadded", **kwargs)
    padded_fg, padded_bg = fgd_box_masks(boxes, shapes, box_scale="padded", **kwargs)
    assert torch.equal(unpadded_fg[0], padded_fg[0]) and torch.equal(unpadded_bg[0], padded_bg[0])
    assert not torch.equal(unpadded_fg[1], padded_fg[1])
    # padded: x' = x / 96 * 12 = x / 8 -> cells 1..2; unpadded stretches by 96 / 48 -> cells 2..4.
    assert padded_fg[1].nonzero()[:, 1].unique().tolist() == [1, 2]
    assert unpadded_fg[1].nonzero()[:, 1].unique().tolist() == [2, 3, 4]
    # The loss follows the masks.
    student, teacher, _, _, _ = _random_case(6, 2, 4, 4, *feat_hw, 8, 0)
    losses = {}
    for scale in ("unpadded", "padded"):
        module = _unit_module(4, 4, impl, box_scale=scale)
        losses[scale] = module(student, teacher, boxes, shapes, padded_shape=padded)
    assert losses["unpadded"] != losses["padded"]
    same = {
        scale: _unit_module(4, 4, impl, box_scale=scale)(student, teacher, boxes, [(80, 96)] * 2, padded)
        for scale in ("unpadded", "padded")
    }
    assert same["unpadded"] == same["padded"]


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_agrees_with_float64(impl):
    student, teacher, boxes, shapes, _ = _random_case(8, 2, 6, 8, 6, 7, 8, 4)
    module = _unit_module(6, 8, impl)
    want = module(student, teacher, boxes, shapes)
    got = module.float()(student.float(), teacher.float(), [b.float() for b in boxes], shapes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_runs(impl):
    student, teacher, boxes, shapes, _ = _random_case(9, 2, 6, 8, 6, 7, 8, 4, dtype=torch.float32)
    module = _unit_module(6, 8, impl).float()
    reference = module(student, teacher, boxes, shapes).item()
    student = student.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(student, teacher, boxes, shapes)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    assert math.isclose(loss.item(), reference, rel_tol=0.05)  # bf16 convs; the loss sums are float32


# ------------------------------------------------------------------------------------------------
# multi-level wrapper and configs
# ------------------------------------------------------------------------------------------------


def test_multi_level_loss_is_the_sum_of_levels():
    torch.manual_seed(10)
    loss = FGDLoss([4, 4, 4], [6, 6, 6], **FGD_CONFIGS["retinanet"]).double()
    _perturb_(loss, 10)
    levels = [_random_case(11 + k, 2, 4, 6, 8 >> k, 10 >> k, 8 << k, 3) for k in range(3)]
    boxes, shapes = levels[0][2], levels[0][3]
    student, teacher = [lv[0] for lv in levels], [lv[1] for lv in levels]
    total = loss(student, teacher, boxes, shapes)
    per_level = sum(level(s, t, boxes, shapes) for level, s, t in zip(loss.levels, student, teacher))
    torch.testing.assert_close(total, per_level, rtol=1e-14, atol=0)
    assert loss.levels[0].gamma_fgd == 0.0005 and len(loss.levels) == 3
    with pytest.raises(ValueError, match="student_feats has 2 levels, expected a list of 3"):
        loss(student[:2], teacher, boxes, shapes)
    with pytest.raises(ValueError, match="teacher_feats has 4 levels"):
        loss(student, teacher + teacher[:1], boxes, shapes)
    with pytest.raises(ValueError, match="student_channels has 2 levels but teacher_channels has 3"):
        FGDLoss([4, 4], [6, 6, 6])


def test_configs_are_the_official_ones():
    assert set(FGD_CONFIGS) == {"retinanet", "faster_rcnn", "reppoints", "fcos", "gfl"}
    assert FGD_CONFIGS["fcos"]["temp"] == 0.8 and FGD_CONFIGS["faster_rcnn"]["lambda_fgd"] == 5e-7
    for config in FGD_CONFIGS.values():
        FGDFeatureLoss(8, 8, **config)  # every key is a constructor argument


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

_S = torch.randn(2, 4, 5, 6)
_T = torch.randn(2, 4, 5, 6)
_BOX = torch.tensor([[1.0, 2.0, 10.0, 12.0]])
_SHAPES = [(40, 48), (36, 40)]

BAD_INPUTS = [
    (
        "spatial",
        (_S, torch.randn(2, 4, 5, 7), [_BOX, _BOX], _SHAPES),
        r"teacher_feats has shape \(2, 4, 5, 7\)",
    ),
    ("batch", (_S, torch.randn(3, 4, 5, 6), [_BOX, _BOX], _SHAPES), r"N, H and W must match"),
    (
        "student channels",
        (torch.randn(2, 3, 5, 6), _T, [_BOX, _BOX], _SHAPES),
        r"student_feats has shape \(2, 3, 5, 6\), expected 4 channels",
    ),
    (
        "teacher channels",
        (_S, torch.randn(2, 8, 5, 6), [_BOX, _BOX], _SHAPES),
        r"teacher_feats has shape \(2, 8, 5, 6\), expected 4 channels",
    ),
    ("3-d features", (_S[0], _T, [_BOX, _BOX], _SHAPES), r"student_feats has shape \(4, 5, 6\)"),
    (
        "box list length",
        (_S, _T, [_BOX], _SHAPES),
        r"gt_boxes has 1 entries, expected one \[n_i, 4\] tensor per image \(N=2\)",
    ),
    (
        "box columns",
        (_S, _T, [_BOX, torch.zeros(3, 5)], _SHAPES),
        r"gt_boxes\[1\] has shape \(3, 5\), expected \(n, 4\)",
    ),
    (
        "box dims",
        (_S, _T, [_BOX, torch.zeros(4)], _SHAPES),
        r"gt_boxes\[1\] has shape \(4,\), expected \(n, 4\)",
    ),
    (
        "x2 > w",
        (_S, _T, [_BOX, torch.tensor([[0.0, 0.0, 41.0, 10.0]])], _SHAPES),
        r"gt_boxes\[1\]\[0\] = \[0, 0, 41, 10\] lies outside img_shapes\[1\] \(h, w\) = \(36, 40\)",
    ),
    (
        "y2 > h",
        (_S, _T, [torch.tensor([[0.0, 0.0, 4.0, 40.5]]), _BOX], _SHAPES),
        r"gt_boxes\[0\]\[0\] .* lies outside",
    ),
    (
        "negative",
        (_S, _T, [_BOX, torch.tensor([[1.0, 1.0, 2.0, 2.0], [-1.0, 0.0, 5.0, 5.0]])], _SHAPES),
        r"gt_boxes\[1\]\[1\] = \[-1, 0, 5, 5\] has a negative coordinate",
    ),
    (
        "x2 < x1",
        (_S, _T, [torch.tensor([[5.0, 1.0, 4.0, 2.0]]), _BOX], _SHAPES),
        r"gt_boxes\[0\]\[0\] .* x2 < x1",
    ),
    (
        "nan",
        (_S, _T, [torch.tensor([[float("nan"), 1.0, 4.0, 2.0]]), _BOX], _SHAPES),
        r"gt_boxes\[0\]\[0\] .* not finite",
    ),
    (
        "img_shapes rows",
        (_S, _T, [_BOX, _BOX], torch.tensor([[40, 48, 3]])),
        r"img_shapes has shape \(1, 3\)",
    ),
    ("img_shapes list", (_S, _T, [_BOX, _BOX], [(40, 48)]), r"img_shapes has 1 entries"),
    ("img_shapes zero", (_S, _T, [_BOX, _BOX], [(40, 48), (0, 40)]), r"img_shapes\[1\] = \(0, 40\)"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args,match", [pytest.param(a, m, id=name) for name, a, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_tensor(impl, args, match):
    module = FGDFeatureLoss(4, 4, impl=impl)
    with pytest.raises(ValueError, match=match):
        module(*args)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="box_scale = 'stride'"):
        FGDFeatureLoss(4, 4, box_scale="stride")
    with pytest.raises(ValueError, match="impl = 'slow'"):
        FGDFeatureLoss(4, 4, impl="slow")
    module = FGDFeatureLoss(4, 4, box_scale="padded")
    with pytest.raises(ValueError, match="padded_shape"):
        module(_S, _T, [_BOX, _BOX], _SHAPES)
    with pytest.raises(ValueError, match=r"img_shapes\[0\] \(h, w\) = \(40, 48\) exceeds padded_shape"):
        module(_S, _T, [_BOX, _BOX], _SHAPES, padded_shape=(32, 48))
