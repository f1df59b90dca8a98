"""Dice + cross-entropy with nnU-Net's deep-supervision weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


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


def downsample_labels(labels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map ``(B, 1, X, Y, Z)`` to ``shape`` (no label mixing)."""
    if tuple(labels.shape[2:]) == tuple(shape):
        return labels
    return F.interpolate(labels.float(), size=tuple(shape), mode="nearest").to(labels.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of Dice+CE over deep-supervision outputs.

    Args:
        include_background: count background in the Dice term (default False, like nnU-Net's
            ``do_bg=False``; cross-entropy still sees every class).
        lambda_dice / lambda_ce: term weights.

    Call with ``outputs``: logits ``(B, K, X, Y, Z)`` or a list of them (full resolution first),
    and ``labels``: ``(B, 1, X, Y, Z)`` integer labels at full resolution. Returns a scalar.
    """

    def __init__(
        self, include_background: bool = False, lambda_dice: float = 1.0, lambda_ce: float = 1.0
    ) -> None:
        super().__init__()
        self.base = DiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs.float(), labels)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(weights, outputs, strict=True):
            if weight > 0:
                total = total + weight * self.base(
                    logits.float(), downsample_labels(labels, logits.shape[2:])
                )
        return total
