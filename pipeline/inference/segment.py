"""Segment one volume with a fold ensemble: :class:`Segmenter` ``(volume) -> Segmentation``.

plan preprocessing (RAS grid at plan spacing, normalisation) -> ``predict_probabilities`` on
that network grid -> argmax of the probabilities linearly resampled back onto the source grid
(slab by slab) -> largest connected component for the labels whose decision is on
(``pipeline.inference.postprocessing``). Resampling probabilities rather than labels keeps thin
structures and sub-voxel boundaries (see GEOMETRY.md).

The probabilities stay on the network grid in the result: writers that want them on the source
grid resample them slab by slab (:meth:`Segmentation.probabilities_on_source_grid`), so no
caller ever holds K full-resolution channels twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.inference.config import InferenceConfig
from pipeline.inference.member_output import MemberOutput
from pipeline.inference.postprocessing import keep_largest_component, largest_component_values
from pipeline.inference.sliding_window import predict_probabilities
from pipeline.inference.uncertainty import UncertaintyAccumulator
from preprocessing.image import Volume
from preprocessing.plan import Plan
from preprocessing.resample import resample_to_grid
from preprocessing.transforms import preprocess_for_inference

#: Destination voxels per slab when resampling probabilities back to the source grid.
SLAB_VOXELS = 2**24


class NonFiniteProbabilitiesError(ValueError):
    """The ensemble's probabilities for an image contain NaN or infinity (a broken model)."""


@dataclass(frozen=True)
class Segmentation:
    """What a :class:`Segmenter` made of one volume.

    Attributes:
        labels: ``uint8 (X, Y, Z)`` label map on the source volume's grid (post-processed).
        affine_ras: the source grid's voxel -> RAS mm affine (that of ``labels``).
        probabilities: ``float32 (K, X', Y', Z')`` ensemble-mean class probabilities on the
            *network* grid (CPU), or None when not asked for.
        network_affine_ras: voxel -> RAS mm affine of the network grid.
        uncertainty: ``float32 (3, X', Y', Z')`` ensemble uncertainty on the network grid (CPU):
            total (entropy of the mean), expected entropy, mutual information, in nats
            (:mod:`pipeline.inference.uncertainty`), or None when not asked for.
    """

    labels: np.ndarray
    affine_ras: np.ndarray
    probabilities: torch.Tensor | None = None
    network_affine_ras: np.ndarray | None = None
    uncertainty: torch.Tensor | None = None

    def probabilities_on_source_grid(self, slab_voxels: int = SLAB_VOXELS) -> np.ndarray:
        """``float32 (X, Y, Z, K)`` probabilities linearly resampled onto the source grid.

        Filled slab by slab into one preallocated array (the NIfTI layout, channels last), so the
        peak is that array plus one slab of K channels.

        Raises:
            ValueError: the segmentation was made without probabilities.
        """
        if self.probabilities is None or self.network_affine_ras is None:
            raise ValueError("this Segmentation holds no probabilities (segment with keep_probabilities=True)")
        return self._on_source_grid(self.probabilities, slab_voxels)

    def uncertainty_on_source_grid(self, slab_voxels: int = SLAB_VOXELS) -> np.ndarray:
        """``float32 (X, Y, Z, 3)`` uncertainty maps linearly resampled onto the source grid.

        Channels last as :data:`pipeline.inference.uncertainty.UNCERTAINTY_CHANNELS`: total,
        expected entropy, mutual information (nats); filled slab by slab like the probabilities.

        Raises:
            ValueError: the segmentation was made without uncertainty.
        """
        if self.uncertainty is None or self.network_affine_ras is None:
            raise ValueError("this Segmentation holds no uncertainty (segment with uncertainty=True)")
        return self._on_source_grid(self.uncertainty, slab_voxels)

    def _on_source_grid(self, maps: torch.Tensor, slab_voxels: int) -> np.ndarray:
        assert self.network_affine_ras is not None
        shape = tuple(int(v) for v in self.labels.shape)
        out = np.empty((*shape, int(maps.shape[0])), dtype=np.float32)
        for z0, z1, slab_affine in _slabs(self.affine_ras, shape, slab_voxels):
            slab = resample_to_grid(
                maps, self.network_affine_ras, slab_affine, (shape[0], shape[1], z1 - z0), mode="linear"
            )
            out[:, :, z0:z1, :] = np.moveaxis(slab.float().cpu().numpy(), 0, -1)
        return out


class Segmenter:
    """A fold ensemble ready to segment volumes on their own grid.

    Args:
        plan: the model's plan (target spacing, normalisation, labels).
        networks: the fold networks (``bundle.build_networks(device)``); their probabilities are
            averaged.
        postprocessing: the bundle's normalised ``postprocessing`` entry.
        config: sliding-window settings (``inference_config_for(plan, ...)``).
    """

    def __init__(
        self,
        plan: Plan,
        networks: Sequence[nn.Module],
        postprocessing: Mapping[str, Any],
        config: InferenceConfig,
    ) -> None:
        if not networks:
            raise ValueError("a Segmenter needs at least one network")
        self.plan, self.networks, self.config = plan, list(networks), config
        foreground = {k: v for k, v in plan.labels.items() if k != 0}
        self.largest_component_labels = largest_component_values(postprocessing, foreground)

    def __call__(
        self,
        volume: Volume,
        *,
        keep_probabilities: bool = False,
        on_member: Callable[[MemberOutput], None] | None = None,
        uncertainty: bool = False,
    ) -> Segmentation:
        """Segment ``volume`` (``(C, X, Y, Z)``, any orientation and spacing).

        Args:
            volume: the image with its RAS affine.
            keep_probabilities: also return the ensemble probabilities (network grid, CPU).
            on_member: called once per ensemble member (folds x TTA mirrors, fold-major) with
                its probabilities on the network grid (:class:`MemberOutput`), handed out one at
                a time (per-member accumulators such as an ensemble variance stay the caller's
                few tensors); labels and probabilities are still the members' mean, equal to
                the plain ensemble to float tolerance.
            uncertainty: also return the ensemble uncertainty maps (network grid, CPU), streamed
                over the members (an internal ``on_member`` hook; a caller's hook runs too).

        Raises:
            NonFiniteProbabilitiesError: the model produced NaN or infinity.
        """
        image, net_affine = preprocess_for_inference(volume, self.plan, device=self.config.device)
        accumulator = UncertaintyAccumulator(len(self.plan.labels)) if uncertainty else None
        hook = _with_accumulator(on_member, accumulator) if accumulator is not None else on_member
        probs = predict_probabilities(image, self.networks, self.config, on_member=hook)
        if not bool(torch.isfinite(probs).all()):  # argmax of NaN is background: never an "ok" mask
            raise NonFiniteProbabilitiesError(
                f"the model's probabilities for {volume.case_id or 'this image'} contain NaN or infinity "
                "(non-finite weights, or an overflow in the network); no mask is written. Use another "
                "model version, or retrain this one"
            )
        labels = resample_argmax(probs, net_affine, volume.affine_ras, volume.spatial_shape)
        if self.largest_component_labels:  # only the labels whose decision (bundle.json) is on
            labels = keep_largest_component(labels, self.largest_component_labels)
        return Segmentation(
            labels=labels,
            affine_ras=np.asarray(volume.affine_ras, dtype=np.float64),
            probabilities=probs.float().cpu() if keep_probabilities else None,
            network_affine_ras=np.asarray(net_affine, dtype=np.float64),
            uncertainty=accumulator.maps().cpu() if accumulator is not None else None,
        )


def _with_accumulator(
    on_member: Callable[[MemberOutput], None] | None, accumulator: UncertaintyAccumulator
) -> Callable[[MemberOutput], None]:
    """A member hook that feeds ``accumulator`` and then calls the caller's hook, if any."""

    def hook(member: MemberOutput) -> None:
        accumulator.add(member.probabilities)
        if on_member is not None:
            on_member(member)

    return hook


def resample_argmax(
    probs: torch.Tensor,
    src_affine_ras: np.ndarray,
    dst_affine_ras: np.ndarray,
    dst_shape: tuple[int, int, int],
    slab_voxels: int = SLAB_VOXELS,
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
    nx, ny, nz = (int(v) for v in dst_shape)
    labels = np.empty((nx, ny, nz), dtype=np.uint8)
    for z0, z1, slab_affine in _slabs(dst_affine_ras, (nx, ny, nz), slab_voxels):
        slab = resample_to_grid(probs, src_affine_ras, slab_affine, (nx, ny, z1 - z0), mode="linear")
        labels[:, :, z0:z1] = torch.argmax(slab, dim=0).to(torch.uint8).cpu().numpy()
    return labels


def _slabs(dst_affine_ras: np.ndarray, shape: Sequence[int], slab_voxels: int):  # noqa: ANN202 - a generator
    """``(z0, z1, affine of the slab z0:z1)`` over the destination's last axis."""
    dst_affine = np.asarray(dst_affine_ras, dtype=np.float64)
    nx, ny, nz = (int(v) for v in shape)
    depth = max(1, min(nz, slab_voxels // max(1, nx * ny)))
    for z0 in range(0, nz, depth):
        slab_affine = dst_affine.copy()
        slab_affine[:3, 3] = dst_affine[:3, :3] @ np.array([0.0, 0.0, z0]) + dst_affine[:3, 3]
        yield z0, min(nz, z0 + depth), slab_affine
