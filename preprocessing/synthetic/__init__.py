"""Seeded synthetic data for tests and ``medseg demo``: phantoms, NIfTI, MSD datasets, DICOM series.

This package's ``__init__`` is its one import surface: tests, benchmarks and ``medseg demo``
import ``from preprocessing.synthetic import ...`` only (a test checks that nothing outside this
package imports its modules, and that every ``write_*`` generator is exported here). The
implementation is split by output type:

- :mod:`preprocessing.synthetic.phantom`: anatomy and grid affines,
- :mod:`preprocessing.synthetic.nifti`: NIfTI files and MSD datasets,
- :mod:`preprocessing.synthetic.dicom`: single-frame DICOM series,
- :mod:`preprocessing.synthetic.enhanced`: Enhanced CT/MR multi-frame files, a Basic Text SR,
- :mod:`preprocessing.synthetic.folders`: a messy hospital export folder with ground truth,
- :mod:`preprocessing.synthetic.dicom_faults`: broken DICOM series (``write_bad_*``) for ingestion tests,
- :mod:`preprocessing.synthetic.file_faults`: broken NIfTI files and file-system traps.
"""

from __future__ import annotations

from preprocessing.synthetic.dicom import DicomSeriesSpec, stored_values, write_dicom_series
from preprocessing.synthetic.dicom_faults import (
    EVIL_TEXT,
    write_bad_duplicate_instance,
    write_bad_gantry_tilt,
    write_bad_gap_series,
    write_bad_localizer_in_series,
    write_bad_mismatched_size,
    write_bad_palette_color,
    write_bad_path_traversal,
    write_bad_shared_series_uid,
    write_bad_single_slice,
    write_bad_slice_attribute,
    write_bad_truncated_header,
    write_bad_truncated_pixels,
)
from preprocessing.synthetic.enhanced import write_enhanced_dicom, write_text_sr
from preprocessing.synthetic.file_faults import (
    write_bad_4d_nifti,
    write_bad_nan_nifti,
    write_bad_oversized_nifti,
    write_bad_special_files,
    write_bad_symlinks,
    write_bad_truncated_nifti,
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
    "make_phantom",
    "orientation_affine",
    "stored_values",
    "write_bad_4d_nifti",
    "write_bad_duplicate_instance",
    "write_bad_gantry_tilt",
    "write_bad_gap_series",
    "write_bad_localizer_in_series",
    "write_bad_mismatched_size",
    "write_bad_nan_nifti",
    "write_bad_oversized_nifti",
    "write_bad_palette_color",
    "write_bad_path_traversal",
    "write_bad_shared_series_uid",
    "write_bad_single_slice",
    "write_bad_slice_attribute",
    "write_bad_special_files",
    "write_bad_symlinks",
    "write_bad_truncated_header",
    "write_bad_truncated_nifti",
    "write_bad_truncated_pixels",
    "write_dicom_series",
    "write_enhanced_dicom",
    "write_hospital_folder",
    "write_msd_dataset",
    "write_nifti",
    "write_text_sr",
]
