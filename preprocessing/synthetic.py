"""Seeded synthetic data for tests and ``medseg demo``: phantoms, NIfTI, MSD datasets, DICOM series.

Import the generator from here; the implementation is split by output type:

- :mod:`preprocessing.synthetic_phantom`: anatomy and grid affines,
- :mod:`preprocessing.synthetic_nifti`: NIfTI files and MSD datasets,
- :mod:`preprocessing.synthetic_dicom`: single-frame DICOM series,
"""

from __future__ import annotations

from preprocessing.synthetic_dicom import DicomSeriesSpec, write_dicom_series
from preprocessing.synthetic_nifti import write_msd_dataset, write_nifti
from preprocessing.synthetic_phantom import LABEL_NAMES, make_phantom, orientation_affine

__all__ = [
    "LABEL_NAMES",
    "DicomSeriesSpec",
    "make_phantom",
    "orientation_affine",
    "write_dicom_series",
    "write_msd_dataset",
    "write_nifti",
]
