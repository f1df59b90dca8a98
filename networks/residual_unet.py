"""Residual 3D U-Net skeleton shared by :mod:`networks.attention_unet` and :mod:`networks.dual_attention_unet`.

Written by us rather than taken from MONAI because MONAI's ``AttentionUnet`` has neither multi-scale input
nor deep supervision (the AGUNet extensions, Bouget et al. 2021), and no hook to insert dual attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from torch import nn

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class ResidualUNetConfig:
    """Hyperparameters of the residual U-Nets, in MONAI's vocabulary.

    Attributes:
        in_channels: Input image channels.
        out_channels: Output classes (logit channels, background included).
        channels: Feature width per level, full resolution first; ``len(channels)`` levels in all.
        strides: Downsampling factor ``(sx, sy, sz)`` (or one int) entering each level, either one per level
            with ``strides[0] == 1`` (DynUNet style) or one per downsampling, ``len(channels) - 1`` entries
            (MONAI ``UNet`` style; a leading 1 is implied). Default: 2 per downsampling.
        kernel_size: Convolution kernel (one int or a triple) used at every level.
        dropout: Dropout probability inside the residual blocks (``None`` or 0 for none).
        norm: MONAI norm spec, e.g. ``("instance", {"affine": True})``, ``"batch"``, ``("group", {"num_groups": 4})``.
        multi_scale_input: Inject an average-pooled copy of the input at every encoder level (AGUNet).
        deep_supervision: Add a 1x1x1 logit head to every decoder level except full resolution and the
            bottleneck; see :mod:`networks` for the output protocol.
    """

    in_channels: int
    out_channels: int
    channels: Sequence[int] = (32, 64, 128, 256, 320)
    strides: Sequence[Sequence[int] | int] | None = None
    kernel_size: Sequence[int] | int = 3
    dropout: float | None = None
    norm: tuple | str = ("instance", {"affine": True})
    multi_scale_input: bool = False
    deep_supervision: bool = False

    def level_strides(self) -> list[Triple]:
        """Per-level strides as triples, validated against ``channels``."""
        n = len(self.channels)
        if n < 2:
            raise ValueError(f"channels needs at least 2 levels; got {tuple(self.channels)}")
        raw = self.strides if self.strides is not None else [1] + [2] * (n - 1)
        strides = [_triple(s, "strides") for s in raw]
        if len(strides) == n - 1:
            strides = [(1, 1, 1), *strides]
        if len(strides) != n:
            raise ValueError(
                f"strides needs one entry per level ({n}, strides[0] == 1) or per downsampling ({n - 1}); "
                f"got {len(strides)}"
            )
        if strides[0] != (1, 1, 1):
            raise ValueError(f"strides[0] (the full-resolution level) must be 1; got {strides[0]}")
        if any(v < 1 for s in strides for v in s):
            raise ValueError(f"strides must be >= 1; got {strides}")
        return strides

    def divisor(self) -> Triple:
        """Input sizes must be multiples of this per axis (product of the strides)."""
        prod = [1, 1, 1]
        for s in self.level_strides():
            prod = [p * v for p, v in zip(prod, s, strict=True)]
        return (prod[0], prod[1], prod[2])


def _triple(value: Sequence[int] | int, name: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints (X, Y, Z); got {value}")
    return (int(value[0]), int(value[1]), int(value[2]))


class ResidualUNet(nn.Module):
    """Residual encoder-decoder; subclasses customise :meth:`transform_encoder` and :meth:`merge_skip`.

    Encoder level ``i > 0``: max-pool by ``strides[i]`` (as in Oktay et al. and AGUNet), optionally
    concatenate the input average-pooled to that resolution, then a residual block (conv-norm-leakyReLU-
    conv-norm + projection; MONAI ``UnetResBlock``). Decoder level ``i``: transposed conv from level
    ``i + 1``, concatenation with the (possibly gated) skip, residual block.
    """

    def __init__(self, config: ResidualUNetConfig) -> None:
        super().__init__()
        self.config = config
        strides = config.level_strides()
        chans = list(config.channels)
        kernel = _triple(config.kernel_size, "kernel_size")
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel_size must be odd so that sizes are kept; got {kernel}")
        self.strides = strides
        self.min_input_divisor: Triple = config.divisor()
        extra = config.in_channels if config.multi_scale_input else 0

        def block(cin: int, cout: int) -> UnetResBlock:
            return UnetResBlock(3, cin, cout, kernel, 1, config.norm, dropout=config.dropout)

        self.encoders = nn.ModuleList([block(config.in_channels, chans[0])])
        self.encoders.extend(block(chans[i - 1] + extra, chans[i]) for i in range(1, len(chans)))
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose3d(chans[i + 1], chans[i], strides[i + 1], strides[i + 1], bias=False)
            for i in range(len(chans) - 1)
        )
        self.decoders = nn.ModuleList(block(2 * chans[i], chans[i]) for i in range(len(chans) - 1))
        self.head = UnetOutBlock(3, chans[0], config.out_channels)
        n_aux = len(chans) - 2 if config.deep_supervision else 0
        self.aux_heads = nn.ModuleList(
            UnetOutBlock(3, chans[i], config.out_channels) for i in range(1, 1 + n_aux)
        )

    def transform_encoder(self, level: int, features: torch.Tensor) -> torch.Tensor:
        """Hook applied to every encoder output (bottleneck included) before it is used; identity here."""
        return features

    def merge_skip(self, level: int, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """Hook that turns encoder features into the skip connection; ``gating`` is the coarser decoder map."""
        return skip

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: ``(B, in_channels, X, Y, Z)`` float; X, Y, Z multiples of ``min_input_divisor``.

        Returns:
            Logits ``(B, out_channels, X, Y, Z)``; in training mode with deep supervision, a list of logits,
            full resolution first, then decoder levels 1, 2, ... at their own (coarser) resolution.
        """
        _check_divisible(x, self.min_input_divisor)
        skips = []
        pooled_input = x
        feats = x
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                stride = self.strides[level]
                feats = F.max_pool3d(feats, stride, stride)
                if self.config.multi_scale_input:
                    pooled_input = F.avg_pool3d(pooled_input, stride, stride)
                    feats = torch.cat([feats, pooled_input], dim=1)
            feats = self.transform_encoder(level, encoder(feats))
            skips.append(feats)
        outputs = []
        for level in range(len(self.decoders) - 1, -1, -1):
            up = self.upsamples[level](feats)
            skip = self.merge_skip(level, skips[level], feats)
            feats = self.decoders[level](torch.cat([skip, up], dim=1))
            if 1 <= level <= len(self.aux_heads) and self.training:
                outputs.append(self.aux_heads[level - 1](feats))
        logits = self.head(feats)
        if self.training and self.config.deep_supervision:
            return [logits, *reversed(outputs)]
        return logits


def _check_divisible(x: torch.Tensor, divisor: Triple) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected input (B, C, X, Y, Z); got shape {tuple(x.shape)}")
    if any(s % d for s, d in zip(x.shape[2:], divisor, strict=True)):
        raise ValueError(f"input spatial shape {tuple(x.shape[2:])} must be divisible by {divisor} per axis")
