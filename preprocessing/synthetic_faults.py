"""Deliberately broken inputs for ingestion tests: each ``write_bad_*`` writes one fault.

Every DICOM fault starts from a small valid CT axial series (seeded phantom, ``shape`` default
``(32, 32, 12)``, 0.8 x 1.1 x 2.5 mm) written with ordered names ``slice_000.dcm``..., then
damages it. Each function returns the paths it wrote (all files of the series folder, or the one
NIfTI file). The docstrings say what a careful reader should decide.

Public: ``write_bad_gap_series``, ``write_bad_duplicate_instance``, ``write_bad_localizer_in_series``,
``write_bad_mismatched_size``, ``write_bad_truncated_pixels``, ``write_bad_gantry_tilt``,
``write_bad_path_traversal``, ``write_bad_nan_nifti``, ``write_bad_truncated_nifti``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from preprocessing.synthetic_dicom import (
    DicomSeriesSpec,
    format_decimal_string,
    save_dataset,
    write_dicom_series,
)
from preprocessing.synthetic_nifti import write_nifti
from preprocessing.synthetic_phantom import make_phantom, orientation_affine

_SHAPE = (32, 32, 12)
_SPACING = (0.8, 1.1, 2.5)
EVIL_TEXT = "../../etc/evil"
"""Header value with path-traversal characters used by :func:`write_bad_path_traversal`."""


def _good_series(
    out_dir: str | Path, seed: int, spec: DicomSeriesSpec | None, shape: tuple[int, int, int]
) -> tuple[list[Path], DicomSeriesSpec]:
    spec = spec or DicomSeriesSpec(seed=seed, series_description="SYNTH FAULT")
    affine = orientation_affine("axial", _SPACING, shape=shape)
    image, _ = make_phantom(shape, modality=spec.modality, seed=seed, affine_ras=affine)
    return write_dicom_series(image, affine, out_dir, spec), spec


def write_bad_gap_series(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A series with one interior slice missing (IPP step doubles once): gap -> refuse or flag.

    Returns the remaining files (slice ``shape[2] // 2`` is deleted).
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    missing = paths.pop(shape[2] // 2)
    missing.unlink()
    return paths


def write_bad_duplicate_instance(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A series plus a byte-identical copy of one slice under another name (repeated SOPInstanceUID).

    A reader should drop the duplicate (same SOPInstanceUID) rather than stack it twice.
    Returns all files, the copy last.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    copy = paths[0].with_name("copy_of_slice_003")
    shutil.copyfile(paths[3], copy)
    return [*paths, copy]


def write_bad_localizer_in_series(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A series plus a sagittal "localizer" slice with the *same* SeriesInstanceUID (two IOPs).

    A reader should split by orientation (keep the axial stack) or refuse with a reason; never
    stack the localizer. Returns all files, the localizer last.
    """
    paths, spec = _good_series(out_dir, seed, spec, shape)
    affine = orientation_affine("sagittal", (1.5, 1.5, 1.0), shape=(shape[0], shape[1], 1))
    image, _ = make_phantom((shape[0], shape[1], 1), seed=seed, affine_ras=affine)
    loc_dir = Path(out_dir) / ".localizer_tmp"
    loc_spec = replace(spec, series_description="LOCALIZER", shuffle_names=False)
    (loc_path,) = write_dicom_series(image, affine, loc_dir, loc_spec)
    ds = pydicom.dcmread(loc_path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(spec.instance_uid(10_000))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = shape[2] + 1
    final = save_dataset(ds, Path(out_dir) / "localizer")
    shutil.rmtree(loc_dir)
    return [*paths, final]


def write_bad_mismatched_size(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A series where one slice has 4 fewer Columns than the others (cropped pixel data).

    A reader should refuse the series (or that slice) with a reason. Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    ds = pydicom.dcmread(paths[shape[2] // 3])
    cropped = ds.pixel_array[:, :-4].copy()
    ds.Columns = cropped.shape[1]
    ds.PixelData = cropped.tobytes()
    save_dataset(ds, paths[shape[2] // 3])
    return paths


def write_bad_truncated_pixels(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A series where the last half of one file's bytes is cut off (truncated Pixel Data).

    Headers still parse (``stop_before_pixels``) but decoding fails. Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    victim = paths[shape[2] // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - (shape[0] * shape[1])])
    return paths


def write_bad_gantry_tilt(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
    tilt_deg: float = 15.0,
) -> list[Path]:
    """An axial series whose IPP steps are not parallel to the slice normal (gantry tilt / shear).

    Each slice k is moved ``k * step * tan(tilt)`` mm along the column direction (posterior)
    while IOP stays axial. A reader must resample to an orthogonal grid or refuse; never write it
    with an orthogonal affine. Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    shift_per_slice = _SPACING[2] * np.tan(np.deg2rad(tilt_deg))
    for k, path in enumerate(paths):  # write_dicom_series returns files in slice order k
        ds = pydicom.dcmread(path)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[1] += k * shift_per_slice
        ds.ImagePositionPatient = [format_decimal_string(v) for v in ipp]
        ds.GantryDetectorTilt = format_decimal_string(tilt_deg)
        save_dataset(ds, path)
    return paths


def write_bad_path_traversal(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = _SHAPE,
) -> list[Path]:
    """A valid series whose PatientID, PatientName, SeriesDescription and StudyDescription are
    ``"../../etc/evil"`` (:data:`EVIL_TEXT`). Any output path built from them must be sanitised.
    Returns all files."""
    base = spec or DicomSeriesSpec(seed=seed)
    evil = replace(
        base,
        patient_id=EVIL_TEXT,
        patient_name=EVIL_TEXT,
        series_description=EVIL_TEXT,
        series_uid=None,
        extra={**base.extra, "StudyDescription": EVIL_TEXT},
    )
    paths, _ = _good_series(out_dir, seed, evil, shape)
    return paths


def write_bad_nan_nifti(
    path: str | Path, seed: int = 0, *, fraction: float = 1.0, shape: tuple[int, int, int] = _SHAPE
) -> Path:
    """A float32 NIfTI whose first ``fraction`` of slices (all by default) are NaN.

    A reader should refuse it (or report non-finite voxels); never feed NaN to a network.
    """
    affine = orientation_affine("axial", _SPACING, shape=shape)
    image, _ = make_phantom(shape, seed=seed, affine_ras=affine)
    n_bad = max(1, int(round(fraction * shape[2])))
    image[:, :, :n_bad] = np.nan
    return write_nifti(image, affine, path)


def write_bad_truncated_nifti(
    path: str | Path, seed: int = 0, *, shape: tuple[int, int, int] = _SHAPE
) -> Path:
    """A ``.nii.gz`` cut to half its bytes (corrupt gzip stream): the header may load, data does not."""
    path = Path(path)
    affine = orientation_affine("axial", _SPACING, shape=shape)
    image, _ = make_phantom(shape, seed=seed, affine_ras=affine)
    write_nifti(image, affine, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
