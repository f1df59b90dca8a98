"""The one image type of the project: a voxel array that knows its world geometry."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Two grids are the same grid when their voxel -> world affines agree to this many millimetres
#: (header round-off of float32 NIfTI and 6-decimal DICOM values; far below any voxel).
GRID_TOL_MM = 1e-3


@dataclass(frozen=True)
class DicomSource:
    """The DICOM files a :class:`Volume` was read from, in the volume's slice order.

    Writers that reference the source series (DICOM SEG, RTSTRUCT) take it from here instead of
    parsing and sorting the files again: the slice order is decided once, by the reader.

    Attributes:
        files: single-frame series: the file of slice ``k`` at index ``k``; an enhanced
            multi-frame object: its one file.
        headers: parsed pydicom Datasets parallel to ``files`` (pixel data dropped). They hold
            patient data: they stay in the process and are never logged.
        frame_of_slice: for slice ``k`` of the volume, the 0-based index of its frame in
            ``files[0]`` (multi-frame) or ``k`` itself (single-frame: files are in slice order).
    """

    files: tuple[Path, ...]
    headers: tuple[Any, ...]
    frame_of_slice: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.files) != len(self.headers):
            raise ValueError(f"DicomSource: {len(self.headers)} headers for {len(self.files)} files")
        if len(self.files) > 1 and len(self.frame_of_slice) != len(self.files):
            raise ValueError(
                f"DicomSource: {len(self.frame_of_slice)} slices for {len(self.files)} single-frame files"
            )

    @property
    def multiframe(self) -> bool:
        """True for one enhanced multi-frame object."""
        return len(self.files) == 1 and len(self.frame_of_slice) > 1


@dataclass(frozen=True)
class Volume:
    """A 3D (multi-channel) image with its geometry.

    Attributes:
        array: voxel data, shape ``(C, X, Y, Z)``; axis ``X`` is voxel index ``i`` of the affine,
            ``Y`` is ``j``, ``Z`` is ``k`` (NIfTI convention). Usually float32 (CT in HU).
        affine_ras: 4x4 float64 matrix mapping voxel indices ``(i, j, k, 1)`` to RAS+ world
            millimetres (nibabel / MONAI convention, *not* DICOM LPS).
        case_id: pseudonymous case id; never a patient name or ID.
        source: where the data came from (a path on the hospital's disk; never logged to MLflow).
        modality: "CT", "MR", ... or "" when unknown.
        dicom: the DICOM files and headers the volume was read from (None for NIfTI).
    """

    array: np.ndarray
    affine_ras: np.ndarray
    case_id: str = ""
    source: str = ""
    modality: str = ""
    dicom: DicomSource | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, X, Y, Z); got shape {self.array.shape}")
        aff = np.asarray(self.affine_ras, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"Volume.affine_ras must be 4x4; got {aff.shape}")
        object.__setattr__(self, "affine_ras", aff)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` voxel counts."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along i, j, k in millimetres (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine_ras[:3, :3], axis=0))  # type: ignore[return-value]


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel->LPS affine (DICOM/ITK world) into a voxel->RAS affine (NIfTI world).

    DICOM patient coordinates are LPS; RAS negates x and y.
    """
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(affine_lps, dtype=np.float64)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lps_to_ras` (the same flip: it is its own inverse)."""
    return lps_to_ras(affine_ras)


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


PSEUDONYM_SALT_ENV = "MEDSEG_PSEUDONYM_SALT"
# Public (it is in the source code): ids made with it can be recomputed by anyone holding the UID.
DEFAULT_PSEUDONYM_SALT = "medseg-v1"


def pseudonym_salt_is_public() -> bool:
    """True when ``MEDSEG_PSEUDONYM_SALT`` is unset or empty (or the published default).

    Case ids are then reversible by anyone who holds the series' UIDs (a PACS user, a vendor): they
    hash every UID they know with the public salt and compare. A site sets its own secret salt.
    """
    return os.environ.get(PSEUDONYM_SALT_ENV, "") in ("", DEFAULT_PSEUDONYM_SALT)


def pseudonymous_case_id(key: str, salt: str | None = None) -> str:
    """A stable, non-identifying case id for a DICOM series (or any identifying key).

    ``key`` is typically the SeriesInstanceUID. The id is a salted SHA-256 prefix, so it is stable
    across runs (resume, joins with ground truth) but reveals neither the UID nor the patient.
    The salt comes from ``MEDSEG_PSEUDONYM_SALT`` when set; a hospital should set its own secret.
    """
    salt = salt if salt is not None else os.environ.get(PSEUDONYM_SALT_ENV, DEFAULT_PSEUDONYM_SALT)
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).hexdigest()
    return f"case-{digest[:12]}"


def sanitize_case_id(name: str) -> str:
    """Make ``name`` safe as a single path component: no separators, no '..', no odd characters.

    Anything but letters, digits, '.', '_' and '-' becomes '_'; leading dots are dropped so the
    result can never be '.', '..' or a hidden file. An empty result falls back to a hash.
    """
    cleaned = _SAFE_CHARS.sub("_", name).lstrip(".")[:120]
    return cleaned or pseudonymous_case_id(name)
