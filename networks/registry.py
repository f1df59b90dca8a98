"""Name -> builder registry for the network zoo; validates option names before building."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from networks.attention_unet import build_attention_unet
from networks.channel_attention_aspp_unet import build_channel_attention_aspp_unet
from networks.dual_attention_unet import build_dual_attention_unet
from networks.swin_unetr import SWIN_DIVISOR, build_swin_unetr
from networks.unet import build_unet
from networks.unetr import UNETR_PATCH, build_unetr


@dataclass(frozen=True)
class NetworkSpec:
    """A registered architecture: ``builder(in_channels, out_channels, **options) -> nn.Module``."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    #: Divisor independent of the options (transformers); ``None``: read it from a meta-device build.
    fixed_divisor: tuple[int, int, int] | None = None

    def option_names(self) -> list[str]:
        """Keyword options the builder accepts (MONAI vocabulary)."""
        params = inspect.signature(self.builder).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


_REGISTRY: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            "unet", "nnU-Net-style U-Net (MONAI DynUNet); topology from patch size and spacing", build_unet
        ),
        NetworkSpec(
            "attention_unet",
            "residual U-Net with additive attention gates, multi-scale input, deep supervision (AGUNet)",
            build_attention_unet,
        ),
        NetworkSpec(
            "dual_attention_unet",
            "residual U-Net with DANet position+channel attention at the deepest levels (DAUNet)",
            build_dual_attention_unet,
        ),
        NetworkSpec(
            "channel_attention_aspp_unet",
            "residual U-Net with squeeze-and-excitation channel attention and an ASPP bottleneck",
            build_channel_attention_aspp_unet,
        ),
        NetworkSpec(
            "swin_unetr",
            "MONAI SwinUNETR: Swin transformer encoder, conv decoder; inputs multiples of 32",
            build_swin_unetr,
            (SWIN_DIVISOR,) * 3,
        ),
        NetworkSpec(
            "unetr",
            "MONAI UNETR: ViT encoder on 16^3 patches, conv decoder; accepts only its img_size",
            build_unetr,
            (UNETR_PATCH,) * 3,
        ),
    )
}


def available_networks() -> dict[str, str]:
    """Registered network names mapped to one-line descriptions."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def network_options(name: str) -> list[str]:
    """Option names that :func:`build_network` accepts for ``name``."""
    return _spec(name).option_names()


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
