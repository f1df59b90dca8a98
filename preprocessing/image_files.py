"""Which image-file formats a path names, by its suffix: the one list of NIfTI and ITK suffixes.

Discovery, the MSD reader and the volume reader all decide "is this a NIfTI?" and "what is the
case id of this file?" from here, so a suffix added once is recognised everywhere.
"""

from __future__ import annotations

from pathlib import Path

#: NIfTI-1/2 files, longest first so ``x.nii.gz`` is not taken for ``x.nii`` + ``.gz``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Formats read through SimpleITK (NRRD, MetaImage), each with its detached-header variant.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def image_file_kind(path: Path) -> str:
    """``"nifti"``, ``"itk"`` or ``""`` (anything else, e.g. a DICOM file) by the case-insensitive suffix."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    return ""


def strip_image_suffix(name: str) -> str:
    """``name`` without its NIfTI/ITK suffix (matched case-insensitively); unchanged when it has none."""
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
