"""Dice + cross-entropy with nnU-Net's deep-supervision weighting, on MONAI's ``DeepSupervisionLoss``.

MONAI's ``monai.losses.DeepSupervisionLoss`` does the level loop: it resizes the labels to each
output's grid and sums the weighted per-level losses. Two things it does not do are kept here:

* **nnU-Net's weights** (:func:`deep_supervision_weights`): halve per level, drop the coarsest
  level, normalise to sum 1. MONAI's ``"exp"`` mode halves but neither drops nor normalises, so the
  weights are passed explicitly; they depend on the number of outputs, which only the first batch
  tells (:func:`supervised_loss` builds one MONAI loss per level count and caches it).
* **The zero-weight coarsest level is not passed to MONAI**, which would compute it and multiply by
  0: that head would then get zero gradients instead of none, so weight decay and the optimiser's
  moments would start moving its weights (they did not before).

The labels are resized with ``"nearest"`` (index ``floor(i * in/out)``: coarse voxel ``i`` takes
fine voxel ``2i``, the centre of a stride-2 convolution with padding 1) instead of MONAI's default
``"nearest-exact"`` (fine voxel ``2i + 1``, half a coarse voxel off our networks' grids).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights: halve per level, drop the lowest resolution, normalise to sum 1.

    ``levels=1`` gives ``[1.0]``; ``levels=4`` gives ``[8, 4, 2, 0] / 14``.
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    weights = [0.5**i for i in range(levels)]
    if levels > 1:
        weights[-1] = 0.0  # the coarsest output is too coarse to help (nnU-Net)
    total = sum(weights)
    return [w / total for w in weights]


def dice_ce_loss(include_background: bool = False) -> DiceCELoss:
    """The per-level loss: soft Dice (over the batch, foreground only by default, as nnU-Net's
    ``do_bg=False``) plus cross-entropy over every class, both weighted 1."""
    return DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=True)


@cache
def deep_supervision_loss(levels: int) -> DeepSupervisionLoss:
    """MONAI's deep-supervision loss over ``levels`` outputs with nnU-Net's weights (the zero-weight
    coarsest level removed). Cached: the loss holds no state, and the level count is fixed per network."""
    supervised = max(1, levels - 1)
    loss = DeepSupervisionLoss(dice_ce_loss(), weights=deep_supervision_weights(levels)[:supervised])
    loss.interp_mode = "nearest"  # see the module docstring: aligned with our strided convolutions
    return loss


def supervised_loss(outputs: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Dice+CE of a network's training output, weighted over deep-supervision levels.

    Args:
        outputs: logits ``(B, K, X, Y, Z)`` or the deep-supervision list of them (full resolution
            first, then each coarser decoder level at its own grid; see :mod:`networks`).
        labels: ``(B, 1, X, Y, Z)`` integer-valued labels at full resolution (any dtype; resized
            as float, which ``F.interpolate`` needs).

    Returns:
        Scalar float32 loss.
    """
    target = labels.float()
    if isinstance(outputs, torch.Tensor):
        return deep_supervision_loss(1)(outputs, target)
    levels = len(outputs)
    kept = list(outputs[: max(1, levels - 1)])  # the coarsest level's weight is 0 (nnU-Net)
    return deep_supervision_loss(levels)(kept, target)
