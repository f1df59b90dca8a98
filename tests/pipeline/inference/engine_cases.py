"""Small networks and images shared by the sliding-window engine's tests (no tests here)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.inference.config import InferenceConfig
from pipeline.inference.sliding_window import sliding_window_logits

ROI = (16, 12, 10)


def conv_net(in_channels: int = 1, classes: int = 3, seed: int = 0) -> nn.Module:
    """A seeded eval-mode conv net whose outputs depend on the window position.

    Padding zeros at the window border plus a strided stage: blending mistakes show up.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(in_channels, 6, 3, padding=1),
        nn.InstanceNorm3d(6, affine=True),
        nn.LeakyReLU(),
        nn.Conv3d(6, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear"),
        nn.Conv3d(6, classes, 3, padding=1),
    ).eval()


def random_image(shape=(1, 1, 29, 22, 17), seed: int = 1) -> torch.Tensor:
    """A seeded standard-normal ``(B, C, X, Y, Z)`` image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def plain_logits(image: torch.Tensor, net: nn.Module, **config: object) -> torch.Tensor:
    """The engine's logits with window ``ROI`` and the given :class:`InferenceConfig` fields."""
    return sliding_window_logits(image, net, InferenceConfig(roi_size=ROI, **config))  # type: ignore[arg-type]


def batchnorm_net() -> nn.Module:
    """MONAI's AttentionUnet (BatchNorm after convs and transposed convs), non-trivial statistics."""
    from monai.networks.nets import AttentionUnet

    torch.manual_seed(3)
    net = AttentionUnet(3, 1, 3, channels=(4, 8, 8), strides=(2, 2))
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def mirrored(net: nn.Module, axes: tuple[int, ...]) -> nn.Module:
    """``net`` applied to the input flipped over ``axes`` (of ``(N, C, X, Y, Z)``), flipped back."""

    class Mirrored(nn.Module):
        def forward(self, x):
            return net(x.flip(axes)).flip(axes) if axes else net(x)

    return Mirrored()
