"""Medical Segmentation Decathlon (MSD) training datasets: reading and validating the layout.

An MSD dataset folder holds ``dataset.json``, ``imagesTr/`` and ``labelsTr/``. Images are either
one 4D NIfTI per case (``X, Y, Z, C``) or one 3D file per channel named ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... (nnU-Net v2 style). Labels are 3D integer NIfTI files on the same grid.

Patients: a ``training`` entry may carry ``patient_id``; alternatively a ``patients.csv`` next to
``dataset.json`` maps ``case_id,patient_id``. Patient ids are used only to keep a patient's cases in
one cross-validation fold; they never leave this process (see ``preprocessing.splits``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from preprocessing.errors import DatasetError

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# Affines of an image and its label must agree to this many millimetres (float32 headers).
_AFFINE_TOL_MM = 1e-3


@dataclass(frozen=True)
class MsdCase:
    """One training case.

    Attributes:
        case_id: file-name stem of the case (``liver_003``); the hospital chose it, so it is only
            ever logged as-is where the brief allows (splits), never together with patient ids.
        image_paths: one path per channel, or a single 4D NIfTI path.
        label_path: 3D integer label map on the image grid.
        patient_id: grouping key for patient-level folds, or ``None`` (each case its own patient).
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path
    patient_id: str | None = None


@dataclass(frozen=True)
class MsdDataset:
    """A validated MSD training dataset.

    Attributes:
        root: dataset folder.
        name: ``dataset.json`` "name".
        modalities: channel index -> modality name ("CT", "MRI", "T2", ...).
        labels: label value -> name, background (0) included.
        cases: training cases sorted by case id.
    """

    root: Path
    name: str
    modalities: dict[int, str]
    labels: dict[int, str]
    cases: tuple[MsdCase, ...]

    @property
    def foreground_labels(self) -> dict[int, str]:
        """Labels without background, ``{1: "liver", ...}``."""
        return {k: v for k, v in self.labels.items() if k != 0}

    @property
    def num_channels(self) -> int:
        return len(self.modalities)


def read_msd_dataset(root: str | Path, check_geometry: bool = True) -> MsdDataset:
    """Read and validate an MSD training dataset.

    Args:
        root: the dataset folder (containing ``dataset.json``).
        check_geometry: compare every image's shape and affine with its label's (headers only) and
            check label values against ``dataset.json`` (reads the label voxels).

    Returns:
        The dataset with cases sorted by case id.

    Raises:
        DatasetError: missing ``dataset.json``, an image without label, an empty dataset,
            mismatched geometry or label values not declared in ``dataset.json``; the message
            names the case and says what to fix.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(
            f"{root}: no dataset.json; expected an MSD dataset folder (dataset.json, imagesTr/, labelsTr/)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from exc
    labels = _parse_index_map(meta.get("labels"), meta_path, "labels")
    labels.setdefault(0, "background")
    modalities = _parse_index_map(meta.get("modality") or meta.get("channel_names"), meta_path, "modality")
    cases = _find_cases(root, meta)
    if not cases:
        raise DatasetError(f"{root}: the dataset has no training cases (imagesTr/ is empty or missing)")
    dataset = MsdDataset(root, str(meta.get("name", root.name)), modalities, labels, tuple(cases))
    if check_geometry:
        for case in dataset.cases:
            validate_case(case, dataset)
    logger.info("MSD dataset %s: %d cases, labels %s", dataset.name, len(cases), dataset.foreground_labels)
    return dataset


def _parse_index_map(raw: object, where: Path, key: str) -> dict[int, str]:
    """``{"0": "CT"}`` or nnU-Net v2's ``{"liver": 1}`` -> ``{0: "CT"}``."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: missing or empty '{key}' mapping")
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            index, name = (int(k), str(v)) if str(k).isdigit() else (int(v), str(k))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: '{key}' entry {k!r}: {v!r} is not index -> name") from exc
        out[index] = name
    return dict(sorted(out.items()))


def _strip_nifti(name: str) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_cases(root: Path, meta: dict) -> list[MsdCase]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        return []
    channel_files: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(images_dir.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is None or path.name.startswith("."):  # MSD archives ship macOS "._" junk files
            continue
        match = _CHANNEL_FILE.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        channel_files.setdefault(case_id, []).append((channel, path))
    patients = _read_patients(root, meta)
    cases = []
    for case_id, files in sorted(channel_files.items()):
        channels = [c for c, _ in sorted(files)]
        if channels != list(range(len(files))):
            raise DatasetError(
                f"case {case_id}: channel files {channels} are not numbered 0..{len(files) - 1}"
            )
        label_path = next(
            (
                labels_dir / f"{case_id}{s}"
                for s in _NIFTI_SUFFIXES
                if (labels_dir / f"{case_id}{s}").is_file()
            ),
            None,
        )
        if label_path is None:
            raise DatasetError(
                f"case {case_id}: image has no label in {labels_dir} (expected {case_id}.nii.gz)"
            )
        cases.append(MsdCase(case_id, tuple(p for _, p in sorted(files)), label_path, patients.get(case_id)))
    return cases


def _read_patients(root: Path, meta: dict) -> dict[str, str]:
    """case id -> patient id from ``dataset.json`` training entries or ``patients.csv``."""
    patients: dict[str, str] = {}
    for entry in meta.get("training", []) or []:
        if isinstance(entry, dict) and entry.get("patient_id") is not None and entry.get("image"):
            stem = _strip_nifti(Path(str(entry["image"])).name)
            if stem is not None:
                match = _CHANNEL_FILE.match(stem)
                patients[match["case"] if match else stem] = str(entry["patient_id"])
    csv_path = root / "patients.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("case_id") and row.get("patient_id"):
                    patients[row["case_id"].strip()] = row["patient_id"].strip()
    return patients


def validate_case(case: MsdCase, dataset: MsdDataset) -> None:
    """Check one case: channel count, image/label shape and affine, label values.

    Raises:
        DatasetError: naming the case and the mismatch.
    """
    label_img = cast(nib.Nifti1Image, nib.load(str(case.label_path)))
    label_shape = tuple(int(s) for s in label_img.shape[:3])
    if len(label_img.shape) > 3 and int(np.prod(label_img.shape[3:])) != 1:
        raise DatasetError(
            f"case {case.case_id}: label {case.label_path.name} is not 3D (shape {label_img.shape})"
        )
    n_channels = 0
    for path in case.image_paths:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        shape = tuple(int(s) for s in img.shape[:3])
        n_channels += int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1
        if shape != label_shape:
            raise DatasetError(
                f"case {case.case_id}: image {path.name} has shape {shape} but its label has {label_shape}; "
                "image and label must be on the same voxel grid"
            )
        if not np.allclose(img.affine, label_img.affine, atol=_AFFINE_TOL_MM):
            raise DatasetError(
                f"case {case.case_id}: image {path.name} and its label have different affines "
                f"(max difference {np.abs(img.affine - label_img.affine).max():.4g} mm); resample the label onto the image grid"
            )
    if n_channels != dataset.num_channels:
        raise DatasetError(
            f"case {case.case_id}: {n_channels} image channels but dataset.json declares {dataset.num_channels} modalities"
        )
    values = np.unique(np.asarray(label_img.dataobj))
    if not np.all(np.equal(np.round(values), values)):
        raise DatasetError(f"case {case.case_id}: label map has non-integer values; labels must be integers")
    unknown = sorted(set(int(v) for v in values) - set(dataset.labels))
    if unknown:
        raise DatasetError(
            f"case {case.case_id}: label values {unknown} are not declared in dataset.json labels {sorted(dataset.labels)}"
        )


def load_case_arrays(case: MsdCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one case's voxels (NIfTI orientation, no resampling).

    Returns:
        ``(image float32 (C, X, Y, Z), label uint8 (X, Y, Z), affine_ras 4x4 float64)``; intensities
        as stored after NIfTI scaling (CT in HU).
    """
    channels: list[np.ndarray] = []
    affine = None
    for path in case.image_paths:
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = img.affine if affine is None else affine
        channels.extend([data] if data.ndim == 3 else np.moveaxis(data.reshape(*data.shape[:3], -1), -1, 0))
    label = np.asarray(cast(nib.Nifti1Image, nib.load(str(case.label_path))).dataobj)
    label = np.rint(label).astype(np.uint8).reshape(label.shape[:3])
    return np.stack(channels).astype(np.float32), label, np.asarray(affine, dtype=np.float64)
