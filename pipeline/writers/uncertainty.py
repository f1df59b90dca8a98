"""``uncertainty.nii.gz``: the ensemble's voxel-wise uncertainty on the source grid (optional)."""

from __future__ import annotations

from pathlib import Path

from pipeline.writers.base import SegmentedCase


class UncertaintyWriter:
    """``float32 (X, Y, Z, 3)`` uncertainty maps in nats, resampled slab by slab.

    Channels (last axis): 0 total uncertainty (entropy of the ensemble mean), 1 expected entropy
    (mean of the members' entropies), 2 mutual information (0 - 1: the members' disagreement).
    Members are folds x TTA mirrorings (``--tta``: 8 per fold). Same affine and header
    handling as ``probabilities.nii.gz``.
    """

    name = "uncertainty"
    title = "uncertainty maps"
    filename = "uncertainty.nii.gz"
    optional = True
    flag = "--uncertainty"
    help = (
        "also write uncertainty.nii.gz (X,Y,Z,3: total entropy, expected entropy, mutual "
        "information, over folds x TTA members) and the uncertainty columns of cases.csv"
    )
    needs_probabilities = False
    needs_uncertainty = True
    fails_case = True

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        from preprocessing.volume_io import write_nifti_atomic  # heavy: see pipeline.writers.base

        return write_nifti_atomic(case.segmentation.uncertainty_on_source_grid(), case.volume.affine_ras, path)
