"""3D residual U-Net with squeeze-and-excitation channel attention and an ASPP bottleneck.

Papers: Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507 (channel
attention); Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabv3), 2017,
https://arxiv.org/abs/1706.05587 (atrous spatial pyramid pooling). The blocks are MONAI's ``ChannelSELayer``
and ``SimpleASPP``; the combination in our residual U-Net is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ChannelSELayer, SimpleASPP
from torch import nn

from networks.residual_unet import ResidualUNet, ResidualUNetConfig


class ChannelAttentionASPPUNet(ResidualUNet):
    """Residual 3D U-Net: SE channel attention after every encoder block, ASPP on the bottleneck.

    Hu et al. 2018 (https://arxiv.org/abs/1709.01507) and DeepLabv3's ASPP, Chen et al. 2017
    (https://arxiv.org/abs/1706.05587). The ASPP has one 1x1x1 branch and 3x3x3 branches dilated by
    ``aspp_dilations[1:]``, each ``C / len(aspp_dilations)`` wide, fused by a 1x1x1 conv-norm-leakyReLU, so
    the bottleneck width C is kept. ``multi_scale_input`` and ``deep_supervision`` as in
    :class:`~networks.attention_unet.AttentionUNet`.

    Input ``(B, in_channels, X, Y, Z)``, X, Y, Z multiples of ``min_input_divisor``; output logits
    ``(B, out_channels, X, Y, Z)`` or the deep-supervision list described in :mod:`networks`.
    """

    def __init__(
        self, config: ResidualUNetConfig, aspp_dilations: Sequence[int] = (1, 2, 4, 6), se_reduction: int = 2
    ) -> None:
        chans = list(config.channels)
        n_branches = len(aspp_dilations)
        if n_branches < 2 or chans[-1] % n_branches:
            raise ValueError(
                f"the bottleneck width {chans[-1]} must be divisible by the number of ASPP branches "
                f"len(aspp_dilations)={n_branches} (at least 2); e.g. aspp_dilations=(1, 2, 4, 6)"
            )
        if se_reduction < 1 or any(c // se_reduction < 1 for c in chans):
            raise ValueError(
                f"se_reduction must be in 1..{min(chans)} (the narrowest level); got {se_reduction}"
            )
        super().__init__(config)
        self.channel_attention = nn.ModuleList(ChannelSELayer(3, c, r=se_reduction) for c in chans)
        self.aspp = SimpleASPP(
            3,
            chans[-1],
            chans[-1] // n_branches,
            kernel_sizes=(1,) + (3,) * (n_branches - 1),
            dilations=tuple(aspp_dilations),
            norm_type=config.norm,
        )

    def transform_encoder(self, level: int, features: torch.Tensor) -> torch.Tensor:
        features = self.channel_attention[level](features)
        if level == len(self.channel_attention) - 1:
            features = self.aspp(features)
        return features


def build_channel_attention_aspp_unet(
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
    aspp_dilations: Sequence[int] = (1, 2, 4, 6),
    se_reduction: int = 2,
) -> ChannelAttentionASPPUNet:
    """Build :class:`ChannelAttentionASPPUNet`; options as in :class:`~networks.residual_unet.ResidualUNetConfig`
    plus ``aspp_dilations`` (first branch 1x1x1) and ``se_reduction`` (SE bottleneck ratio)."""
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
    return ChannelAttentionASPPUNet(config, aspp_dilations, se_reduction)
