"""Medical Segmentation Decathlon (MSD) training datasets: reading and validating the layout.

An MSD dataset folder holds ``dataset.json``, ``imagesTr/`` and ``labelsTr/``. Images are either
one 4D NIfTI per case (``X, Y, Z, C``) or one 3D file per channel named ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... (nnU-Net v2 style). Labels are 3D integer NIfTI files on the same grid.

Validation (before any training, like ``medseg predict``'s reader): every image and label is read in
full; a truncated or corrupt file, NaN/Inf image voxels, label values that are not integers, not
declared in ``dataset.json`` or outside 0..255 (:data:`MAX_LABEL_VALUE`: masks and label maps are 8-bit)
are a :class:`DatasetError` naming the case and the file.

Patients: a ``training`` entry may carry ``patient_id``; alternatively a ``patients.csv`` next to
``dataset.json`` maps ``case_id,patient_id``. Patient ids are used only to keep a patient's cases in
one cross-validation fold; they never leave this process (see ``preprocessing.splits``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from preprocessing.errors import DatasetError
from preprocessing.image import GRID_TOL_MM
from preprocessing.image_files import NIFTI_SUFFIXES, image_file_kind, strip_image_suffix

logger = logging.getLogger(__name__)

# nnU-Net v2 channel files: ``<case>_0000``, ``<case>_0001``, ... (four digits).
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# A label map index written as a JSON key: "0", "1", ... (MSD style; "-1" is read, then refused).
_INDEX_KEY = re.compile(r"^-?\d+$")
#: Largest label value: label maps are read and masks written as 8-bit (uint8), so larger values would
#: wrap (256 -> background). Renumber such labels 1..K in dataset.json and the label files.
MAX_LABEL_VALUE = 255
# What nibabel / gzip / zlib raise on a truncated or corrupt file.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


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
    meta = _read_dataset_json(meta_path)
    labels = _parse_index_map(meta.get("labels"), meta_path, "labels")
    labels.setdefault(0, "background")
    out_of_range = {k: v for k, v in labels.items() if not 0 <= k <= MAX_LABEL_VALUE}
    if out_of_range:
        raise DatasetError(
            f"{meta_path}: label values {sorted(out_of_range)} ({', '.join(out_of_range.values())}) are outside "
            f"0..{MAX_LABEL_VALUE}; medseg keeps labels in 8 bits, so renumber them (e.g. 1..K) in dataset.json "
            "and in the label files"
        )
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


def read_dataset_labels(path: str | Path) -> dict[int, str]:
    """The ``labels`` of a ``dataset.json``: label value -> name, as declared (background included if it is).

    Accepts MSD's ``{"0": "background", "1": "liver"}`` and nnU-Net v2's
    ``{"background": 0, "liver": 1}`` (region lists are not supported).

    Raises:
        DatasetError: the file is not JSON or not an object, or ``labels`` is missing, empty, or
            has an entry that is neither style; the message names the file and the entry.
    """
    path = Path(path)
    return _parse_index_map(_read_dataset_json(path).get("labels"), path, "labels")


def _read_dataset_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(
            f"{path}: holds a JSON {type(meta).__name__}, expected an object with 'labels', 'modality' "
            'and \'training\' (e.g. {"labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"}})'
        )
    return meta


def _parse_index_map(raw: object, where: Path, key: str) -> dict[int, str]:
    """A ``dataset.json`` index map -> ``{index: name}`` sorted by index.

    Args:
        raw: the JSON value: MSD style ``{"0": "CT"}`` (index keys) or nnU-Net v2 style
            ``{"liver": 1}`` (index values: an integer, or a string of one).
        where: the file, for messages.
        key: the map's name in the file (``"labels"``, ``"modality"``), for messages.

    Raises:
        DatasetError: ``raw`` is not a non-empty object, or an entry is neither style.
    """
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: missing or empty '{key}' mapping")
    out: dict[int, str] = {}
    for name_or_index, value in raw.items():
        if _INDEX_KEY.match(str(name_or_index)):
            out[int(name_or_index)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[value] = str(name_or_index)
        elif isinstance(value, str) and _INDEX_KEY.match(value):
            out[int(value)] = str(name_or_index)
        else:
            regions = " (nnU-Net region lists are not supported)" if isinstance(value, list) else ""
            raise DatasetError(
                f"{where}: '{key}' entry {name_or_index!r}: {value!r} is neither MSD style "
                f'({{"1": "liver"}}) nor nnU-Net v2 style ({{"liver": 1}}){regions}'
            )
    return dict(sorted(out.items()))


def group_case_channels(paths: Iterable[Path]) -> dict[str, list[tuple[int, Path]]]:
    """Image files of an MSD ``imagesTr/``/``imagesTs/`` folder grouped into cases.

    ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``... (nnU-Net v2) are the channels of ``<case>``;
    any other image file is channel 0 of the case named by its stem (MSD: one 3D or 4D file per case).

    Args:
        paths: the case image files (already filtered: no hidden files, no non-images).

    Returns:
        case id -> ``(channel, path)`` sorted by channel, cases in the order first met.
    """
    cases: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in paths:
        stem = strip_image_suffix(path.name)
        match = _CHANNEL_FILE.match(stem)
        case_id, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        cases[case_id].append((channel, path))
    return {case_id: sorted(channels) for case_id, channels in cases.items()}


def channel_numbering_problem(channels: list[tuple[int, Path]]) -> str:
    """Why a case's channel numbers are not 0..C-1 ("" when they are)."""
    numbers = [c for c, _ in channels]
    if numbers == list(range(len(numbers))):
        return ""
    return f"channels {numbers} are not numbered 0..{len(numbers) - 1}"


def _is_nifti_case_file(path: Path) -> bool:
    # MSD archives ship macOS "._" junk files next to the images.
    return image_file_kind(path) == "nifti" and not path.name.startswith(".")


def _find_cases(root: Path, meta: dict) -> list[MsdCase]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        return []
    channel_files = group_case_channels(p for p in sorted(images_dir.iterdir()) if _is_nifti_case_file(p))
    patients = _read_patients(root, meta)
    cases = []
    for case_id, files in sorted(channel_files.items()):
        problem = channel_numbering_problem(files)
        if problem:
            raise DatasetError(f"case {case_id}: {problem}")
        label_path = next(
            (
                labels_dir / f"{case_id}{s}"
                for s in NIFTI_SUFFIXES
                if (labels_dir / f"{case_id}{s}").is_file()
            ),
            None,
        )
        if label_path is None:
            raise DatasetError(
                f"case {case_id}: image has no label in {labels_dir} (expected {case_id}.nii.gz)"
            )
        cases.append(MsdCase(case_id, tuple(p for _, p in files), label_path, patients.get(case_id)))
    return cases


def _read_patients(root: Path, meta: dict) -> dict[str, str]:
    """case id -> patient id from ``dataset.json`` training entries or ``patients.csv``."""
    patients: dict[str, str] = {}
    for entry in meta.get("training", []) or []:
        if isinstance(entry, dict) and entry.get("patient_id") is not None and entry.get("image"):
            image = Path(str(entry["image"]))
            if image_file_kind(image) == "nifti":
                (case_id,) = group_case_channels([image])
                patients[case_id] = str(entry["patient_id"])
    csv_path = root / "patients.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("case_id") and row.get("patient_id"):
                    patients[row["case_id"].strip()] = row["patient_id"].strip()
    return patients


def validate_case(case: MsdCase, dataset: MsdDataset) -> None:
    """Check one case: channel count, image/label shape and affine, label values.

    Reads every file in full: a truncated/corrupt file or NaN/Inf image voxels are errors too.

    Raises:
        DatasetError: naming the case, the file and the problem.
    """
    label_img = _load(case.label_path, case)
    label_shape = tuple(int(s) for s in label_img.shape[:3])
    if len(label_img.shape) > 3 and int(np.prod(label_img.shape[3:])) != 1:
        raise DatasetError(
            f"case {case.case_id}: label {case.label_path.name} is not 3D (shape {label_img.shape})"
        )
    n_channels = 0
    images = [(path, _load(path, case)) for path in case.image_paths]
    for path, img in images:
        shape = tuple(int(s) for s in img.shape[:3])
        n_channels += int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1
        if shape != label_shape:
            raise DatasetError(
                f"case {case.case_id}: image {path.name} has shape {shape} but its label has {label_shape}; "
                "image and label must be on the same voxel grid"
            )
        if not np.allclose(img.affine, label_img.affine, atol=GRID_TOL_MM):
            raise DatasetError(
                f"case {case.case_id}: image {path.name} and its label have different affines "
                f"(max difference {np.abs(img.affine - label_img.affine).max():.4g} mm); resample the label onto the image grid"
            )
    if n_channels != dataset.num_channels:
        raise DatasetError(
            f"case {case.case_id}: {n_channels} image channels but dataset.json declares {dataset.num_channels} modalities"
        )
    for path, img in images:
        _check_finite(_read_voxels(img, path, case), path, case)
    values = np.unique(_read_voxels(label_img, case.label_path, case))
    if not np.all(np.equal(np.round(values), values)):
        raise DatasetError(f"case {case.case_id}: label map has non-integer values; labels must be integers")
    unknown = sorted(set(int(v) for v in values) - set(dataset.labels))
    if unknown:
        raise DatasetError(
            f"case {case.case_id}: label values {unknown} are not declared in dataset.json labels {sorted(dataset.labels)}"
        )


def _load(path: Path, case: MsdCase) -> nib.Nifti1Image:
    try:
        return cast(nib.Nifti1Image, nib.load(str(path)))
    except _READ_ERRORS as exc:
        raise DatasetError(
            f"case {case.case_id}: cannot read {path} ({type(exc).__name__}: {exc}); "
            "the file is truncated or not a NIfTI image: copy or export it again, or remove the case"
        ) from exc


def _read_voxels(img: nib.Nifti1Image, path: Path, case: MsdCase) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise DatasetError(
            f"case {case.case_id}: cannot read the voxels of {path} ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt: copy or export it again, or remove the case"
        ) from exc


def _check_finite(data: np.ndarray, path: Path, case: MsdCase) -> None:
    if data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise DatasetError(
            f"case {case.case_id}: image {path.name} has {bad} NaN/Inf voxel(s); training on it would make "
            "the network's weights NaN. Fix the image (e.g. replace NaN by the background value) or remove the case"
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
    if label.size and (label.min() < 0 or label.max() > MAX_LABEL_VALUE):
        raise DatasetError(
            f"case {case.case_id}: label values outside 0..{MAX_LABEL_VALUE} in {case.label_path.name} "
            f"(min {label.min()}, max {label.max()}); medseg keeps labels in 8 bits, renumber them"
        )
    label = np.rint(label).astype(np.uint8).reshape(label.shape[:3])
    return np.stack(channels).astype(np.float32), label, np.asarray(affine, dtype=np.float64)
