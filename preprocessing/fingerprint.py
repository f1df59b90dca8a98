"""Dataset fingerprint: what the planner (:mod:`preprocessing.plan`) needs to know about the data.

The fingerprint records per-case spacings and shapes (in RAS axis order, i.e. after the
``Orientationd("RAS")`` of the training chain) and foreground intensity statistics per channel,
as nnU-Net's dataset fingerprint does. Its hash ties a trained model to its data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import cast

import nibabel as nib
import numpy as np

from preprocessing.msd import MsdDataset, load_case_arrays


@dataclass(frozen=True)
class Fingerprint:
    """Facts about a training dataset; see module docstring. Spacings/shapes in RAS axis order."""

    spacings_mm: tuple[tuple[float, float, float], ...]
    shapes: tuple[tuple[int, int, int], ...]
    foreground: tuple[dict[str, float], ...]  # per channel: mean, std, p00_5, p99_5, min, max
    modalities: dict[int, str]
    labels: dict[int, str]
    dataset_name: str = ""

    def sha256(self) -> str:
        """Stable hash of the fingerprint (logged to MLflow to tie runs to their data)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def _ras_order(affine: np.ndarray) -> np.ndarray:
    """Index permutation taking voxel axes to RAS axis order (what ``Orientationd("RAS")`` does)."""
    ornt = nib.orientations.io_orientation(affine)
    order = np.empty(3, dtype=int)
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        order[int(world_axis)] = voxel_axis
    return order


def fingerprint_dataset(
    dataset: MsdDataset, *, foreground_samples_per_case: int = 10000, seed: int = 0
) -> Fingerprint:
    """Measure spacings, shapes and foreground intensities of every training case.

    Args:
        dataset: the validated training dataset.
        foreground_samples_per_case: foreground voxels sampled per case (``PlanConfig`` has the
            same field, which ``medseg train`` passes).
        seed: seed of the sample.

    Foreground intensities are a seeded sample of ``foreground_samples_per_case`` voxels under
    the label (> 0) per case, taken on the original grid (as nnU-Net does).
    """
    rng = np.random.default_rng(seed)
    spacings: list[tuple[float, float, float]] = []
    shapes: list[tuple[int, int, int]] = []
    samples: list[list[np.ndarray]] = [[] for _ in range(dataset.num_channels)]
    for case in dataset.cases:
        image, label, affine = load_case_arrays(case)
        order = _ras_order(affine)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        spacings.append(cast(tuple[float, float, float], tuple(float(spacing[i]) for i in order)))
        shapes.append(cast(tuple[int, int, int], tuple(int(label.shape[i]) for i in order)))
        fg = np.flatnonzero(label > 0)
        if fg.size:
            pick = rng.choice(fg, size=min(fg.size, foreground_samples_per_case), replace=False)
            for c in range(image.shape[0]):
                samples[c].append(image[c].reshape(-1)[pick])
    stats = [_intensity_stats(samples[c]) for c in range(dataset.num_channels)]
    return Fingerprint(
        tuple(spacings), tuple(shapes), tuple(stats), dataset.modalities, dataset.labels, dataset.name
    )


def _intensity_stats(samples: list[np.ndarray]) -> dict[str, float]:
    """mean, std, 0.5/99.5 percentiles, min and max of one channel's foreground samples."""
    values = np.concatenate(samples) if samples else np.zeros(1, np.float32)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p00_5": float(np.percentile(values, 0.5)),
        "p99_5": float(np.percentile(values, 99.5)),
        "min": float(values.min()),
        "max": float(values.max()),
    }
