"""Network zoo: 3D segmentation ``nn.Module``\\ s, one architecture per file, behind :func:`build_network`.

Imports nothing else of ours.

Usage::

    from networks import build_network, available_networks
    net = build_network("attention_unet", 1, 4, channels=(8, 16, 32), deep_supervision=True)

Input and output layout: ``(B, C, X, Y, Z)`` float tensors; logits come out unnormalised (no softmax).

Deep-supervision protocol (``deep_supervision=True``; unet, attention_unet, dual_attention_unet,
channel_attention_aspp_unet):

* training mode (``net.train()``): ``forward`` returns a ``list`` of logits. Element 0 is the
  full-resolution output ``(B, K, X, Y, Z)``; element ``i`` comes from the decoder level ``i`` steps below
  full resolution and has that level's own, coarser, grid (each axis divided by the product of the strides
  down to that level) -- it is NOT upsampled. The loss is expected to downsample the labels per level
  (nnU-Net style) and weight levels by halving weights.
* eval mode (``net.eval()``): ``forward`` returns only the full-resolution logits tensor.
* The transformers (swin_unetr, unetr) have no auxiliary heads and reject ``deep_supervision=True``.

Input sizes: every network has ``min_input_divisor`` ``(dx, dy, dz)``; X, Y, Z must be multiples of it
(the product of the strides for the CNNs, 32 for swin_unetr, 16 for unetr). :func:`required_divisor`
gives it without building weights. ``unetr`` also has ``fixed_input_size`` and accepts only that size.

Geometry from the plan: :func:`geometry_options` derives the options that follow from a plan's patch
size and spacing (unet's kernels and strides, the residual U-Nets' strides, the transformers'
``img_size``) under the user's explicit options; see :mod:`networks.registry`.
"""

from networks.registry import (
    available_networks,
    build_network,
    geometry_options,
    network_options,
    required_divisor,
)
from networks.unet import unet_topology

__all__ = [
    "available_networks",
    "build_network",
    "geometry_options",
    "network_options",
    "required_divisor",
    "unet_topology",
]
