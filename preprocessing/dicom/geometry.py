"""Stack geometry and value rescaling shared by single-frame series and enhanced multi-frame objects.

Conventions (the project's geometry notes): DICOM world is LPS. ``ImageOrientationPatient`` is
the row direction cosine ``r`` (increasing column index) then the column direction cosine ``c``
(increasing row index); the slice normal is ``n = r x c``. ``PixelSpacing`` is ``[row spacing
(along c), column spacing (along r)]``. Slices are ordered by ``IPP . n`` -- never by
InstanceNumber or file name -- and the slice spacing comes from the positions, not from
SliceThickness.

Values are checked before they become an affine: positions and direction cosines must be finite,
and every spacing (PixelSpacing, the step measured between positions) must lie in the physical
range :data:`MIN_SPACING_MM` .. :data:`MAX_SPACING_MM`; a negative spacing is refused, never
taken as its absolute value (its sign is not a convention).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from preprocessing.errors import GeometryError, IngestError

_ORTHONORMAL_TOL = 1e-3  # direction cosines written with ~6 decimals are unit/orthogonal to this tolerance
# Slices of one stack may differ in IOP / PixelSpacing by decimal-string rounding, no more.
ORIENTATION_TOL = 1e-4
SPACING_TOL_MM = 1e-4
_DUPLICATE_TOL_MM = 1e-3
#: Plausible voxel sizes in mm: 1 micrometre (micro-CT, microscopy) to 10 cm (a sparse localizer).
#: Outside it a header is wrong (a unit error, a writer bug) and every volume in mL would be too.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 100.0


def check_spacing_mm(values: Sequence[float] | np.ndarray | float, what: str) -> None:
    """Refuse a voxel spacing that is not finite, not positive, or physically implausible.

    Args:
        values: one or more spacings in mm.
        what: the tag or quantity, named in the message (e.g. ``"PixelSpacing"``).

    Raises:
        GeometryError: naming ``what``, its values and the accepted range.
    """
    numbers = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64))]
    shown = numbers[0] if len(numbers) == 1 else numbers
    if not all(math.isfinite(v) for v in numbers):
        raise GeometryError(f"{what} {shown} is not a finite number; the voxel size is unknown")
    if any(v <= 0 for v in numbers):
        sign = "negative" if any(v < 0 for v in numbers) else "zero"
        raise GeometryError(
            f"{what} {shown} is {sign}: a spacing must be positive (its sign is not a convention, it is "
            "never taken as its absolute value); fix the header"
        )
    if any(not MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in numbers):
        raise GeometryError(
            f"{what} {shown} mm is outside the plausible physical range {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm "
            "(a unit or header error); fix the header"
        )


@dataclass(frozen=True)
class StackGeometry:
    """Where a sorted stack of slices lies in the world.

    Attributes:
        order: indices into the caller's slice list, sorted along the slice normal (length N).
        affine_lps: 4x4 voxel (column i, row j, slice k) -> LPS millimetres.
    """

    order: np.ndarray
    affine_lps: np.ndarray


def stack_geometry(
    positions: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: np.ndarray,
    single_slice_spacing_mm: float = 1.0,
) -> StackGeometry:
    """Sort slices along their normal, check the stack is a regular orthogonal grid, build its affine.

    Args:
        positions: (N, 3) ImagePositionPatient of each slice (LPS mm), in any order.
        orientation: (6,) ImageOrientationPatient shared by all slices.
        pixel_spacing: (2,) PixelSpacing ``[row spacing, column spacing]`` in mm.
        single_slice_spacing_mm: slice spacing to use when N == 1 (no positions to measure).

    Returns:
        The slice order and the voxel -> LPS affine.

    Raises:
        GeometryError: non-finite positions or orientation, a spacing outside
            :func:`check_spacing_mm`'s range, invalid orientation, duplicate positions, a missing
            slice (gap), uneven spacing, or a sheared stack (gantry tilt); the message says which.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(orientation, dtype=np.float64)
    _check_finite_plane(positions, iop)
    check_spacing_mm(pixel_spacing, "PixelSpacing")
    row_cos, col_cos = _direction_cosines(iop)
    normal = np.cross(row_cos, col_cos)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist, positions = dist[order], positions[order]
    spacing_k = _slice_spacing(dist, single_slice_spacing_mm)
    check_spacing_mm(
        spacing_k,
        "slice spacing measured from ImagePositionPatient"
        if dist.size > 1
        else "SpacingBetweenSlices/SliceThickness of the single slice",
    )
    _check_no_shear(positions, normal)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * float(pixel_spacing[1])
    affine[:3, 1] = col_cos * float(pixel_spacing[0])
    affine[:3, 2] = normal * spacing_k
    affine[:3, 3] = positions[0]
    return StackGeometry(order=order, affine_lps=affine)


def _check_finite_plane(positions: np.ndarray, iop: np.ndarray) -> None:
    """Refuse non-finite ImagePositionPatient (N, 3) or ImageOrientationPatient (6,) values."""
    finite_rows = np.all(np.isfinite(positions), axis=1)
    if not np.all(finite_rows):
        bad = positions[~finite_rows][0]
        raise GeometryError(
            f"ImagePositionPatient is not finite in {int(np.sum(~finite_rows))} slice(s) (e.g. {bad.tolist()}); "
            "those slices cannot be placed in the world"
        )
    if not np.all(np.isfinite(iop)):
        raise GeometryError(f"ImageOrientationPatient {iop.tolist()} is not finite")


def _direction_cosines(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) unit direction cosines of ImageOrientationPatient, refused unless orthonormal."""
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > _ORTHONORMAL_TOL
        or abs(np.linalg.norm(col_cos) - 1) > _ORTHONORMAL_TOL
        or abs(row_cos @ col_cos) > _ORTHONORMAL_TOL
    ):
        raise GeometryError(
            f"ImageOrientationPatient {iop.tolist()} is not two orthonormal direction cosines"
        )
    return row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)


def _slice_spacing(dist: np.ndarray, single_slice_spacing_mm: float) -> float:
    """Spacing along the normal from sorted slice distances; refuse duplicates, gaps, uneven steps."""
    if dist.size == 1:
        return float(single_slice_spacing_mm)
    steps = np.diff(dist)
    n_dup = int(np.sum(steps < _DUPLICATE_TOL_MM))
    if n_dup:
        raise GeometryError(
            f"duplicate slice positions: {n_dup} slice(s) share a position with another slice "
            "(several acquisitions, phases or echoes in one series?); export them as separate series"
        )
    typical = float(np.median(steps))
    # 1% of the spacing (at least 0.01 mm) absorbs the rounding of positions written as decimal strings.
    tol = max(0.01 * typical, 0.01)
    bad = np.flatnonzero(np.abs(steps - typical) > tol)
    if bad.size:
        k = int(bad[0])
        ratio = steps[k] / typical
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            raise GeometryError(
                f"missing slice(s): gap of {steps[k]:.3f} mm after sorted slice {k} where the spacing is "
                f"{typical:.3f} mm (~{round(ratio) - 1} slice(s) missing)"
            )
        raise GeometryError(
            f"inconsistent slice spacing: steps range {steps.min():.3f}..{steps.max():.3f} mm "
            f"(typical {typical:.3f} mm)"
        )
    return float((dist[-1] - dist[0]) / (dist.size - 1))


def _check_no_shear(positions: np.ndarray, normal: np.ndarray) -> None:
    """Positions must advance along the normal; a sideways drift is a gantry tilt (sheared grid).

    We refuse rather than resample: writing a sheared stack with an orthogonal affine misplaces
    every voxel off the first slice, and silent resampling would hide a data problem from the user.
    """
    rel = positions - positions[0]
    along = rel @ normal
    sideways = np.linalg.norm(rel - np.outer(along, normal), axis=1)
    allowed = 0.01 + 1e-3 * np.abs(along)
    if np.any(sideways > allowed):
        k = int(np.argmax(sideways - allowed))
        angle = float(np.degrees(np.arctan2(sideways[k], abs(along[k])))) if along[k] else 90.0
        raise GeometryError(
            f"gantry tilt / sheared stack: slice positions drift {sideways[k]:.2f} mm sideways over "
            f"{abs(along[k]):.1f} mm ({angle:.2f} deg from the slice normal); refusing rather than "
            "writing a sheared grid -- resample to an orthogonal grid (e.g. with dcm2niix) first"
        )


def rescale_stack(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Apply per-slice ``value = raw * slope + intercept``.

    Args:
        raw: (N, rows, cols) stored values, any integer dtype.
        slopes, intercepts: (N,) per-slice RescaleSlope / RescaleIntercept.

    ``raw`` is overwritten when the result has its dtype (pass a copy to keep it).

    Returns:
        (N, rows, cols): the raw array unchanged when every slope is 1 and intercept 0; int16 (or
        int32 if the range needs it) when all are whole numbers, e.g. CT in HU; float32 otherwise.
    """
    slopes = np.asarray(slopes, dtype=np.float64)
    intercepts = np.asarray(intercepts, dtype=np.float64)
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return raw
    if (
        raw.dtype.kind in "iu"
        and np.all(slopes == np.round(slopes))
        and np.all(intercepts == np.round(intercepts))
    ):
        lo, hi = float(raw.min()), float(raw.max())
        ends = np.concatenate([lo * slopes + intercepts, hi * slopes + intercepts])
        dtype: type[np.number] = np.int16 if ends.min() >= -32768 and ends.max() <= 32767 else np.int32
        if ends.min() < np.iinfo(np.int32).min or ends.max() > np.iinfo(np.int32).max:
            dtype = np.float64
        out = raw if raw.dtype == dtype else raw.astype(dtype)  # in place when possible: saves a volume
        if not np.all(slopes == 1):
            out *= slopes.astype(dtype)[:, None, None]
        out += intercepts.astype(dtype)[:, None, None]
        return out
    out = raw.astype(np.float32)
    out *= slopes.astype(np.float32)[:, None, None]
    out += intercepts.astype(np.float32)[:, None, None]
    return out


def check_grayscale(ds: Dataset, path: str | os.PathLike) -> None:
    """Refuse a PALETTE COLOR image: its stored values index a colour table, they measure nothing.

    A grayscale model must never see palette indices (they are ordered by the palette's author,
    not by density or signal); applying the palette would give colour, which no model here takes.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        raise IngestError(
            f"{path}: PALETTE COLOR image (PhotometricInterpretation): its pixel values are indices "
            "into a colour palette, not measurements; not supported (export a grayscale series)"
        )


def check_same(values: list, what: str, atol: float = 0.0) -> None:
    """Raise IngestError naming ``what`` when the slices disagree on it.

    Args:
        values: one value (number or vector) per slice.
        what: name for the message.
        atol: tolerance for numeric vectors; direction cosines and spacings written as decimal
            strings jitter in the last digits between slices of one stack, which is not a mismatch.
    """
    if atol > 0:
        array = np.asarray(values, dtype=np.float64)
        deviation = np.abs(array - array[0]).max(axis=tuple(range(1, array.ndim)))
        if np.any(deviation > atol):
            other = values[int(np.argmax(deviation))]
            raise IngestError(f"mismatched {what} across slices: {list(values[0])} vs {list(other)}")
        return
    distinct = {tuple(v) if isinstance(v, list | tuple | np.ndarray) else v for v in values}
    if len(distinct) > 1:
        shown = ", ".join(str(v) for v in sorted(distinct, key=str)[:4])
        raise IngestError(f"mismatched {what} across slices: {shown}")


def stack_to_volume_array(stack: np.ndarray) -> np.ndarray:
    """(N slices, rows, cols) -> (1, cols, rows, N), i.e. (C, i, j, k), without copying.

    The result is a Fortran-ordered view, which is exactly NIfTI's on-disk order, so nibabel
    writes it without a copy.
    """
    return stack.transpose(2, 1, 0)[np.newaxis]
