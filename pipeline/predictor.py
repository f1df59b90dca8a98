"""Segment one volume with a bundle's fold ensemble, on the volume's own grid.

plan preprocessing (RAS grid at plan spacing, normalisation) -> ``predict_probabilities`` ->
resample the *probabilities* back onto the source grid (linear) -> argmax -> largest connected
component for the labels whose bundle decision is on (``pipeline.postprocessing``).
Resampling probabilities rather than labels keeps thin structures and sub-voxel boundaries
(see GEOMETRY.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.postprocessing import keep_largest_component, largest_component_values
from pipeline.sliding_window import InferenceConfig, predict_probabilities
from preprocessing.image import Volume
from preprocessing.resample import resample_to_grid
from preprocessing.transforms import preprocess_for_inference

if TYPE_CHECKING:
    from pipeline.bundle import ModelBundle


class NonFiniteProbabilitiesError(ValueError):
    """The ensemble's probabilities for an image contain NaN or infinity (a broken model)."""


def segment_volume(
    volume: Volume,
    networks: Sequence[nn.Module],
    bundle: ModelBundle,
    config: InferenceConfig,
    return_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Label map of ``volume`` on its own voxel grid.

    Args:
        volume: ``(C, X, Y, Z)`` image with its RAS affine, any orientation/spacing.
        networks: the bundle's fold networks (``bundle.build_networks(device)``), averaged.
        bundle: supplies the plan (spacing, normalisation) and postprocessing.
        config: sliding-window settings (ROI normally ``bundle.patch_size``).
        return_probabilities: also return the resampled probabilities.

    Returns:
        ``(labels uint8 (X, Y, Z), probabilities float32 (K, X, Y, Z) or None)`` on the grid of
        ``volume`` (same shape and affine).
    """
    image, net_affine = preprocess_for_inference(volume, bundle.plan, device=config.device)
    probs = predict_probabilities(image, list(networks), config)
    if not bool(torch.isfinite(probs).all()):  # argmax of NaN is background: never an "ok" mask
        raise NonFiniteProbabilitiesError(
            f"the model's probabilities for {volume.case_id or 'this image'} contain NaN or infinity "
            "(non-finite weights, or an overflow in the network); no mask is written. Use another "
            "model version, or retrain this one"
        )
    if return_probabilities:
        back = resample_to_grid(
            probs.float(), net_affine, volume.affine_ras, volume.spatial_shape, mode="linear"
        )
        labels = torch.argmax(back, dim=0).to(torch.uint8).cpu().numpy()
        probabilities = back.cpu().numpy().astype(np.float32)
    else:
        labels = resample_argmax(probs, net_affine, volume.affine_ras, volume.spatial_shape)
        probabilities = None
    values = largest_component_values(bundle.postprocessing, bundle.label_names)
    if values:  # only the labels whose decision (bundle.json) is on; see pipeline.postprocessing
        labels = keep_largest_component(labels, values)
    return labels, probabilities


def resample_argmax(
    probs: torch.Tensor,
    src_affine_ras: np.ndarray,
    dst_affine_ras: np.ndarray,
    dst_shape: tuple[int, int, int],
    slab_voxels: int = 2**24,
) -> np.ndarray:
    """Argmax of the probabilities linearly resampled onto the destination grid, slab by slab.

    Resampling all K channels of a 512x512x400 scan at once needs K x 420 MB (5.9 GB for 14
    classes) before the argmax; going through slabs of the destination's last axis keeps the
    peak at ``K * slab_voxels`` floats and gives the identical label map (each destination voxel
    is interpolated independently).

    Args:
        probs: ``(K, X', Y', Z')`` probabilities on the network grid (any device).
        src_affine_ras / dst_affine_ras: voxel -> RAS mm of the network and the source grids.
        dst_shape: the source grid's ``(X, Y, Z)``.
        slab_voxels: destination voxels per slab.

    Returns:
        ``uint8 (X, Y, Z)`` label map on the destination grid.
    """
    dst_affine = np.asarray(dst_affine_ras, dtype=np.float64)
    nx, ny, nz = (int(v) for v in dst_shape)
    depth = max(1, min(nz, slab_voxels // max(1, nx * ny)))
    labels = np.empty((nx, ny, nz), dtype=np.uint8)
    for z0 in range(0, nz, depth):
        z1 = min(nz, z0 + depth)
        slab_affine = dst_affine.copy()
        slab_affine[:3, 3] = dst_affine[:3, :3] @ np.array([0.0, 0.0, z0]) + dst_affine[:3, 3]
        slab = resample_to_grid(probs, src_affine_ras, slab_affine, (nx, ny, z1 - z0), mode="linear")
        labels[:, :, z0:z1] = torch.argmax(slab, dim=0).to(torch.uint8).cpu().numpy()
    return labels
