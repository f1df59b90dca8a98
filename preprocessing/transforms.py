"""MONAI transform chains for training and validation, and the matching inference preprocessing.

Training chain (dictionary transforms on ``{"image": [paths], "label": path}``)::

    LoadImaged -> EnsureChannelFirstd -> ResampleToPlanGrid (RAS-aligned, plan spacing)
    -> CropForegroundd(non-zero) -> NormalizePerPlan -> SpatialPadd(patch)   [deterministic, cached]
    -> RandCropByPosNegLabeld -> RandAffined [-> Rand3DElasticd] -> intensity augmentation -> RandFlipd

MONAI's ``CacheDataset``/``PersistentDataset`` cache everything up to the first random transform,
so the deterministic part runs once per case, not once per epoch.

Inference does not use MONAI's loaders: :func:`preprocess_for_inference` takes a :class:`Volume`
(from any reader of the project). Both paths resample with the one resampler,
``preprocessing.resample`` (``target_grid`` + ``resample_to_grid``), so a case lands on the same
network grid in training, validation and inference, and both call the *same*
:func:`normalize_intensity`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    SpatialPadd,
)

from preprocessing.image import Volume
from preprocessing.plan import ChannelNormalization, Plan
from preprocessing.resample import resample_to_grid, target_grid

KEYS = ("image", "label")


@dataclass(frozen=True)
class AugmentConfig:
    """Data augmentation settings (nnU-Net-like defaults, probabilities per sample).

    Attributes:
        enabled: ``False`` turns every random transform except the patch crop off.
        foreground_fraction: fraction of patches centred on foreground (nnU-Net: 0.33).
        rotation_deg: maximum rotation about each axis; ``scale`` maximum relative zoom.
        affine_prob / elastic_prob: probabilities of RandAffined / Rand3DElasticd (0 = off).
        mirror: random flips along every axis (p = 0.5 each).
        gamma_prob, noise_prob, smooth_prob, scale_intensity_prob: intensity augmentation.
    """

    enabled: bool = True
    foreground_fraction: float = 0.33
    rotation_deg: float = 30.0
    scale: float = 0.3
    affine_prob: float = 0.2
    elastic_prob: float = 0.0
    mirror: bool = True
    gamma_prob: float = 0.3
    noise_prob: float = 0.1
    smooth_prob: float = 0.2
    scale_intensity_prob: float = 0.15


def normalize_intensity(image: torch.Tensor, normalization: tuple[ChannelNormalization, ...]) -> torch.Tensor:
    """Normalise each channel of ``image`` as the plan says. The one normalisation of the project.

    Args:
        image: ``(C, X, Y, Z)`` float tensor (CT in HU), any device.
        normalization: one entry per channel (``Plan.normalization``).

    Returns:
        ``(C, X, Y, Z)`` float32 tensor. ``"ct"``: clipped to the foreground percentiles, then
        z-scored with the dataset foreground mean/std. ``"zscore"``: z-scored with the mean/std of
        the image's non-zero voxels (all voxels when none is zero) -- statistics over the non-zero
        region do not change when zero borders are cropped away, so training (cropped) and
        inference (uncropped) normalise identically.
    """
    if image.shape[0] != len(normalization):
        raise ValueError(f"image has {image.shape[0]} channels but the plan normalises {len(normalization)}")
    out = torch.empty_like(image, dtype=torch.float32)
    for c, norm in enumerate(normalization):
        x = image[c].to(torch.float32)
        if norm.scheme == "ct":
            out[c] = (x.clamp(norm.clip_low, norm.clip_high) - norm.mean) / norm.std
        elif norm.scheme == "zscore":
            nonzero = x[x != 0]
            values = nonzero if nonzero.numel() > 1 else x.reshape(-1)
            out[c] = (x - values.mean()) / values.std().clamp_min(1e-8)
        elif norm.scheme == "none":
            out[c] = x
        else:
            raise ValueError(f"unknown normalisation scheme {norm.scheme!r}")
    return out


class ResampleToPlanGrid(MapTransform):
    r"""Resample a case onto its network grid with ``preprocessing.resample`` (the one resampler).

    The grid is ``target_grid(affine, shape, spacing_mm)`` of the first key (the image): RAS-aligned,
    the plan spacing, covering the image's field of view -- the grid :func:`preprocess_for_inference`
    gives the same case. Every key is resampled onto it from its own affine, with its own mode
    (``"linear"`` for the image, ``"nearest"`` for the label; edge voxels extend outwards). Used
    instead of MONAI ``Orientationd`` + ``Spacingd`` so that training has no second resampler whose
    grid and interpolation could drift from inference's.

    Inputs and outputs are ``MetaTensor``\ s ``(C, X, Y, Z)``; the output's ``affine`` is the new grid's,
    the other metadata (file name, original affine) is kept, so later crops, pads and the QC picture see
    a consistent geometry. The resample itself is not recorded for MONAI's ``Invertd`` (nothing inverts
    the training chain: predictions go back with ``resample_to_grid`` and the source's affine).
    """

    def __init__(
        self, keys: tuple[str, ...], spacing_mm: tuple[float, float, float], modes: tuple[str, ...]
    ) -> None:
        super().__init__(keys)
        if len(modes) != len(self.keys):
            raise ValueError(f"one mode per key: keys {self.keys}, modes {modes}")
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.modes = dict(zip(self.keys, modes, strict=True))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d[self.keys[0]]
        grid, shape = target_grid(_affine_of(reference), reference.shape[1:], self.spacing_mm)
        for key in self.key_iterator(d):
            d[key] = self._resample(d[key], grid, shape, self.modes[key])
        return d

    @staticmethod
    def _resample(image: Any, grid: np.ndarray, shape: tuple[int, int, int], mode: str) -> MetaTensor:
        affine = _affine_of(image)
        values = resample_to_grid(image.as_tensor().to(torch.float32), affine, grid, shape, mode=mode)
        meta = {k: v for k, v in image.meta.items() if k != "affine"}  # the new grid replaces it
        return MetaTensor(values, affine=torch.as_tensor(grid, dtype=torch.float64), meta=meta)


def _affine_of(image: Any) -> np.ndarray:
    """Voxel->RAS mm affine of a loaded image (MONAI keeps it in ``MetaTensor.affine``)."""
    if not isinstance(image, MetaTensor):
        raise TypeError(
            "ResampleToPlanGrid needs MetaTensors with an affine (load the images with LoadImaged)"
        )
    return np.asarray(image.affine, dtype=np.float64)


class NormalizePerPlan(MapTransform):
    """Dictionary wrapper of :func:`normalize_intensity`: each channel as ``Plan.normalization`` says
    (keeps MetaTensor metadata)."""

    def __init__(self, keys: str, normalization: tuple[ChannelNormalization, ...]) -> None:
        super().__init__(keys)
        self.normalization = normalization

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            normalized = normalize_intensity(torch.as_tensor(image), self.normalization)
            if hasattr(image, "copy_meta_from"):
                # MetaTensor: write in place of a copy so affine and applied-operation history survive.
                result = image.clone().to(torch.float32)
                result.data.copy_(normalized)
                normalized = result
            d[key] = normalized
        return d


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: any non-zero voxel (a module function so transforms pickle)."""
    return x != 0


def deterministic_transforms(plan: Plan) -> list:
    """Load -> channel first -> network grid (RAS, plan spacing) -> crop zero borders -> normalise -> pad."""
    return [
        LoadImaged(keys=KEYS, reader="NibabelReader", image_only=True),  # MSD is NIfTI: skip reader probing
        EnsureChannelFirstd(keys=KEYS),
        ResampleToPlanGrid(KEYS, plan.spacing_mm, modes=("linear", "nearest")),
        CropForegroundd(keys=KEYS, source_key="image", select_fn=_nonzero, allow_smaller=True),
        NormalizePerPlan("image", plan.normalization),
        SpatialPadd(keys=KEYS, spatial_size=plan.patch_size),
        EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=True),
    ]


def random_transforms(plan: Plan, augment: AugmentConfig, samples_per_volume: int) -> list:
    """Foreground-oversampled patch crop plus spatial and intensity augmentation."""
    fg = min(max(augment.foreground_fraction, 0.0), 1.0)
    chain: list = [
        RandCropByPosNegLabeld(
            keys=KEYS,
            label_key="label",
            spatial_size=plan.patch_size,
            pos=fg,
            neg=1.0 - fg,
            num_samples=samples_per_volume,
        )
    ]
    if not augment.enabled:
        return chain
    rot = math.radians(augment.rotation_deg)
    if augment.affine_prob > 0:
        chain.append(
            RandAffined(
                keys=KEYS,
                prob=augment.affine_prob,
                rotate_range=(rot, rot, rot),
                scale_range=(augment.scale,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                spatial_size=plan.patch_size,
            )
        )
    if augment.elastic_prob > 0:
        chain.append(
            Rand3DElasticd(
                keys=KEYS,
                sigma_range=(5, 8),
                magnitude_range=(50, 150),
                prob=augment.elastic_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                spatial_size=plan.patch_size,
            )
        )
    chain += [
        RandGaussianNoised(keys="image", prob=augment.noise_prob, std=0.1),
        RandGaussianSmoothd(
            keys="image", prob=augment.smooth_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
        ),
        RandScaleIntensityd(keys="image", prob=augment.scale_intensity_prob, factors=0.25),
        RandAdjustContrastd(keys="image", prob=augment.gamma_prob, gamma=(0.7, 1.5), retain_stats=True),
    ]
    if augment.mirror:
        chain += [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)]
    return chain


def train_transforms(
    plan: Plan, augment: AugmentConfig = AugmentConfig(), samples_per_volume: int = 2
) -> Compose:
    """Full training chain; each call yields ``samples_per_volume`` patch dicts per case."""
    return Compose(deterministic_transforms(plan) + random_transforms(plan, augment, samples_per_volume))


def val_transforms(plan: Plan) -> Compose:
    """Deterministic chain for validation volumes (whole preprocessed volumes, no patches)."""
    return Compose(deterministic_transforms(plan))


def case_to_item(image_paths: tuple, label_path: object) -> dict[str, Any]:
    """The dict the chains expect: ``image`` one path or a channel list (stacked by LoadImaged)."""
    paths = [str(p) for p in image_paths]
    return {"image": paths[0] if len(paths) == 1 else paths, "label": str(label_path)}


def preprocess_for_inference(
    volume: Volume, plan: Plan, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, np.ndarray]:
    """Resample ``volume`` to the plan spacing on a RAS-aligned grid and normalise it as training does.

    Args:
        volume: ``(C, X, Y, Z)`` image with its RAS affine; any orientation, any spacing.
        plan: the training plan (spacing and per-channel normalisation).
        device: where to resample and normalise; on "cuda" the source volume is copied to the GPU
            once and both steps run there (the returned tensor stays on that device).

    Returns:
        ``(tensor float32 (C, X', Y', Z'), affine_ras 4x4)`` -- the network-input grid; map results
        back with ``resample_to_grid(..., dst_affine_ras=volume.affine_ras, dst_shape=volume.spatial_shape)``.
    """
    dst_affine, dst_shape = target_grid(volume.affine_ras, volume.spatial_shape, plan.spacing_mm)
    data = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)).to(device)
    resampled = resample_to_grid(data, volume.affine_ras, dst_affine, dst_shape, mode="linear")
    return normalize_intensity(resampled, plan.normalization), np.asarray(dst_affine, dtype=np.float64)
