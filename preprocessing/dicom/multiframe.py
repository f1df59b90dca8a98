"""Enhanced (multi-frame) CT/MR objects: geometry and rescale from the functional groups.

Per frame, ``PerFrameFunctionalGroupsSequence[f]`` holds ``PlanePositionSequence`` (position);
orientation, pixel measures and the pixel value transformation may sit per frame or in
``SharedFunctionalGroupsSequence``. Frames are sorted by position along the slice normal exactly
like single-frame slices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from preprocessing.dicom.geometry import (
    ORIENTATION_TOL,
    SPACING_TOL_MM,
    check_grayscale,
    check_same,
    rescale_stack,
    stack_geometry,
    stack_to_volume_array,
)
from preprocessing.errors import IngestError
from preprocessing.image import DicomSource, Volume, lps_to_ras, pseudonymous_case_id


@dataclass(frozen=True)
class _FrameValues:
    """Per-frame geometry and rescale of one object, in stored frame order (lists of length F)."""

    positions: list[list[float]]  # ImagePositionPatient (LPS mm)
    orientations: list[list[float]]  # ImageOrientationPatient
    pixel_spacings: list[list[float]]  # PixelSpacing [row, column] mm
    slopes: list[float]
    intercepts: list[float]
    slice_thickness_mm: float  # of the last frame's pixel measures: the spacing of a 1-frame object


def read_multiframe(ds: Dataset, path: Path, *, decode_threads: int | None = None) -> Volume:
    """Read one multi-frame object (already parsed, pixels included) into a Volume.

    Args:
        ds: the full dataset. Its PixelData is deleted once decoded: the dataset kept in
            ``Volume.dicom.headers`` is the header only (the SEG writer needs nothing more).
        path: its file (for messages and ``source``).
        decode_threads: unused for now: pydicom decodes all frames of one object in one call.

    Returns:
        Volume (1, columns, rows, frames) on the object's grid, RAS affine, rescaled per frame;
        ``dicom.frame_of_slice`` lists the stored frame index of each slice ``k``.

    Raises:
        IngestError / GeometryError: as :func:`preprocessing.dicom.series.read_dicom_series`.
    """
    del decode_threads
    n_frames = _check_frames(ds, path)
    values = _frame_values(ds, path)
    check_same(values.orientations, "orientations (ImageOrientationPatient)", atol=ORIENTATION_TOL)
    check_same(values.pixel_spacings, "PixelSpacing", atol=SPACING_TOL_MM)
    geometry = stack_geometry(
        np.array(values.positions),
        np.array(values.orientations[0]),
        np.array(values.pixel_spacings[0]),
        single_slice_spacing_mm=values.slice_thickness_mm,
    )
    order = geometry.order
    frames = _decode_all(ds, path, n_frames)[order]  # fancy indexing copies: the decoded cache can go
    del ds.PixelData  # also drops pydicom's cached pixel array: the header alone stays alive
    stack = rescale_stack(frames, np.array(values.slopes)[order], np.array(values.intercepts)[order])
    frame_of_slice = tuple(int(k) for k in order)
    return Volume(
        array=stack_to_volume_array(stack),
        affine_ras=lps_to_ras(geometry.affine_lps),
        case_id=pseudonymous_case_id(str(ds.get("SeriesInstanceUID", ""))),
        source=os.fspath(path),
        modality=str(ds.get("Modality", "")),
        dicom=DicomSource(files=(Path(path),), headers=(ds,), frame_of_slice=frame_of_slice),
    )


def _check_frames(ds: Dataset, path: Path) -> int:
    """The number of frames, after checking the object has functional groups and is grayscale."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise IngestError(
            f"{path}: multi-frame object without per-frame functional groups; its frames cannot be placed in the world"
        )
    n_frames = int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame))
    if len(per_frame) != n_frames:
        raise IngestError(f"{path}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
    if n_frames < 1:
        raise IngestError(f"{path}: enhanced object has no frames")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise IngestError(f"{path}: colour image (SamplesPerPixel={ds.SamplesPerPixel}) is not supported")
    check_grayscale(ds, path)
    return n_frames


def _frame_values(ds: Dataset, path: Path) -> _FrameValues:
    """Position, orientation, pixel spacing and rescale of every frame (per-frame over shared groups)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()
    values = _FrameValues([], [], [], [], [], 1.0)
    measures: Dataset | None = None
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        plane = _group(item, shared_item, "PlanePositionSequence")
        orient = _group(item, shared_item, "PlaneOrientationSequence")
        measures = _group(item, shared_item, "PixelMeasuresSequence")
        if plane is None or orient is None or measures is None:
            raise IngestError(f"{path}: frame {f} lacks plane position, orientation or pixel measures")
        try:
            values.positions.append([float(v) for v in plane.ImagePositionPatient])
            values.orientations.append([float(v) for v in orient.ImageOrientationPatient])
            values.pixel_spacings.append([float(v) for v in measures.PixelSpacing])
        except (AttributeError, TypeError, ValueError) as exc:
            raise IngestError(
                f"{path}: frame {f}: missing or malformed ImagePositionPatient, ImageOrientationPatient "
                f"or PixelSpacing ({exc})"
            ) from exc
        transform = _group(item, shared_item, "PixelValueTransformationSequence")
        source = transform if transform is not None else ds
        values.slopes.append(float(source.get("RescaleSlope", 1) or 1))
        values.intercepts.append(float(source.get("RescaleIntercept", 0) or 0))
    assert measures is not None  # _check_frames saw at least one frame; the loop checked each
    thickness = measures.get("SliceThickness") or measures.get("SpacingBetweenSlices") or 1.0
    return replace(values, slice_thickness_mm=float(thickness))


def _group(item: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """A functional group's first item, per-frame taking precedence over shared."""
    for where in (item, shared):
        seq = where.get(keyword)
        if seq:
            return seq[0]
    return None


def _decode_all(ds: Dataset, path: Path, n_frames: int) -> np.ndarray:
    try:
        frames = ds.pixel_array
    except Exception as exc:  # truncated data raises ValueError, missing decoders RuntimeError, ...
        raise IngestError(
            f"truncated or undecodable pixel data in {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if n_frames == 1 and frames.ndim == 2:
        frames = frames[np.newaxis]
    expected = (n_frames, int(ds.Rows), int(ds.Columns))
    if frames.shape != expected:
        raise IngestError(f"{path}: decoded pixel array has shape {frames.shape}, expected {expected}")
    return frames
