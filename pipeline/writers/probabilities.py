"""``probabilities.nii.gz``: the ensemble's class probabilities on the source grid (optional)."""

from __future__ import annotations

from pathlib import Path

from pipeline.writers.base import SegmentedCase


class ProbabilitiesWriter:
    """``float32 (X, Y, Z, K)`` probabilities (NIfTI has no float16), resampled slab by slab."""

    name = "probabilities"
    title = "probabilities"
    filename = "probabilities.nii.gz"
    optional = True
    flag = "--save-probabilities"
    help = "also write probabilities.nii.gz"
    needs_probabilities = True
    needs_uncertainty = False
    fails_case = True

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        from preprocessing.volume_io import write_nifti_atomic  # heavy: see pipeline.writers.base

        return write_nifti_atomic(
            case.segmentation.probabilities_on_source_grid(), case.volume.affine_ras, path
        )
