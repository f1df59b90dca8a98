"""UNETR (MONAI's ``UNETR``) behind our registry, with its fixed input size checked up front.

Paper: Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022,
https://arxiv.org/abs/2103.10504.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNETR

#: UNETR tokenises the volume into 16^3 patches.
UNETR_PATCH = 16


def build_unetr(
    in_channels: int,
    out_channels: int,
    *,
    img_size: Sequence[int] | int = (96, 96, 96),
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    dropout: float = 0.0,
    norm: tuple | str = "instance",
    res_block: bool = True,
    deep_supervision: bool = False,
) -> UNETR:
    """Build MONAI's 3D ``UNETR`` (Hatamizadeh et al. 2022, https://arxiv.org/abs/2103.10504).

    UNETR's learned position embedding fixes the input size: the network accepts exactly ``img_size``
    (sliding-window inference must use it as ROI). Each dimension must be a multiple of 16.

    Args:
        in_channels: Input image channels.
        out_channels: Output classes.
        img_size: Patch size (X, Y, Z) in voxels, multiples of 16.
        feature_size: Width of the convolutional decoder.
        hidden_size: ViT embedding width; divisible by ``num_heads``.
        mlp_dim: ViT MLP width.
        num_heads: ViT attention heads.
        dropout: Dropout in the ViT (MONAI ``dropout_rate``).
        norm: Norm of the convolutional blocks (MONAI ``norm_name``).
        res_block: Residual convolutional blocks.
        deep_supervision: Must be False: the architecture has no auxiliary heads.

    Returns:
        The MONAI module with ``min_input_divisor = (16, 16, 16)`` and ``fixed_input_size = img_size``;
        logits ``(B, out_channels, X, Y, Z)``.
    """
    if deep_supervision:
        raise ValueError("unetr has no deep supervision heads; valid: deep_supervision=False")
    size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 or s % UNETR_PATCH for s in size):
        raise ValueError(
            f"unetr needs img_size with 3 positive multiples of {UNETR_PATCH}; got {img_size} "
            "(valid e.g. (96, 96, 96), (64, 64, 32))"
        )
    if hidden_size % num_heads:
        raise ValueError(f"unetr hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    net = UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=size,
        feature_size=feature_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        dropout_rate=dropout,
        norm_name=norm,
        res_block=res_block,
        spatial_dims=3,
    )
    # MONAI's TransformerBlock always creates a cross-attention LayerNorm that UNETR never calls; freeze it so
    # optimisers do not carry (or weight-decay) parameters that receive no gradient.
    for name, param in net.named_parameters():
        if "norm_cross_attn" in name:
            param.requires_grad_(False)
    # nn.Module.__setattr__ is typed for Tensor | Module values only; plain attributes are fine at run time.
    net.min_input_divisor = (UNETR_PATCH,) * 3  # type: ignore[assignment]
    net.fixed_input_size = size  # type: ignore[assignment]
    return net
