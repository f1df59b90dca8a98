"""Image files <-> Volume: NIfTI (nibabel), NRRD/MHA (SimpleITK), and atomic NIfTI writing.

NIfTI is read as stored: no reorientation, the affine nibabel reports (sform when its code > 0,
else qform), ``scl_slope``/``scl_inter`` applied as nibabel applies them. NRRD/MHA go through
SimpleITK, whose world is LPS; we convert to RAS.

Before a NIfTI's data block is read, the size its header declares is checked against the file
(exactly for ``.nii``; for ``.nii.gz`` against the gzip trailer's ISIZE, and by counting the
decompressed stream when that does not match) and against the memory available, so a bad header
costs a clear reason instead of gigabytes. Voxel sizes must lie in
:data:`preprocessing.dicom.geometry.MIN_SPACING_MM` .. ``MAX_SPACING_MM``.

A 4D NIfTI (or a multi-component NRRD/MHA) is an image only inside an MSD dataset whose
``dataset.json`` declares that many channels; anywhere else :func:`load_source_item` refuses it
("4D image with N volumes"): a time series or a stack of unrelated volumes must not be read as
the channels of one image.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import replace
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from preprocessing.atomic import atomic_path
from preprocessing.dicom.geometry import check_spacing_mm
from preprocessing.errors import IngestError
from preprocessing.image import GRID_TOL_MM, Volume, lps_to_ras, sanitize_case_id
from preprocessing.image_files import image_file_kind, strip_image_suffix
from preprocessing.source_item import SourceItem

logger = logging.getLogger(__name__)

# gzip level 1: on CT volumes levels above 1 shrink files by only a few percent but cost 2-4x
# the write time, and ingestion writes every series once (nibabel's own default is also 1).
# Read-time cost is the same at any level.
NIFTI_COMPRESSLEVEL = 1


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI (``.nii``/``.nii.gz``), NRRD or MHA/MHD file.

    Args:
        path: the image file.

    Returns:
        Volume (C, X, Y, Z): 3D files give C=1; a 4th dimension (NIfTI) or vector pixels (ITK)
        become channels. ``case_id`` is the sanitised file name without extension.

    Raises:
        IngestError: unreadable/corrupt/truncated file, a header declaring more data than the file
            holds or than memory can take, not 3D/4D, NaN/Inf voxels, or a voxel size outside
            the physical range (GeometryError).
    """
    path = Path(path)
    if image_file_kind(path) == "nifti":
        array, affine = _read_nifti(path)
    else:
        array, affine = _read_itk(path)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise IngestError(f"{path}: {bad} NaN/Inf voxel(s); the file is corrupt or not an image")
    stem = strip_image_suffix(path.name)
    return Volume(array=array, affine_ras=affine, case_id=sanitize_case_id(stem), source=os.fspath(path))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = _load_nifti_header(path)
    _check_declared_size(path, img)
    try:
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
    if not np.all(np.isfinite(affine)):
        raise IngestError(f"{path}: the header's affine is not finite")
    what = f"voxel size in the NIfTI header (pixdim/sform) of {path.name}"
    check_spacing_mm(np.linalg.norm(affine[:3, :3], axis=0), what)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(f"{path}: the header's affine is degenerate (its axes are not independent)")
    return data, affine


def _load_nifti_header(path: Path) -> nib.Nifti1Image:
    """The image object with its header only (nibabel reads the data block lazily)."""
    try:
        return cast(nib.Nifti1Image, nib.load(os.fspath(path)))
    except Exception as exc:  # truncated gzip -> EOFError/OSError, bad header -> HeaderDataError, ...
        raise IngestError(f"cannot read NIfTI {path}: {type(exc).__name__}: {exc}") from exc


def _check_declared_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that declares more data than the file holds, or than memory can take."""
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = np.dtype(header.get_data_dtype())
    n_voxels = math.prod(shape)
    # Where nibabel will read the data block from (a single-file NIfTI's vox_offset 0 means 352).
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    need = offset + n_voxels * dtype.itemsize
    held = _gzip_holds(path, need) if path.name.lower().endswith(".gz") else path.stat().st_size
    described = f"{'x'.join(map(str, shape))} {dtype} ({need:,} bytes from the start of the file)"
    if held < need:
        raise IngestError(
            f"cannot read NIfTI {path}: the header declares {described} but the file holds only "
            f"{held:,} bytes{' once decompressed' if path.name.lower().endswith('.gz') else ''}; "
            "the file is truncated or its header is wrong"
        )
    slope, inter = header.get_slope_inter()
    scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
    in_memory = n_voxels * (dtype.itemsize + (8 if scaled else 0))  # scaled values come back as floats
    available = _available_memory()
    if available is not None and in_memory > available:
        raise IngestError(
            f"cannot read NIfTI {path}: the header declares {described}, which needs about "
            f"{in_memory / 2**30:.1f} GiB of memory; only {available / 2**30:.1f} GiB are available"
        )


def _gzip_holds(path: Path, need: int) -> int:
    """How many decompressed bytes ``path`` holds, counted up to ``need`` (more is not needed).

    The gzip trailer's ISIZE is the uncompressed size mod 2**32: when it agrees with ``need`` the
    file is taken at its word (a mismatch there is certain for a header that lies about its
    size). Otherwise (several gzip members, trailing data, a cut-off file) the stream is
    decompressed and counted without keeping it, stopping at ``need`` or where it breaks off.
    """
    size = path.stat().st_size
    if size >= 18:  # 10-byte header + 8-byte trailer
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == need % 2**32:
                return need
    count = 0
    try:
        with open(path, "rb") as fh:
            inflater = zlib.decompressobj(wbits=31)
            while count < need:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                while chunk and count < need:
                    count += len(inflater.decompress(chunk, 1 << 24))
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:  # a next gzip member may follow
                        rest = inflater.unused_data
                        inflater = zlib.decompressobj(wbits=31)
                        chunk = rest + chunk
    except zlib.error:
        pass  # a corrupt stream holds what was decoded before the damage
    return count


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


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
    check_spacing_mm(img.GetSpacing(), f"voxel size in the header (spacing) of {path.name}")
    return data, lps_to_ras(affine_lps)


def load_source_item(item: SourceItem) -> Volume:
    """Read what a discovered item points to, with the item's case id and modality.

    DICOM items go through :func:`preprocessing.dicom.series.read_dicom_series`; file items with
    several paths are MSD channels (``CASE_0000``, ``CASE_0001``...), stacked on the channel axis
    after checking they share one grid. A single file with a 4th axis longer than 1 is read as
    channels only when ``item.meta["declared_channels"]`` (an MSD dataset.json) says it has that
    many; otherwise it is refused before its data is read.

    Raises:
        IngestError / GeometryError: with a reason naming the input.
    """
    if item.kind == "dicom":
        from preprocessing.dicom.series import read_dicom_series  # imported here: pydicom decoders are heavy

        volume = read_dicom_series(item.paths)
    elif item.kind in ("nifti", "itk"):
        volume = _read_channels(item.paths, int(item.meta.get("declared_channels", 0) or 0))
    else:
        raise IngestError(f"{item.paths[0] if item.paths else '?'}: nothing to read ({item.kind})")
    # replace() keeps everything the reader filled in (the DICOM source for the SEG writer).
    return replace(volume, case_id=item.case_id, modality=volume.modality or item.modality)


def _read_channels(paths: tuple[Path, ...], declared_channels: int = 0) -> Volume:
    """One image from one file, or from MSD channel files (one 3D file per channel)."""
    allowed = declared_channels if len(paths) == 1 and declared_channels > 1 else 1
    for path in paths:
        if image_file_kind(path) == "nifti":
            shape = _load_nifti_header(path).header.get_data_shape()
            _check_volume_count(path, int(shape[3]) if len(shape) > 3 else 1, allowed, declared_channels)
    volumes = [read_volume(p) for p in paths]
    for volume, path in zip(volumes, paths, strict=True):
        _check_volume_count(path, volume.array.shape[0], allowed, declared_channels)
    if len(volumes) == 1:
        return volumes[0]
    first = volumes[0]
    for other, path in zip(volumes[1:], paths[1:], strict=True):
        if other.spatial_shape != first.spatial_shape or not np.allclose(
            other.affine_ras, first.affine_ras, atol=GRID_TOL_MM
        ):
            raise IngestError(f"channel {path} is on a different grid than {paths[0]}")
    dtype = np.result_type(*[v.array.dtype for v in volumes])
    array = np.concatenate([v.array.astype(dtype, copy=False) for v in volumes], axis=0)
    return Volume(array, first.affine_ras, source=os.fspath(paths[0].parent))


def _check_volume_count(path: Path, n_volumes: int, allowed: int, declared_channels: int) -> None:
    """Refuse a file holding ``n_volumes`` > 1 volumes (4th axis or vector voxels) unless it holds ``allowed``."""
    if n_volumes == 1 or n_volumes == allowed:
        return
    if declared_channels > 1:
        raise IngestError(
            f"{path}: 4D image with {n_volumes} volumes, but dataset.json declares {declared_channels} channels"
            + ("" if allowed > 1 else " as separate files (CASE_0000, CASE_0001, ...)")
        )
    raise IngestError(
        f"{path}: 4D image with {n_volumes} volumes (a time series, or several images in one file); split it "
        "into 3D files, or declare its volumes as channels in an MSD dataset.json"
    )


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
