"""3D Attention U-Net with AGUNet's multi-scale input and deep supervision.

Papers: Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018,
https://arxiv.org/abs/1804.03999; Bouget et al., "Meningioma segmentation in T1-weighted MRI leveraging
global context and attention mechanisms" (AGUNet), Frontiers in Radiology 2021, https://arxiv.org/abs/2101.07715.

Written by us: MONAI's ``AttentionUnet`` lacks the multi-scale input and deep supervision options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from networks.residual_unet import ResidualUNet, ResidualUNetConfig


class AttentionCoefficients(nn.Module):
    """Additive attention coefficients ``alpha`` of Oktay et al. (eq. 1-2), resampled to the skip's grid.

    ``alpha = sigmoid(psi(relu(W_x x + W_g g)))``; ``W_x`` is a strided conv that brings the skip ``x`` to
    the gating grid, as in the paper. Register a forward hook on this module to read the coefficients.
    """

    def __init__(self, skip_channels: int, gating_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        inter = max(skip_channels // 2, 1)
        step = cast(tuple[int, int, int], tuple(stride))
        self.theta_x = nn.Conv3d(skip_channels, inter, step, step, bias=False)
        self.phi_g = nn.Conv3d(gating_channels, inter, 1, bias=True)
        self.psi = nn.Conv3d(inter, 1, 1, bias=True)

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """Args: skip ``(B, Cs, X, Y, Z)``, gating ``(B, Cg, X/s, Y/s, Z/s)``. Returns ``(B, 1, X, Y, Z)`` in [0, 1]."""
        a = self.psi(F.relu(self.theta_x(skip) + self.phi_g(gating)))
        # Upsample the logits, not the sigmoid output: the result stays in [0, 1] either way, and
        # interpolating before the sigmoid keeps the gate smooth without a second clamp.
        a = F.interpolate(a, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return torch.sigmoid(a)


class AttentionGate(nn.Module):
    """Gates a skip connection by :class:`AttentionCoefficients` (broadcast over channels)."""

    def __init__(self, skip_channels: int, gating_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.coefficients = AttentionCoefficients(skip_channels, gating_channels, stride)

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        return skip * self.coefficients(skip, gating)


class AttentionUNet(ResidualUNet):
    """Residual 3D U-Net with additive attention gates on every skip connection.

    Oktay et al., "Attention U-Net", MIDL 2018 (https://arxiv.org/abs/1804.03999), extended as in AGUNet
    (Bouget et al. 2021, https://arxiv.org/abs/2101.07715): ``multi_scale_input`` concatenates the input,
    average-pooled to each encoder level's grid, before that level's block; ``deep_supervision`` adds a
    logit head per decoder level. Instance norm and residual blocks by default.

    The gate of skip level ``i`` is driven by the decoder map one level coarser (the bottleneck for the
    deepest skip). Coefficients: outputs of the ``AttentionCoefficients`` submodules, ``(B, 1, *skip grid)``.

    Input ``(B, in_channels, X, Y, Z)``, X, Y, Z multiples of ``min_input_divisor``; output logits
    ``(B, out_channels, X, Y, Z)`` or the deep-supervision list described in :mod:`networks`.
    """

    def __init__(self, config: ResidualUNetConfig) -> None:
        super().__init__(config)
        chans = list(config.channels)
        self.gates = nn.ModuleList(
            AttentionGate(chans[i], chans[i + 1], self.strides[i + 1]) for i in range(len(chans) - 1)
        )

    def merge_skip(self, level: int, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        return self.gates[level](skip, gating)


def build_attention_unet(
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] = (32, 64, 128, 256, 320),
    strides: Sequence[Sequence[int] | int] | None = None,
    kernel_size: Sequence[int] | int = 3,
    dropout: float | None = None,
    norm: tuple | str = ("instance", {"affine": True}),
    multi_scale_input: bool = False,
    deep_supervision: bool = False,
) -> AttentionUNet:
    """Build :class:`AttentionUNet`; options as in :class:`~networks.residual_unet.ResidualUNetConfig`."""
    config = ResidualUNetConfig(
        in_channels,
        out_channels,
        tuple(channels),
        strides,
        kernel_size,
        dropout,
        norm,
        multi_scale_input,
        deep_supervision,
    )
    return AttentionUNet(config)
