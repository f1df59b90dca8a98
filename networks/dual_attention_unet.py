"""3D U-Net with DANet's dual (position + channel) attention at the deepest levels, as in DAUNet.

Papers: Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019,
https://arxiv.org/abs/1809.02983; dual attention in a 3D U-Net as in Bouget et al. (AGUNet/DAGUNet,
https://arxiv.org/abs/2101.07715) and the DAUNet family. Written by us (MONAI has no dual-attention U-Net).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.residual_unet import ResidualUNet, ResidualUNetConfig


class PositionAttention(nn.Module):
    """DANet position (spatial) attention: every voxel attends to every voxel of the feature map.

    Memory: the attention matrix is ``N x N`` with ``N = X*Y*Z`` voxels of this level, i.e. ``4 N^2`` bytes
    per sample in float32 on the math path (CPU), kept for the backward pass as well; e.g. N = 8^3 -> 1 MiB,
    16^3 -> 64 MiB, 32^3 -> 4 GiB. We use ``scaled_dot_product_attention`` so that CUDA's memory-efficient
    kernels avoid materialising it; compute stays O(N^2 C).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = max(channels // 8, 1)
        self.query = nn.Conv3d(channels, reduced, 1)
        self.key = nn.Conv3d(channels, reduced, 1)
        self.value = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> attended features, same shape (without the residual)."""
        b, c = x.shape[:2]
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C/8)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        # DANet uses unscaled dot products: scale=1.0.
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return out.squeeze(1).transpose(1, 2).reshape(b, c, *x.shape[2:])


class ChannelAttention(nn.Module):
    """DANet channel attention: a ``C x C`` affinity over channels (cheap: O(C^2) memory, O(C^2 N) compute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> attended features, same shape (without the residual)."""
        # Energies are sums over all voxels and overflow/saturate in half precision, so compute in float32.
        with _autocast_off(x.device.type):
            flat = x.float().flatten(2)  # (B, C, N)
            energy = torch.bmm(flat, flat.transpose(1, 2))
            # DANet's trick: subtract from the row max so that dissimilar channels get the larger weight.
            energy = energy.amax(dim=-1, keepdim=True) - energy
            out = torch.bmm(torch.softmax(energy, dim=-1), flat)
        return out.to(x.dtype).reshape(x.shape)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # The meta device (used for FLOP counting without memory) has no autocast state to switch off.
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class DualAttention(nn.Module):
    """Sum of position and channel attention with learnable scales ``gamma`` (zero at init, so identity)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.position = PositionAttention(channels)
        self.channel = ChannelAttention()
        self.gamma_position = nn.Parameter(torch.zeros(1))
        self.gamma_channel = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma_position * self.position(x) + self.gamma_channel * self.channel(x)


class DualAttentionUNet(ResidualUNet):
    """Residual 3D U-Net whose ``attention_levels`` deepest encoder levels pass through dual attention.

    Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (https://arxiv.org/abs/1809.02983),
    applied in 3D at the deep levels of a U-Net as in DAUNet; ``multi_scale_input`` and ``deep_supervision``
    as in AGUNet (Bouget et al. 2021). The attended features feed both the skip and the next level.

    Memory cost of the position attention: ``4 * B * N^2`` bytes (float32) per attended level, N the number
    of voxels there; with patch P and strides product S at that level, N = prod(P / S). Keep N <= ~16^3
    (64 MiB per sample) by choosing ``attention_levels`` (default 2: bottleneck and the level above).

    Input ``(B, in_channels, X, Y, Z)``, X, Y, Z multiples of ``min_input_divisor``; output logits
    ``(B, out_channels, X, Y, Z)`` or the deep-supervision list described in :mod:`networks`.
    """

    def __init__(self, config: ResidualUNetConfig, attention_levels: int = 2) -> None:
        n = len(config.channels)
        if not 1 <= attention_levels <= n:
            raise ValueError(f"attention_levels must be in 1..{n} (number of levels); got {attention_levels}")
        super().__init__(config)
        self.first_attention_level = n - attention_levels
        self.attention = nn.ModuleList(
            DualAttention(c) for c in list(config.channels)[self.first_attention_level :]
        )

    def transform_encoder(self, level: int, features: torch.Tensor) -> torch.Tensor:
        if level < self.first_attention_level:
            return features
        return self.attention[level - self.first_attention_level](features)


def build_dual_attention_unet(
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
    attention_levels: int = 2,
) -> DualAttentionUNet:
    """Build :class:`DualAttentionUNet`; options as in :class:`~networks.residual_unet.ResidualUNetConfig`
    plus ``attention_levels`` (how many of the deepest levels, bottleneck included, get dual attention)."""
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
    return DualAttentionUNet(config, attention_levels)
