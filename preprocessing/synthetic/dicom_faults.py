"""Deliberately broken DICOM series for ingestion tests: each ``write_bad_*`` writes one fault.

Every fault starts from a small valid CT axial series (seeded phantom, ``shape`` default
:data:`FAULT_SHAPE`, :data:`FAULT_SPACING_MM`) written with ordered names ``slice_000.dcm``...,
then damages it. Each function returns the paths it wrote (all files of the series folder). The
docstrings say what a careful reader should decide. Broken NIfTI files and file-system traps are
in :mod:`preprocessing.synthetic.file_faults`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from preprocessing.synthetic.dicom import (
    DicomSeriesSpec,
    format_decimal_string,
    save_dataset,
    write_dicom_series,
)
from preprocessing.synthetic.phantom import make_phantom, orientation_affine

#: ``(X, Y, Z)`` voxels of every fault's grid, and its spacing (anisotropic: axes can't be confused).
FAULT_SHAPE = (32, 32, 12)
FAULT_SPACING_MM = (0.8, 1.1, 2.5)
EVIL_TEXT = "../../etc/evil"
"""Header value with path-traversal characters used by :func:`write_bad_path_traversal`."""


def _good_series(
    out_dir: str | Path, seed: int, spec: DicomSeriesSpec | None, shape: tuple[int, int, int]
) -> tuple[list[Path], DicomSeriesSpec]:
    spec = spec or DicomSeriesSpec(seed=seed, series_description="SYNTH FAULT")
    affine = orientation_affine("axial", FAULT_SPACING_MM, shape=shape)
    image, _ = make_phantom(shape, modality=spec.modality, seed=seed, affine_ras=affine)
    return write_dicom_series(image, affine, out_dir, spec), spec


def write_bad_gap_series(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = FAULT_SHAPE,
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
    tilt_deg: float = 15.0,
) -> list[Path]:
    """An axial series whose IPP steps are not parallel to the slice normal (gantry tilt / shear).

    Each slice k is moved ``k * step * tan(tilt)`` mm along the column direction (posterior)
    while IOP stays axial. A reader must resample to an orthogonal grid or refuse; never write it
    with an orthogonal affine. Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    shift_per_slice = FAULT_SPACING_MM[2] * np.tan(np.deg2rad(tilt_deg))
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
    shape: tuple[int, int, int] = FAULT_SHAPE,
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


def _edit_files(paths: list[Path], edit: Callable[[int, Dataset], None]) -> None:
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(k, ds)
        save_dataset(ds, path)


def write_bad_shared_series_uid(
    out_dir: str | Path,
    seed: int = 0,
    *,
    differ: str = "FrameOfReferenceUID",
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = FAULT_SHAPE,
) -> tuple[list[Path], list[Path]]:
    """Two stacks in ``out_dir/a`` and ``out_dir/b`` with ONE SeriesInstanceUID that differ in ``differ``.

    ``differ`` is "FrameOfReferenceUID", "StudyInstanceUID" or "PatientID". Stack b continues
    stack a along the slice normal with its own SOPInstanceUIDs, so stacking both gives a
    regular 2 x ``shape[2]``-slice volume that looks valid: a reader must split them (or refuse),
    never merge two patients or two frames of reference. Returns (files of a, files of b).
    """
    options: dict[str, dict[str, Any]] = {
        "FrameOfReferenceUID": {"frame_of_reference_uid": generate_uid(entropy_srcs=[str(seed), "for-b"])},
        "StudyInstanceUID": {"study_uid": generate_uid(entropy_srcs=[str(seed), "study-b"])},
        "PatientID": {"patient_id": "SYNTH-PID-OTHER", "patient_name": "ROE^RICHARD^SYNTH"},
    }
    changes = options[differ]
    spec_a = spec or DicomSeriesSpec(seed=seed, series_description="SYNTH FAULT")
    files_a, spec_a = _good_series(Path(out_dir) / "a", seed, spec_a, shape)
    spec_b = replace(spec_a, **changes)
    affine = orientation_affine("axial", FAULT_SPACING_MM, shape=shape)
    affine[:3, 3] += affine[:3, 2] * shape[2]  # b starts where a ends
    image, _ = make_phantom(shape, modality=spec_b.modality, seed=seed + 1, affine_ras=affine)
    files_b = write_dicom_series(image, affine, Path(out_dir) / "b", spec_b)

    def new_sop(k: int, ds: Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(spec_a.instance_uid(1000 + k))

    _edit_files(files_b, new_sop)
    return files_a, files_b


def write_bad_slice_attribute(
    out_dir: str | Path,
    seed: int = 0,
    *,
    keyword: str,
    value: Any,
    slices: str = "all",
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = FAULT_SHAPE,
) -> list[Path]:
    """A series whose ``keyword`` is set to ``value`` (None deletes it) in ``slices``: "all" or "last".

    E.g. ``PixelSpacing=["-0.8", "1.1"]`` (negative), ``["1e30", "1e30"]`` (implausible),
    ``ImagePositionPatient=None`` on the last slice (it cannot be placed), ``["nan", 0, 0]``.
    Values are written as given (decimal strings are not re-checked). Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    targets = range(len(paths)) if slices == "all" else [len(paths) - 1]

    def edit(k: int, ds: Dataset) -> None:
        if k not in targets:
            return
        if value is None:
            delattr(ds, keyword)
        else:
            ds[keyword].value = value

    with pydicom.config.disable_value_validation():
        _edit_files(paths, edit)
    return paths


def write_bad_palette_color(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = FAULT_SHAPE,
) -> list[Path]:
    """A series stored as PALETTE COLOR (8-bit palette indices plus a grey-ramp-free colour LUT).

    Its stored values index the palette; a grayscale reader must refuse it (or apply the palette
    and say so), never hand the indices to a network. Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    ramp = np.arange(256, dtype=np.uint16)

    def edit(k: int, ds: Dataset) -> None:
        indices = (ds.pixel_array.astype(np.int32) % 256).astype(np.uint16)
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ds.PixelRepresentation = 0
        ds.BitsStored, ds.HighBit = 8, 7
        ds.PixelData = indices.tobytes()
        for colour, lut in (("Red", ramp[::-1]), ("Green", ramp), ("Blue", (ramp * 7) % 256)):
            ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
            ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", (lut * 257).astype("<u2").tobytes())
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)

    _edit_files(paths, edit)
    return paths


def write_bad_truncated_header(
    out_dir: str | Path,
    seed: int = 0,
    *,
    spec: DicomSeriesSpec | None = None,
    shape: tuple[int, int, int] = FAULT_SHAPE,
) -> list[Path]:
    """A series whose LAST file is cut inside its header, after SeriesInstanceUID, before Rows.

    Discovery then sees an image object without Rows/Columns; a careful reader reports the file
    as truncated and the series as incomplete (the cut slice is an end slice: no gap shows it).
    Returns all files.
    """
    paths, _ = _good_series(out_dir, seed, spec, shape)
    victim = paths[-1]
    data = victim.read_bytes()
    ds = pydicom.dcmread(victim, stop_before_pixels=True)
    # Cut just before the FrameOfReferenceUID element (0020,0052): SeriesInstanceUID (0020,000E)
    # and the study/patient modules survive, the image plane and pixel modules do not.
    marker = b"\x20\x00\x52\x00"
    assert "FrameOfReferenceUID" in ds and marker in data
    victim.write_bytes(data[: data.index(marker)])
    return paths


def write_bad_single_slice(
    out_dir: str | Path, seed: int = 0, *, spec: DicomSeriesSpec | None = None, size: int = 32
) -> list[Path]:
    """A series of ONE slice (``size`` x ``size``): a 2D image with 3D geometry. Returns its file."""
    paths, _ = _good_series(out_dir, seed, spec, (size, size, 1))
    return paths
