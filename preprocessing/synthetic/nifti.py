"""Synthetic NIfTI files and a Medical Segmentation Decathlon (MSD / nnU-Net v2 style) dataset.

Public: :func:`write_nifti`, :func:`write_msd_dataset`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing.atomic import atomic_path, write_text_atomic
from preprocessing.synthetic.phantom import LABEL_NAMES, make_phantom, orientation_affine

logger = logging.getLogger(__name__)

# A deliberately wrong qform for ``qform_differs``: shifted and mirrored, so a reader that trusts
# the qform over a valid sform lands visibly elsewhere (nibabel uses the sform when sform_code > 0).
_QFORM_SHIFT_MM = np.array([12.0, -9.0, 6.0])


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    """Save through a temp file in the same folder, then rename: no half-written file is ever visible."""
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_nifti(
    image: np.ndarray, affine_ras: np.ndarray, path: str | Path, *, qform_differs: bool = False
) -> Path:
    """Write ``image`` as NIfTI-1 with the given voxel->RAS affine.

    Args:
        image: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array (MSD multi-channel layout); its dtype is
            kept (float32 images, uint8 labels).
        affine_ras: 4x4 voxel->RAS mm.
        path: ``.nii`` or ``.nii.gz`` file; parent folders are created.
        qform_differs: store ``affine_ras`` as the sform (sform_code 2, aligned) and a *different*
            qform (shifted by a few mm and mirrored in x; qform_code 1). nibabel's ``img.affine``
            is then the sform; readers that prefer the qform get the wrong geometry.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(image), affine_ras)
    img.set_sform(affine_ras, code=2 if qform_differs else 1)
    if qform_differs:
        qform = affine_ras.copy()
        qform[:3, 3] += _QFORM_SHIFT_MM
        qform[:, 0] *= np.array([-1.0, 1.0, 1.0, 1.0])
        img.set_qform(qform, code=1)
    else:
        img.set_qform(affine_ras, code=1)
    if image.ndim == 3:
        img.header.set_xyzt_units("mm")
    _atomic_save(img, path)
    return path


def _case_layout(n_train: int, with_patients: bool) -> list[int]:
    """Patient index of each training case: every other patient has two cases when ``with_patients``."""
    patients: list[int] = []
    p = 0
    while len(patients) < n_train:
        repeats = 2 if (with_patients and p % 2 == 0) else 1
        patients.extend([p] * repeats)
        p += 1
    return patients[:n_train]


def _channel_names(modality: str, n_channels: int) -> dict[str, str]:
    """Channel 0 is ``modality``; extra channels alternate CT / MR contrast ("CT", "MR", "CT_2", ...)."""
    other = "MR" if modality == "CT" else "CT"
    names: dict[str, str] = {}
    for c in range(n_channels):
        base = modality if c % 2 == 0 else other
        names[str(c)] = base if c < 2 else f"{base}_{c}"
    return names


def _render_case(
    anatomy_seed: int,
    noise_seed: int,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    channels: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: image (X, Y, Z) or (X, Y, Z, C) float32, label uint8, affine (origin varies per case)."""
    # The body box is as tall as it is wide (the in-plane half field of view), like the hospital
    # folder's 72 mm box, so organ shapes match between training data and hospital series. The
    # grid is shifted a little against the body: patients are never perfectly centred.
    half = float(np.mean((np.asarray(shape[:2]) - 1) * np.asarray(spacing_mm[:2]) / 2.0))
    affine = orientation_affine("axial", spacing_mm, shape=shape)
    affine[:3, 3] += np.random.default_rng([noise_seed, 5]).uniform(-0.15, 0.15, 3) * half
    imgs, label = [], np.zeros(shape, np.uint8)
    for c, name in enumerate(channels):
        modality = "CT" if name.startswith("CT") else "MR"
        img, label = make_phantom(
            shape,
            spacing_mm,
            modality,
            anatomy_seed,
            affine_ras=affine,
            body_half_extent_mm=(half, half, half),
            noise_seed=noise_seed * 16 + c,
        )
        imgs.append(img)
    image = imgs[0] if len(imgs) == 1 else np.stack(imgs, axis=-1)
    return image, label, affine


def write_msd_dataset(
    root: str | Path,
    n_train: int = 6,
    n_test: int = 2,
    shape: tuple[int, int, int] = (48, 48, 32),
    modality: str = "CT",
    seed: int = 0,
    with_patients: bool = True,
    *,
    n_channels: int = 1,
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0),
) -> Path:
    """Write a small MSD-layout dataset of seeded phantoms.

    Layout: ``root/dataset.json``, ``imagesTr/case_000.nii.gz`` ..., ``labelsTr/``, ``imagesTs/``,
    ``labelsTs/`` (test labels exist so evaluation can be checked). ``dataset.json`` has both the
    MSD keys (``modality``, ``training``, ``test``, ``numTraining``) and the nnU-Net v2 keys
    (``channel_names``, ``labels`` as name -> value, ``file_ending``). Training entries are
    ``{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz",
    "patient_id": "patient_000"}``; test entries are alike with ``imagesTs``/``labelsTs``.

    With ``with_patients`` every other patient contributes two cases (same anatomy, different
    noise and origin), so a case-level split leaks and a patient-level split does not.

    Args:
        root: output folder (created).
        n_train: number of training cases.
        n_test: number of test cases (their patients never appear in training).
        shape: ``(X, Y, Z)`` of every case.
        modality: "CT" or "MR" (channel 0).
        seed: dataset seed; the same seed rewrites identical files.
        with_patients: give some patients two training cases.
        n_channels: >1 writes 4D ``(X, Y, Z, C)`` images, extra channels alternating CT/MR contrast
            of the same anatomy (MSD multi-modal layout).
        spacing_mm: voxel spacing (i, j, k) in mm; grids are axial (RAS affine with i toward the
            patient's left, j posterior) with per-case origins.

    Returns:
        Path of ``dataset.json``.
    """
    root = Path(root)
    channels = list(_channel_names(modality, n_channels).values())
    patients = _case_layout(n_train, with_patients)
    n_train_patients = (max(patients) + 1) if patients else 0
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    cases = [("Tr", i, patients[i]) for i in range(n_train)] + [
        ("Ts", n_train + t, n_train_patients + t) for t in range(n_test)
    ]
    for split, index, patient in cases:
        image, label, affine = _render_case(
            seed * 1000 + patient, seed * 1000 + index, shape, spacing_mm, channels
        )
        name = f"case_{index:03d}.nii.gz"
        write_nifti(image, affine, root / f"images{split}" / name)
        write_nifti(label, affine, root / f"labels{split}" / name)
        entries["training" if split == "Tr" else "test"].append(
            {
                "image": f"./images{split}/{name}",
                "label": f"./labels{split}/{name}",
                "patient_id": f"patient_{patient:03d}",
            }
        )
    path = root / "dataset.json"
    dataset = _dataset_json(_channel_names(modality, n_channels), n_train, n_test) | entries
    write_text_atomic(path, json.dumps(dataset, indent=2))
    logger.info("wrote MSD dataset with %d training and %d test cases to %s", n_train, n_test, root)
    return path


def _dataset_json(channel_names: dict[str, str], n_train: int, n_test: int) -> dict[str, object]:
    """``dataset.json`` without its case lists: MSD keys and nnU-Net v2 keys side by side."""
    return {
        "name": "SyntheticAbdomen",
        "description": "Seeded synthetic phantoms (liver, kidney, lesion); not patient data.",
        "reference": "medseg synthetic generator",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "4D" if len(channel_names) > 1 else "3D",
        "modality": channel_names,
        "channel_names": channel_names,
        "labels": {"background": 0} | {name: value for value, name in LABEL_NAMES.items()},
        "file_ending": ".nii.gz",
        "numTraining": n_train,
        "numTest": n_test,
    }
