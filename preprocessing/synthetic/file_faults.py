"""Deliberately broken NIfTI files and file-system traps for ingestion tests.

NIfTI faults use the grid of the DICOM faults (:data:`preprocessing.synthetic.dicom_faults.FAULT_SHAPE`)
and return the file they wrote; the traps (FIFOs, link loops) return what they created.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing.synthetic.dicom_faults import FAULT_SHAPE, FAULT_SPACING_MM
from preprocessing.synthetic.nifti import write_nifti
from preprocessing.synthetic.phantom import make_phantom, orientation_affine


def write_bad_nan_nifti(
    path: str | Path, seed: int = 0, *, fraction: float = 1.0, shape: tuple[int, int, int] = FAULT_SHAPE
) -> Path:
    """A float32 NIfTI whose first ``fraction`` of slices (all by default) are NaN.

    A reader should refuse it (or report non-finite voxels); never feed NaN to a network.
    """
    affine = orientation_affine("axial", FAULT_SPACING_MM, shape=shape)
    image, _ = make_phantom(shape, seed=seed, affine_ras=affine)
    n_bad = max(1, int(round(fraction * shape[2])))
    image[:, :, :n_bad] = np.nan
    return write_nifti(image, affine, path)


def write_bad_truncated_nifti(
    path: str | Path, seed: int = 0, *, shape: tuple[int, int, int] = FAULT_SHAPE
) -> Path:
    """A ``.nii.gz`` cut to half its bytes (corrupt gzip stream): the header may load, data does not."""
    path = Path(path)
    affine = orientation_affine("axial", FAULT_SPACING_MM, shape=shape)
    image, _ = make_phantom(shape, seed=seed, affine_ras=affine)
    write_nifti(image, affine, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_bad_4d_nifti(
    path: str | Path, seed: int = 0, *, n_volumes: int = 3, shape: tuple[int, int, int] = FAULT_SHAPE
) -> Path:
    """A float32 NIfTI of shape (x, y, z, ``n_volumes``): a time series, not the channels of one image."""
    affine = orientation_affine("axial", FAULT_SPACING_MM, shape=shape)
    image, _ = make_phantom(shape, seed=seed, affine_ras=affine)
    stack = np.stack([image + 10.0 * t for t in range(n_volumes)], axis=-1).astype(np.float32)
    return write_nifti(stack, affine, path)


def write_bad_oversized_nifti(
    path: str | Path, *, declared_shape: tuple[int, int, int] = (2048, 2048, 1024)
) -> Path:
    """A NIfTI whose header declares ``declared_shape`` int16 (8 GiB by default) but holds 1 KiB of data.

    ``.nii`` or ``.nii.gz`` by the suffix. A reader must compare the declared size with the file
    before allocating it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_shape(declared_shape)
    header.set_data_dtype(np.int16)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\0" * 4 + b"\1" * 1024
    if path.name.endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_bad_special_files(out_dir: str | Path) -> list[Path]:
    """A named pipe (FIFO) ``scan.dcm`` and ``image.nii.gz`` in ``out_dir``: opening one blocks for ever."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "scan.dcm", out / "image.nii.gz"]
    for path in paths:
        os.mkfifo(path)
    return paths


def write_bad_symlinks(out_dir: str | Path, target: str | Path) -> dict[str, Path]:
    """Links in ``out_dir``: a loop to the folder itself, a self-loop, a broken link, and a link to
    the folder ``target`` (outside ``out_dir``; followed once). Returns name -> link path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    links = {
        "dir_loop": out / "back_to_parent",
        "self_loop": out / "self_loop.dcm",
        "broken": out / "broken.nii.gz",
        "outside": out / "linked_series",
    }
    links["dir_loop"].symlink_to(".", target_is_directory=True)
    links["self_loop"].symlink_to(links["self_loop"].name)
    links["broken"].symlink_to("does_not_exist.nii.gz")
    links["outside"].symlink_to(os.path.abspath(target), target_is_directory=True)
    return links
