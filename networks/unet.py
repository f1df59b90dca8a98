"""nnU-Net-style 3D U-Net (MONAI ``DynUNet``) whose topology is derived from patch size and voxel spacing.

Paper: Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 203-211 (2021), https://doi.org/10.1038/s41592-020-01008-z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

Triple = tuple[int, int, int]

#: nnU-Net's smallest bottleneck edge length (``UNet_featuremap_min_edge_length``) and channel cap.
MIN_FEATURE_MAP_SIZE = 4
MAX_CHANNELS = 320


def unet_topology(
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
    max_levels: int | None = None,
) -> tuple[list[Triple], list[Triple]]:
    """Derive per-level conv kernels and strides with nnU-Net's rule (``get_pool_and_conv_props``).

    An axis is pooled while its feature map is at least ``2 * min_feature_map_size`` voxels long and its
    current spacing is less than twice the smallest current spacing, so anisotropic data (e.g. 0.8 x 0.8 x
    3 mm) is first pooled in-plane only until the spacings are within a factor 2. A kernel is 1 along an
    axis until that axis's spacing comes within a factor 2 of the smallest (no 3-wide kernels across thick
    slices), then 3. The bottleneck always gets a 3x3x3 kernel. A lone poolable axis is pooled only if its
    map is at least ``3 * min_feature_map_size`` long, as in nnU-Net.

    Args:
        patch_size: Network input size (X, Y, Z) in voxels.
        spacing_mm: Voxel spacing (X, Y, Z) in millimetres, same axis order.
        min_feature_map_size: Smallest edge length of the bottleneck feature map.
        max_levels: Stop after this many levels (resolution stages, counting the full-resolution one);
            ``None`` means as many as the rule allows.

    Returns:
        ``(kernels, strides)``: one ``(kx, ky, kz)`` and one ``(sx, sy, sz)`` per level, full resolution first;
        ``strides[0]`` is ``(1, 1, 1)``. The input must be divisible by the product of the strides per axis.

    Raises:
        ValueError: If ``patch_size`` and ``spacing_mm`` are not 3 positive values each.
    """
    if len(patch_size) != 3 or len(spacing_mm) != 3:
        raise ValueError(
            f"patch_size and spacing_mm need 3 values each (X, Y, Z); got {patch_size}, {spacing_mm}"
        )
    if min(patch_size) <= 0 or min(spacing_mm) <= 0:
        raise ValueError(f"patch_size and spacing_mm must be positive; got {patch_size}, {spacing_mm}")
    spacing = [float(s) for s in spacing_mm]
    size = [float(s) for s in patch_size]
    kernel = [1, 1, 1]
    kernels: list[Triple] = []
    strides: list[Triple] = [(1, 1, 1)]
    while max_levels is None or len(strides) < max_levels:
        axes = [d for d in range(3) if size[d] >= 2 * min_feature_map_size]
        if not axes:
            break
        smallest = min(spacing[d] for d in axes)
        axes = [d for d in axes if spacing[d] / smallest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size:
            break
        for d in range(3):
            if spacing[d] / min(spacing) < 2:
                kernel[d] = 3
        stride = [1, 1, 1]
        for d in axes:
            stride[d] = 2
            spacing[d] *= 2
            size[d] = math.ceil(size[d] / 2)
        strides.append((stride[0], stride[1], stride[2]))
        kernels.append((kernel[0], kernel[1], kernel[2]))
    kernels.append((3, 3, 3))
    return kernels, strides


def default_channels(n_levels: int, base: int = 32) -> tuple[int, ...]:
    """nnU-Net's feature widths: ``base`` doubled per level, capped at 320."""
    return tuple(min(base * 2**i, MAX_CHANNELS) for i in range(n_levels))


def _divisor(strides: Sequence[Sequence[int]]) -> Triple:
    prod = [1, 1, 1]
    for s in strides:
        for d in range(3):
            prod[d] *= int(s[d])
    return (prod[0], prod[1], prod[2])


class UNet(DynUNet):
    """nnU-Net-style residual-free 3D U-Net: MONAI ``DynUNet`` with our deep-supervision protocol.

    Isensee et al., "nnU-Net", Nature Methods 2021 (https://doi.org/10.1038/s41592-020-01008-z).
    Each level is two conv-instancenorm-leakyReLU layers; downsampling is a strided convolution,
    upsampling a transposed convolution. Kernels and strides usually come from :func:`unet_topology`.

    MONAI's own deep-supervision output interpolates every auxiliary map to full resolution and stacks
    them; we override ``forward`` to return the auxiliary logits at their own resolution instead (the
    training loss downsamples the labels, as nnU-Net does, which is cheaper than upsampling logits).

    Input ``(B, in_channels, X, Y, Z)`` float, each of X, Y, Z divisible by ``min_input_divisor``.
    Output (eval, or ``deep_supervision=False``): logits ``(B, out_channels, X, Y, Z)``. Output in training
    mode with ``deep_supervision=True``: a list, full resolution first, then one auxiliary logit map per
    decoder level below it, each at its own resolution (halved along the axes strided at that level).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        kernel_size: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        dropout: float | None = None,
        norm: tuple | str = ("instance", {"affine": True}),
        deep_supervision: bool = False,
    ) -> None:
        n_levels = len(strides)
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[tuple(k) for k in kernel_size],
            strides=[tuple(s) for s in strides],
            upsample_kernel_size=[tuple(s) for s in strides[1:]],
            filters=list(channels),
            dropout=dropout,
            norm_name=norm,
            deep_supervision=deep_supervision,
            # nnU-Net supervises every decoder level except the one right above the bottleneck.
            deep_supr_num=max(n_levels - 2, 1),
        )
        self.min_input_divisor: Triple = _divisor(strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            # heads[i] is filled by the skip layer i + 1 levels below full resolution.
            aux = list(self.heads)
            return [out, *aux]
        return out


def build_unet(
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    strides: Sequence[Sequence[int] | int] | None = None,
    kernel_size: Sequence[Sequence[int] | int] | None = None,
    patch_size: Sequence[int] | None = None,
    spacing_mm: Sequence[float] | None = None,
    dropout: float | None = None,
    norm: tuple | str = ("instance", {"affine": True}),
    deep_supervision: bool = False,
) -> nn.Module:
    """Build :class:`UNet` from explicit ``strides``/``kernel_size`` or from ``patch_size`` + ``spacing_mm``.

    With ``patch_size`` (and optional ``spacing_mm``, default isotropic 1 mm) the topology follows
    :func:`unet_topology`, limited to ``len(channels)`` levels when ``channels`` is given; otherwise
    ``strides`` default to ``(1, 2, 2, 2, 2)`` and kernels to 3. ``strides`` may have one entry per level
    (``strides[0] == 1``, DynUNet style) or ``len(channels) - 1`` (MONAI ``UNet`` style, leading 1 implied).
    ``channels`` default to nnU-Net's widths.
    """
    if patch_size is not None:
        if strides is not None or kernel_size is not None:
            raise ValueError("give either patch_size (+ spacing_mm) or strides/kernel_size, not both")
        spacing = spacing_mm if spacing_mm is not None else (1.0, 1.0, 1.0)
        levels = len(channels) if channels is not None else None
        kernels, stride_list = unet_topology(patch_size, spacing, max_levels=levels)
        if levels is not None and len(stride_list) < levels:
            raise ValueError(
                f"patch_size {tuple(patch_size)} at spacing {tuple(spacing)} allows only {len(stride_list)} "
                f"levels by nnU-Net's rule, but channels has {levels}; give fewer channels or a larger patch"
            )
        divisor = _divisor(stride_list)
        if any(p % d for p, d in zip(patch_size, divisor, strict=True)):
            padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor, strict=True))
            raise ValueError(
                f"patch_size {tuple(patch_size)} is not divisible by the derived strides' product {divisor}; "
                f"use e.g. patch_size={padded}"
            )
    else:
        if spacing_mm is not None:
            raise ValueError("spacing_mm is only used together with patch_size")
        n = len(channels) if channels is not None else (len(strides) if strides is not None else 5)
        stride_list = (
            [_triple(s) for s in strides] if strides is not None else [(1, 1, 1)] + [(2, 2, 2)] * (n - 1)
        )
        if len(stride_list) == n - 1:  # MONAI UNet style: one stride per downsampling, the leading 1 implied
            stride_list = [(1, 1, 1), *stride_list]
        n = len(stride_list)
        kernels = [_triple(k) for k in kernel_size] if kernel_size is not None else [(3, 3, 3)] * n
    if len(stride_list) < 3:
        raise ValueError(f"unet needs at least 3 levels (strides entries); got {len(stride_list)}")
    chans = tuple(channels) if channels is not None else default_channels(len(stride_list))
    if not (len(chans) == len(stride_list) == len(kernels)):
        raise ValueError(
            f"channels ({len(chans)}), strides ({len(stride_list)}) and kernel_size ({len(kernels)}) "
            "need one entry per level"
        )
    return UNet(in_channels, out_channels, chans, kernels, stride_list, dropout, norm, deep_supervision)


def _triple(value: Sequence[int] | int) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 ints (X, Y, Z); got {value}")
    return (int(value[0]), int(value[1]), int(value[2]))


def unet_geometry_options(
    patch_size: Sequence[int], spacing_mm: Sequence[float], options: dict[str, object]
) -> dict[str, object]:
    """The plan-derived topology of :func:`build_unet`: nnU-Net's kernels and strides for this patch.

    Returns ``{"kernel_size": [...], "strides": [...]}`` from :func:`unet_topology` (limited to
    ``len(options["channels"])`` levels when the user gave channels), as plain lists so they round-trip
    through ``plan.json``. Returns ``{}`` when ``options`` already fix the topology (``strides``,
    ``kernel_size``, ``patch_size`` or ``spacing_mm``): explicit options win.

    Raises:
        ValueError: the user's ``channels`` need more levels than nnU-Net's rule allows for this patch.
    """
    if {"strides", "kernel_size", "patch_size", "spacing_mm"} & set(options):
        return {}
    channels = options.get("channels")
    levels = len(channels) if isinstance(channels, Sequence) else None
    kernels, strides = unet_topology(patch_size, spacing_mm, max_levels=levels)
    if levels is not None and len(strides) < levels:
        raise ValueError(
            f"unet: patch {tuple(patch_size)} at spacing {tuple(spacing_mm)} mm allows only {len(strides)} "
            f"levels by nnU-Net's rule, but network_options.channels has {levels}; "
            "give fewer channels or a larger patch_size"
        )
    if len(strides) < 3:
        raise ValueError(
            f"unet: patch {tuple(patch_size)} at spacing {tuple(spacing_mm)} mm allows only {len(strides)} "
            "levels (unet needs 3; every axis of at least 16 voxels gives them); use a larger patch_size"
        )
    return {"kernel_size": [list(k) for k in kernels], "strides": [list(s) for s in strides]}
