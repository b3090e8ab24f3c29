"""Mask sources of the ablations: ground-truth box masks (detection) and token masking of the segmentation
backbone and/or logits in stage 1."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from experiments.engine.manifest import ManifestError, load_manifest
from experiments.methods.maskd import gt_box_masks
from experiments.tasks.segmentation import mask_transforms as segmentation_mask_transforms
from maskd import MaskLearning


def test_gt_box_masks_are_the_box_union_and_its_complement():
    extras = SimpleNamespace(
        targets=[
            {"boxes": torch.tensor([[0.0, 0.0, 31.0, 31.0], [64.0, 64.0, 95.0, 127.0]])},
            {"boxes": torch.tensor([[100.0, 8.0, 120.0, 30.0]])},
        ],
        image_sizes=[(128, 128), (128, 128)],
        batch_shape=(128, 128),
    )
    levels = [torch.zeros(2, 8, 16, 16), torch.zeros(2, 8, 8, 8)]
    masks = gt_box_masks(extras, levels)
    assert [tuple(m.shape) for m in masks] == [(2, 2, 16, 16), (2, 2, 8, 8)]
    for m in masks:
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(m.sum(1), torch.ones_like(m[:, 0]))  # fg + bg = 1 everywhere
    fg = masks[0][:, 0]
    # stride 8: box (0, 0, 31, 31) covers cells 0..4 (floor(0/8)..ceil(31/8)) as FGD's masks do
    assert fg[0, :5, :5].all() and not fg[0, 5:8, 5:8].any()
    assert fg[0, 8:, 8:12].all()  # the second box: x 64..95 -> cells 8..12, y 64..127 -> 8..15
    assert fg[1, 1:4, 12:15].all() and fg[1].sum() < 40
    assert not fg[0, 0, 15] and not fg[1, 10, 0]


def test_gt_box_masks_are_refused_for_segmentation(tmp_path):
    with pytest.raises(ManifestError, match="maskd.masks = .gt_box. is not allowed"):
        load_manifest("embedded_segmentation_smoke", {"maskd": {"masks": "gt_box"}})


def test_segmentation_mask_transforms_mask_each_named_feature():
    torch.manual_seed(0)
    learner = MaskLearning([16, 11], 3, weight_head=False)
    backbone, logits = torch.randn(2, 16, 4, 4), torch.randn(2, 11, 4, 4)
    transforms, collect = segmentation_mask_transforms(learner, ["backbone", "logits"])
    masked_b = transforms["backbone"](backbone)
    masked_l = transforms["logits"](logits)
    out = collect()
    expected = learner([backbone, logits])  # the same tokens applied level by level
    torch.testing.assert_close(out.features[0], expected.features[0])
    torch.testing.assert_close(out.features[1], expected.features[1])
    torch.testing.assert_close(out.dice, expected.dice)
    assert masked_b.shape == backbone.shape and masked_l.shape == logits.shape
    with pytest.raises(ValueError, match="distinct names"):
        segmentation_mask_transforms(learner, ["backbone", "backbone"])
    with pytest.raises(ValueError, match="distinct names"):
        segmentation_mask_transforms(learner, ["P3"])
