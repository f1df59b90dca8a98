"""Name -> builder registry for the network zoo; validates option names and derives geometry from the plan.

Geometry from the plan (nnU-Net's idea): each :class:`NetworkSpec` may have a ``geometry`` hook
``(patch_size, spacing_mm, explicit_options) -> options`` giving the options that follow from the
plan's patch size and target spacing -- ``unet``'s per-level kernels and strides (nnU-Net's
``get_pool_and_conv_props`` rule, no downsampling across thick slices), the residual U-Nets' strides
(and level count), the transformers' ``img_size``. :func:`geometry_options` merges them *under* the
user's explicit ``network_options`` (explicit options win; a hook steps aside when the user fixed the
topology, e.g. gave ``strides``).

The patch size and the topology depend on each other (the patch must be a multiple of the product of
the strides, and the strides follow the patch). They are resolved as nnU-Net does, by the planner
(``preprocessing.plan.make_plan``): plan the patch from the median shape and the memory budget first,
derive the topology from that patch, round the patch to the topology's divisor, and repeat until the
patch is a multiple of its own topology's divisor. The resolved options are stored in ``plan.json``
(``network_options``), so a trained bundle rebuilds exactly the network it was trained with, whatever
a later version's rule would derive.

Plain tuples in, plain dicts out: this package imports nothing else of ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from networks.attention_unet import build_attention_unet
from networks.channel_attention_aspp_unet import build_channel_attention_aspp_unet
from networks.dual_attention_unet import build_dual_attention_unet
from networks.swin_unetr import SWIN_DIVISOR, build_swin_unetr
from networks.unet import build_unet, default_channels, unet_geometry_options, unet_topology
from networks.unetr import UNETR_PATCH, build_unetr

#: ``(patch_size (X, Y, Z) voxels, spacing_mm (X, Y, Z), explicit options) -> derived options``.
GeometryHook = Callable[[tuple[int, int, int], tuple[float, float, float], dict[str, Any]], dict[str, Any]]

#: The residual U-Nets' default depth (``channels=(32, 64, 128, 256, 320)``).
_RESIDUAL_LEVELS = 5


def _residual_unet_geometry(
    patch_size: tuple[int, int, int], spacing_mm: tuple[float, float, float], options: dict[str, Any]
) -> dict[str, Any]:
    """Strides of the residual U-Nets from nnU-Net's rule (their kernel is one size for every level).

    Without ``channels`` the level count follows the patch too (at most 5, nnU-Net's widths); with
    ``channels`` the strides fill those levels, or the builder's default 2-per-level strides stay when the
    patch is too small for that many levels by the rule. ``strides`` given: nothing is derived.
    """
    if "strides" in options:
        return {}
    channels = options.get("channels")
    levels = len(channels) if isinstance(channels, Sequence) else _RESIDUAL_LEVELS
    _, strides = unet_topology(patch_size, spacing_mm, max_levels=levels)
    if len(strides) < 2 or (channels is not None and len(strides) < levels):
        return {}
    derived: dict[str, Any] = {"strides": [list(s) for s in strides]}
    if channels is None:
        derived["channels"] = list(default_channels(len(strides)))
    return derived


def _img_size_geometry(
    patch_size: tuple[int, int, int], spacing_mm: tuple[float, float, float], options: dict[str, Any]
) -> dict[str, Any]:
    """The transformers take the plan's patch as ``img_size`` (UNETR's position embedding needs it)."""
    return {} if "img_size" in options else {"img_size": list(patch_size)}


@dataclass(frozen=True)
class NetworkSpec:
    """A registered architecture: ``builder(in_channels, out_channels, **options) -> nn.Module``."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    #: Divisor independent of the options (transformers); ``None``: read it from a meta-device build.
    fixed_divisor: tuple[int, int, int] | None = None
    #: Options that follow from the plan's patch size and spacing (see the module docstring).
    geometry: GeometryHook | None = None

    def option_names(self) -> list[str]:
        """Keyword options the builder accepts (MONAI vocabulary)."""
        params = inspect.signature(self.builder).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


_REGISTRY: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            "unet",
            "nnU-Net-style U-Net (MONAI DynUNet); topology from patch size and spacing",
            build_unet,
            geometry=unet_geometry_options,
        ),
        NetworkSpec(
            "attention_unet",
            "residual U-Net with additive attention gates, multi-scale input, deep supervision (AGUNet)",
            build_attention_unet,
            geometry=_residual_unet_geometry,
        ),
        NetworkSpec(
            "dual_attention_unet",
            "residual U-Net with DANet position+channel attention at the deepest levels (DAUNet)",
            build_dual_attention_unet,
            geometry=_residual_unet_geometry,
        ),
        NetworkSpec(
            "channel_attention_aspp_unet",
            "residual U-Net with squeeze-and-excitation channel attention and an ASPP bottleneck",
            build_channel_attention_aspp_unet,
            geometry=_residual_unet_geometry,
        ),
        NetworkSpec(
            "swin_unetr",
            "MONAI SwinUNETR: Swin transformer encoder, conv decoder; inputs multiples of 32",
            build_swin_unetr,
            (SWIN_DIVISOR,) * 3,
            _img_size_geometry,
        ),
        NetworkSpec(
            "unetr",
            "MONAI UNETR: ViT encoder on 16^3 patches, conv decoder; accepts only its img_size",
            build_unetr,
            (UNETR_PATCH,) * 3,
            _img_size_geometry,
        ),
    )
}


def available_networks() -> dict[str, str]:
    """Registered network names mapped to one-line descriptions."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def network_options(name: str) -> list[str]:
    """Option names that :func:`build_network` accepts for ``name``."""
    return _spec(name).option_names()


def geometry_options(
    name: str,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Options to build ``name`` for a plan: the geometry derived from patch and spacing, under ``options``.

    Args:
        name: One of :func:`available_networks`.
        patch_size: The plan's patch (X, Y, Z) in voxels (RAS axis order).
        spacing_mm: The plan's target spacing (X, Y, Z) in millimetres, same axis order.
        options: The user's explicit ``network_options``; they win over anything derived.

    Returns:
        ``{**derived, **options}``, JSON-friendly (lists, not tuples, for the derived values).

    Raises:
        ValueError: Unknown name, a patch/spacing that is not 3 positive values, or explicit options that
            cannot fit this patch (e.g. more ``channels`` levels than the patch allows).
    """
    spec = _spec(name)
    explicit = dict(options or {})
    patch = tuple(int(p) for p in patch_size)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(patch) != 3 or len(spacing) != 3 or min(patch) <= 0 or not min(spacing) > 0:
        raise ValueError(f"patch_size and spacing_mm need 3 positive values each; got {patch_size}, {spacing_mm}")
    derived = spec.geometry(patch, spacing, explicit) if spec.geometry is not None else {}
    return {**derived, **explicit}


def build_network(name: str, in_channels: int, out_channels: int, **options: object) -> nn.Module:
    """Build a registered 3D segmentation network.

    Args:
        name: One of :func:`available_networks`.
        in_channels: Input image channels.
        out_channels: Output logit channels (classes including background).
        **options: Architecture options in MONAI's vocabulary (see :func:`network_options`).

    Returns:
        An ``nn.Module`` mapping ``(B, in_channels, X, Y, Z)`` to logits ``(B, out_channels, X, Y, Z)`` (or the
        deep-supervision list in training mode) with an attribute ``min_input_divisor`` ``(dx, dy, dz)``.

    Raises:
        ValueError: Unknown name, unknown option, or an option value the architecture cannot take.
    """
    spec = _spec(name)
    valid = spec.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for network '{name}'; valid options: {valid}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1; got {in_channels}, {out_channels}")
    return spec.builder(in_channels, out_channels, **options)


def required_divisor(name: str, **options: object) -> tuple[int, int, int]:
    """Per-axis divisor ``(dx, dy, dz)`` that every input size of this network must be a multiple of.

    For the CNNs, builds the network on the ``meta`` device (no memory, no weights) and reads
    ``min_input_divisor``; the transformers' divisor is fixed (MONAI's Swin init cannot run on ``meta``).
    ``unetr`` additionally accepts only its ``img_size``.
    """
    spec = _spec(name)
    if spec.fixed_divisor is not None:
        unknown = sorted(set(options) - set(spec.option_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for network '{name}'; valid options: {spec.option_names()}"
            )
        return spec.fixed_divisor
    with torch.device("meta"):
        net = build_network(name, 1, 2, **options)
    # nn.Module types attributes it does not know as Tensor | Module; the builders set a tuple of ints.
    return tuple(net.min_input_divisor)  # type: ignore[arg-type]


def _spec(name: str) -> NetworkSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown network '{name}'; valid names: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
