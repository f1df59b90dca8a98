"""Swin UNETR (MONAI's ``SwinUNETR``) behind our registry, with its input constraints checked up front.

Paper: Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images", BrainLes 2021, https://arxiv.org/abs/2201.01266.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SwinUNETR

#: SwinUNETR downsamples by 2 (patch embedding) and four patch mergings: inputs must be multiples of 2**5.
SWIN_DIVISOR = 32


def build_swin_unetr(
    in_channels: int,
    out_channels: int,
    *,
    img_size: Sequence[int] | int | None = None,
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    dropout_path: float = 0.0,
    norm: tuple | str = "instance",
    use_checkpoint: bool = False,
    use_v2: bool = False,
    deep_supervision: bool = False,
) -> SwinUNETR:
    """Build MONAI's 3D ``SwinUNETR`` (Hatamizadeh et al. 2021, https://arxiv.org/abs/2201.01266).

    MONAI 1.6 dropped the ``img_size`` argument; we still accept it to reject, at build time, a patch size
    whose X, Y or Z is not a multiple of 32 (MONAI only notices at the first forward pass).

    Args:
        in_channels: Input image channels.
        out_channels: Output classes.
        img_size: Intended patch size (X, Y, Z) in voxels, checked only; the network accepts any multiple of 32
            (with instance norm, training also needs one dimension >= 64: the 1/32 bottleneck must exceed 1 voxel).
        feature_size: Embedding width; a multiple of 12 (MONAI's constraint).
        depths: Swin blocks per stage (4 stages).
        num_heads: Attention heads per stage; ``feature_size * 2**i`` must be divisible by ``num_heads[i]``.
        window_size: Local attention window edge, in tokens.
        dropout: Dropout after the patch embedding (MONAI ``drop_rate``).
        attn_dropout: Attention dropout (MONAI ``attn_drop_rate``).
        dropout_path: Stochastic depth rate (MONAI ``dropout_path_rate``).
        norm: Norm of the convolutional encoder/decoder blocks (MONAI ``norm_name``).
        use_checkpoint: Gradient checkpointing in the Swin stages (less memory, more compute).
        use_v2: Swin UNETR v2 (a residual conv block before each Swin stage).
        deep_supervision: Must be False: the architecture has no auxiliary heads.

    Returns:
        The MONAI module with ``min_input_divisor = (32, 32, 32)``; logits ``(B, out_channels, X, Y, Z)``.
    """
    if deep_supervision:
        raise ValueError("swin_unetr has no deep supervision heads; valid: deep_supervision=False")
    _check_options(img_size, norm, feature_size, depths, num_heads)
    net = SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        drop_rate=dropout,
        attn_drop_rate=attn_dropout,
        dropout_path_rate=dropout_path,
        norm_name=norm,
        use_checkpoint=use_checkpoint,
        use_v2=use_v2,
        spatial_dims=3,
    )
    # nn.Module.__setattr__ is typed for Tensor | Module values only; plain attributes are fine at run time.
    net.min_input_divisor = (SWIN_DIVISOR,) * 3  # type: ignore[assignment]
    return net


def _check_options(
    img_size: Sequence[int] | int | None,
    norm: tuple | str,
    feature_size: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
) -> None:
    """Refuse, at build time, the options MONAI would only reject at the first forward pass (or never).

    Raises:
        ValueError: naming the option, the constraint and a valid value.
    """
    if img_size is not None:
        size = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 3 or any(s <= 0 or s % SWIN_DIVISOR for s in size):
            raise ValueError(
                f"swin_unetr needs every patch dimension to be a positive multiple of {SWIN_DIVISOR}; "
                f"got img_size={img_size} (valid e.g. (96, 96, 96), (64, 64, 32))"
            )
        if max(size) < 2 * SWIN_DIVISOR and _is_instance_norm(norm):
            # The bottleneck grid is img_size / 32; instance norm needs more than one voxel there in training.
            raise ValueError(
                f"swin_unetr with instance norm needs at least one patch dimension >= {2 * SWIN_DIVISOR}; "
                f"got img_size={img_size}"
            )
    if feature_size % 12:
        raise ValueError(
            f"swin_unetr feature_size must be a multiple of 12 (e.g. 12, 24, 48); got {feature_size}"
        )
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(
            f"swin_unetr needs 4 depths and 4 num_heads; got {tuple(depths)}, {tuple(num_heads)}"
        )
    for i, heads in enumerate(num_heads):
        if (feature_size * 2**i) % heads:
            raise ValueError(
                f"swin_unetr stage {i} width {feature_size * 2**i} is not divisible by num_heads[{i}]={heads}"
            )


def _is_instance_norm(norm: tuple | str) -> bool:
    name = norm[0] if isinstance(norm, tuple) else norm
    return str(name).lower().startswith("instance")
