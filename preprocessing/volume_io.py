"""Image files <-> Volume: NIfTI (nibabel), NRRD/MHA (SimpleITK), and atomic NIfTI writing.

NIfTI is read as stored: no reorientation, the affine nibabel reports (sform when its code > 0,
else qform), ``scl_slope``/``scl_inter`` applied as nibabel applies them. NRRD/MHA go through
SimpleITK, whose world is LPS; we convert to RAS.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from preprocessing.atomic import atomic_path
from preprocessing.discovery import NIFTI_SUFFIXES, SourceItem
from preprocessing.errors import IngestError
from preprocessing.image import Volume, lps_to_ras, sanitize_case_id

logger = logging.getLogger(__name__)

# gzip level 1: on CT volumes levels above 1 shrink files by only a few percent but cost 2-4x
# the write time, and ingestion writes every series once (nibabel's own default is also 1).
# Read-time cost is the same at any level.
NIFTI_COMPRESSLEVEL = 1
_AFFINE_TOL_MM = 1e-3


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI (``.nii``/``.nii.gz``), NRRD or MHA/MHD file.

    Args:
        path: the image file.

    Returns:
        Volume (C, X, Y, Z): 3D files give C=1; a 4th dimension (NIfTI) or vector pixels (ITK)
        become channels. ``case_id`` is the sanitised file name without extension.

    Raises:
        IngestError: unreadable/corrupt/truncated file, not 3D/4D, or NaN/Inf voxels.
    """
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path)
    else:
        array, affine = _read_itk(path)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise IngestError(f"{path}: {bad} NaN/Inf voxel(s); the file is corrupt or not an image")
    stem = path.name
    for suffix in (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return Volume(array=array, affine_ras=affine, case_id=sanitize_case_id(stem), source=os.fspath(path))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = cast(nib.Nifti1Image, nib.load(os.fspath(path)))
        # dataobj applies scl_slope/scl_inter exactly as nibabel documents (float only when scaled).
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # truncated gzip -> EOFError/OSError, bad header -> HeaderDataError, ...
        raise IngestError(f"cannot read NIfTI {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 3:
        data = data[np.newaxis]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    else:
        raise IngestError(f"{path}: expected a 3D or 4D image, got shape {data.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(f"{path}: the header's affine is degenerate or not finite")
    return data, affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk  # imported here: only NRRD/MHA inputs need it

    try:
        img = sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        raise IngestError(f"cannot read {path} with SimpleITK: {exc}") from exc
    if img.GetDimension() != 3:
        raise IngestError(f"{path}: expected a 3D image, got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, components])
    arr = arr[np.newaxis] if arr.ndim == 3 else np.moveaxis(arr, 3, 0)
    data = arr.transpose(0, 3, 2, 1)  # -> (C, x, y, z) = (C, i, j, k)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)
    affine_lps[:3, 3] = img.GetOrigin()
    return data, lps_to_ras(affine_lps)


def load_source_item(item: SourceItem) -> Volume:
    """Read what a discovered item points to, with the item's case id and modality.

    DICOM items go through :func:`preprocessing.dicom_series.read_dicom_series`; file items with
    several paths are MSD channels (``CASE_0000``, ``CASE_0001``...), stacked on the channel axis
    after checking they share one grid.

    Raises:
        IngestError / GeometryError: with a reason naming the input.
    """
    if item.kind == "dicom":
        from preprocessing.dicom_series import read_dicom_series  # imported here: pydicom decoders are heavy

        volume = read_dicom_series(item.paths)
    elif item.kind in ("nifti", "itk"):
        volume = _read_channels(item.paths)
    else:
        raise IngestError(f"{item.paths[0] if item.paths else '?'}: nothing to read ({item.kind})")
    return Volume(
        volume.array,
        volume.affine_ras,
        case_id=item.case_id,
        source=volume.source,
        modality=volume.modality or item.modality,
        meta=volume.meta,
    )


def _read_channels(paths: tuple[Path, ...]) -> Volume:
    volumes = [read_volume(p) for p in paths]
    if len(volumes) == 1:
        return volumes[0]
    first = volumes[0]
    for other, path in zip(volumes[1:], paths[1:], strict=True):
        if other.spatial_shape != first.spatial_shape or not np.allclose(
            other.affine_ras, first.affine_ras, atol=_AFFINE_TOL_MM
        ):
            raise IngestError(f"channel {path} is on a different grid than {paths[0]}")
    dtype = np.result_type(*[v.array.dtype for v in volumes])
    array = np.concatenate([v.array.astype(dtype, copy=False) for v in volumes], axis=0)
    return Volume(array, first.affine_ras, source=os.fspath(paths[0].parent))


def write_nifti_atomic(
    array: np.ndarray, affine_ras: np.ndarray, path: str | os.PathLike, dtype: np.dtype | str | None = None
) -> Path:
    """Write a NIfTI-1 file atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        array: (X, Y, Z) or (X, Y, Z, C) voxels (i, j, k order of ``affine_ras``).
        affine_ras: 4x4 voxel -> RAS mm; stored as both sform and qform (code 1, scanner), so
            every reader -- whichever form it prefers -- sees the same geometry.
        path: destination ending in ``.nii.gz`` (gzip level :data:`NIFTI_COMPRESSLEVEL`) or ``.nii``.
        dtype: on-disk dtype (default: the array's).

    Returns:
        ``path``. A reader never sees a partial file: either the old one or the complete new one.
    """
    path = Path(path)
    data = np.asanyarray(array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype == np.float64:
        data = data.astype(np.float32)  # no scanner measures more than float32 resolves
    affine = np.asarray(affine_ras, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(".gz"):
            # mtime=0: identical inputs give byte-identical files (reproducible, easy to verify).
            with gzip.GzipFile(tmp, "wb", compresslevel=NIFTI_COMPRESSLEVEL, mtime=0) as fh:
                img.to_stream(fh)
        else:
            with open(tmp, "wb") as fh:
                img.to_stream(fh)
    return path
