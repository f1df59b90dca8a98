"""Seeded synthetic data for tests and ``medseg demo``: phantoms, NIfTI, MSD datasets, DICOM series.

Import the generator from here; the implementation is split by output type:

- :mod:`preprocessing.synthetic.phantom`: anatomy and grid affines,
- :mod:`preprocessing.synthetic.nifti`: NIfTI files and MSD datasets,
- :mod:`preprocessing.synthetic.dicom`: single-frame DICOM series,
- :mod:`preprocessing.synthetic.enhanced`: Enhanced CT/MR multi-frame files, a Basic Text SR,
- :mod:`preprocessing.synthetic.folders`: a messy hospital export folder with ground truth,
- :mod:`preprocessing.synthetic.faults`: broken inputs (``write_bad_*``) for ingestion tests.
"""

from __future__ import annotations

from preprocessing.synthetic.dicom import DicomSeriesSpec, write_dicom_series
from preprocessing.synthetic.enhanced import write_enhanced_dicom, write_text_sr
from preprocessing.synthetic.faults import (
    EVIL_TEXT,
    write_bad_duplicate_instance,
    write_bad_gantry_tilt,
    write_bad_gap_series,
    write_bad_localizer_in_series,
    write_bad_mismatched_size,
    write_bad_nan_nifti,
    write_bad_path_traversal,
    write_bad_truncated_nifti,
    write_bad_truncated_pixels,
)
from preprocessing.synthetic.folders import DEFAULT_PATIENTS, SeriesTruth, write_hospital_folder
from preprocessing.synthetic.nifti import write_msd_dataset, write_nifti
from preprocessing.synthetic.phantom import LABEL_NAMES, make_phantom, orientation_affine

__all__ = [
    "DEFAULT_PATIENTS",
    "EVIL_TEXT",
    "LABEL_NAMES",
    "DicomSeriesSpec",
    "SeriesTruth",
    "write_bad_duplicate_instance",
    "write_bad_gantry_tilt",
    "write_bad_gap_series",
    "write_bad_localizer_in_series",
    "write_bad_mismatched_size",
    "write_bad_nan_nifti",
    "write_bad_path_traversal",
    "write_bad_truncated_nifti",
    "write_bad_truncated_pixels",
    "write_enhanced_dicom",
    "write_hospital_folder",
    "write_text_sr",
    "make_phantom",
    "orientation_affine",
    "write_dicom_series",
    "write_msd_dataset",
    "write_nifti",
]
