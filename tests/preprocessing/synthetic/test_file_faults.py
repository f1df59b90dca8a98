"""Each NIfTI / file-system write_bad_* helper really produces the fault it names."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.synthetic import (
    write_bad_4d_nifti,
    write_bad_nan_nifti,
    write_bad_oversized_nifti,
    write_bad_special_files,
    write_bad_truncated_nifti,
)


def test_nan_nifti(tmp_path: Path) -> None:
    full = nib.load(write_bad_nan_nifti(tmp_path / "nan.nii.gz")).get_fdata()
    assert np.isnan(full).all()
    part = nib.load(write_bad_nan_nifti(tmp_path / "part.nii.gz", fraction=0.25)).get_fdata()
    assert 0 < np.isnan(part).mean() < 0.5


def test_truncated_nifti(tmp_path: Path) -> None:
    path = write_bad_truncated_nifti(tmp_path / "cut.nii.gz")
    with pytest.raises((EOFError, OSError, ValueError)):
        nib.load(path).get_fdata()


def test_4d_and_oversized_nifti(tmp_path: Path) -> None:
    assert nib.load(write_bad_4d_nifti(tmp_path / "t.nii.gz", n_volumes=2)).shape[3] == 2
    path = write_bad_oversized_nifti(tmp_path / "big.nii")
    assert nib.load(path).shape == (2048, 2048, 1024) and path.stat().st_size < 4096


def test_special_files_are_fifos(tmp_path: Path) -> None:
    import stat

    assert all(stat.S_ISFIFO(os.lstat(p).st_mode) for p in write_bad_special_files(tmp_path))
