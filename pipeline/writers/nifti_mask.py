"""``mask.nii.gz``: the label map as a uint8 NIfTI on the source image's grid."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np

from pipeline.writers.base import SegmentedCase
from preprocessing.atomic import atomic_path


class NiftiMaskWriter:
    """The mask of every case; a NIfTI source's own header geometry is copied (sform *and* qform)."""

    name = "mask"
    title = "mask"
    filename = "mask.nii.gz"
    optional = False
    flag = ""
    help = ""
    needs_probabilities = False
    needs_uncertainty = False
    fails_case = True

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        labels, item = case.segmentation.labels, case.item
        if item.kind == "nifti" and len(item.paths) == 1:
            return write_mask_like_source(labels, item.paths[0], path)
        # Imported here, like every heavy library of a writer (see pipeline.writers.base).
        from preprocessing.volume_io import write_nifti_atomic

        uint8 = np.dtype(np.uint8)
        return write_nifti_atomic(labels.astype(uint8, copy=False), case.volume.affine_ras, path, dtype=uint8)


def write_mask_like_source(labels: np.ndarray, source: Path, out_path: Path) -> Path:
    """Write a uint8 mask ``(X, Y, Z)`` whose header geometry is the source NIfTI's, sform *and* qform.

    Viewers differ in which of the two they trust when they disagree; copying both (with their
    codes) makes the mask overlay the image in every viewer, bit for bit.
    """
    import nibabel as nib

    src = cast(nib.Nifti1Image, nib.load(str(source)))
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    img = nib.Nifti1Image(labels.astype(np.uint8), None, header=header)
    img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return Path(out_path)
