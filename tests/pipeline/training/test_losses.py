"""Deep-supervision Dice+CE on MONAI's DeepSupervisionLoss: nnU-Net weights, nearest label downsampling."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from pipeline.training.losses import deep_supervision_weights, supervised_loss


def _dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    base = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    return float(base(logits, labels))


def test_weights_halve_and_drop_lowest():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([8 / 14, 4 / 14, 2 / 14, 0.0])


def test_single_output_is_plain_dice_ce():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    full = torch.randn(2, 3, 8, 8, 8)
    assert float(supervised_loss(full, labels)) == pytest.approx(_dice_ce(full, labels), rel=1e-6)
    # a perfect prediction scores lower than a random one
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 20
    assert supervised_loss(perfect, labels) < supervised_loss(full, labels)


def test_levels_weighted_as_nnunet_with_labels_taken_at_even_indices():
    """Expected value built by hand: weights 8/14, 4/14, 2/14, 0 and labels sub-sampled at index 2i.

    ``[..., ::2]`` is what ``F.interpolate(mode="nearest")`` picks for a factor of 2 (floor(i * 2));
    MONAI's default ``"nearest-exact"`` would pick index 2i + 1 and give a different value.
    """
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 8))
    shapes = [(16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]
    outputs = [torch.randn(2, 3, *s) for s in shapes]
    half, quarter = labels[..., ::2, ::2, ::2], labels[..., ::4, ::4, ::4]
    expected = (
        8 / 14 * _dice_ce(outputs[0], labels)
        + 4 / 14 * _dice_ce(outputs[1], half)
        + 2 / 14 * _dice_ce(outputs[2], quarter)
    )
    assert float(supervised_loss(outputs, labels)) == pytest.approx(expected, rel=1e-6)
    odd = labels[..., 1::2, 1::2, 1::2]  # the nearest-exact choice
    assert _dice_ce(outputs[1], odd) != pytest.approx(_dice_ce(outputs[1], half), rel=1e-3)
    # float labels (as the trainer passes them) give the same value
    assert float(supervised_loss(outputs, labels.float())) == pytest.approx(expected, rel=1e-6)


def test_coarsest_level_gets_no_gradient():
    """nnU-Net's zero-weight level is not computed: its head gets no gradient, so weight decay leaves it alone."""
    labels = torch.randint(0, 2, (1, 1, 8, 8, 8))
    outputs = [torch.randn(1, 2, *s, requires_grad=True) for s in [(8, 8, 8), (4, 4, 4), (2, 2, 2)]]
    supervised_loss(outputs, labels).backward()
    assert outputs[0].grad is not None and outputs[1].grad is not None
    assert outputs[2].grad is None
