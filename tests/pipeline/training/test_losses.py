"""Deep-supervision Dice+CE: nnU-Net weights, nearest label downsampling, agreement with DiceCELoss."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from pipeline.training.losses import DeepSupervisionLoss, deep_supervision_weights, downsample_labels


def test_weights_halve_and_drop_lowest():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([8 / 14, 4 / 14, 2 / 14, 0.0])


def test_label_downsampling_is_nearest():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[..., :4, :, :] = 3
    small = downsample_labels(labels, (4, 4, 4))
    assert small.shape == (1, 1, 4, 4, 4) and small.dtype == torch.long
    assert set(small.unique().tolist()) == {0, 3}  # no interpolated in-between labels
    assert (small[..., :2, :, :] == 3).all() and (small[..., 2:, :, :] == 0).all()


def test_matches_dice_ce_and_combines_levels():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    full, half, quarter = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)
    loss = DeepSupervisionLoss()
    base = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    assert loss(full, labels) == pytest.approx(float(base(full, labels)), rel=1e-6)
    expected = (2 / 3) * base(full, labels) + (1 / 3) * base(half, downsample_labels(labels, (4, 4, 4)))
    assert loss([full, half, quarter], labels) == pytest.approx(float(expected), rel=1e-6)
    # a perfect prediction scores lower than a random one
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 20
    assert loss(perfect, labels) < loss(full, labels)
