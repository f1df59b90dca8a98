"""What the out-of-fold predictions give the bundle besides Dice: calibration voxels and QC reference.

Each fold's last pass over its validation cases with the best weights
(``validation.out_of_fold_dice``) hands every case to an :class:`OutOfFoldCollector`, which keeps a
seeded voxel subsample of the logits with their labels (saved in the fold folder as
:data:`CALIBRATION_SAMPLES`, so a resumed or separately trained fold contributes the same voxels)
and the case's uncertainty score. After all folds, :func:`calibrate_folds` fits the one
temperature on the pooled voxels and :func:`qc_reference_for` measures the training cases for the
QC flags (``pipeline.qc_reference``).

The out-of-fold uncertainty scores are those of one fold model, uncalibrated (``T = 1``, the
temperature is fitted only after all folds), on the plan grid: the best available stand-in for
the calibrated ensemble's scores at inference, which are measured on the source grid.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.calibration import calibrate, load_samples, sample_voxels, save_samples
from pipeline.inference.uncertainty import UncertaintyAccumulator, case_uncertainty
from pipeline.training.validation import ValidationCase
from preprocessing.msd import MsdCase
from preprocessing.volume_io import read_volume

logger = logging.getLogger(__name__)

#: Per fold folder: the sampled out-of-fold logits and labels (``pipeline.calibration.save_samples``).
CALIBRATION_SAMPLES = "calibration_samples.npz"


class OutOfFoldCollector:
    """The ``on_case`` hook of the out-of-fold pass (``validation.CaseHook``).

    Args:
        labels: foreground label value -> name.
        max_voxels: voxels sampled per case for the temperature fit (0: none).
        seed: the fold's seed; each case's draw is seeded by it and the case id.
    """

    def __init__(self, labels: Mapping[int, str], max_voxels: int, seed: int) -> None:
        self.labels = dict(labels)
        self.max_voxels = max_voxels
        self.seed = seed
        self.logits: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.uncertainty: dict[str, float] = {}

    def __call__(
        self, case: ValidationCase, logits: torch.Tensor, probabilities: torch.Tensor, prediction: np.ndarray
    ) -> None:
        if self.max_voxels > 0:
            seed = (self.seed * 1_000_003 + zlib.crc32(case.case_id.encode())) % 2**32
            x, y = sample_voxels(logits, case.label, self.max_voxels, seed)
            self.logits.append(x)
            self.targets.append(y)
        acc = UncertaintyAccumulator(int(probabilities.shape[0]))
        acc.add(probabilities)
        maps = acc.maps().permute(1, 2, 3, 0).cpu().numpy()
        self.uncertainty[case.case_id] = case_uncertainty(prediction, maps, self.labels).score

    def save(self, path: Path) -> str:
        """Write the sampled voxels to ``path`` (``""`` and nothing written when none were sampled)."""
        path.unlink(missing_ok=True)
        if not self.logits:
            return ""
        save_samples(path, np.concatenate(self.logits), np.concatenate(self.targets))
        return str(path)


def calibrate_folds(sample_paths: Sequence[str]) -> dict[str, Any]:
    """One temperature on the pooled out-of-fold voxels of the folds (``pipeline.calibration.calibrate``).

    Args:
        sample_paths: each fold's :data:`CALIBRATION_SAMPLES` file (``""`` for a fold without).

    Returns:
        The bundle's ``calibration`` dict; ``{}`` when no fold sampled any voxel.
    """
    pooled = [load_samples(p) for p in sample_paths if p and Path(p).is_file()]
    if not pooled:
        return {}
    return calibrate(np.concatenate([x for x, _ in pooled]), np.concatenate([y for _, y in pooled]))


def qc_reference_for(
    cases: Sequence[MsdCase], label_names: Mapping[int, str], uncertainty_scores: Sequence[float]
) -> dict[str, Any]:
    """The bundle's ``qc_reference``: the training cases measured on their source grid.

    Each case's channel-0 image and reference labels are read from their files (the grid
    inference measures predictions on), then ``pipeline.qc_reference.build_qc_reference`` pools
    them with the out-of-fold ``uncertainty_scores``. ``{}`` without cases.
    """
    from pipeline.qc_reference import build_qc_reference, measure_case

    measurements = []
    for case in cases:
        image = read_volume(case.image_paths[0])
        labels = np.rint(read_volume(case.label_path).array[0]).astype(np.int32)
        measurements.append(measure_case(image.array[0], labels, image.spacing_mm, label_names))
    if not measurements:
        return {}
    return build_qc_reference(measurements, list(uncertainty_scores)).to_json()
