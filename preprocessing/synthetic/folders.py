"""A synthetic "hospital export" folder: mixed DICOM series, NIfTI files, non-image objects and junk.

Public: :class:`SeriesTruth`, :data:`DEFAULT_PATIENTS`, :func:`write_hospital_folder`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from preprocessing.atomic import write_bytes_atomic
from preprocessing.image import pseudonymous_case_id, sanitize_case_id
from preprocessing.synthetic.dicom import DicomSeriesSpec, stored_values, write_dicom_series
from preprocessing.synthetic.enhanced import write_enhanced_dicom, write_text_sr
from preprocessing.synthetic.nifti import write_nifti
from preprocessing.synthetic.phantom import LABEL_NAMES, make_phantom, orientation_affine

logger = logging.getLogger(__name__)

DEFAULT_PATIENTS: tuple[DicomSeriesSpec, ...] = (
    DicomSeriesSpec(),
    DicomSeriesSpec(
        patient_name="ROE^RICHARD^SYNTH",
        patient_id="SYNTH-PID-0002",
        birth_date="19651231",
        sex="M",
        accession="SYNTHACC02",
        study_date="20240315",
    ),
)
"""Fake identities (patient 1 and 2) used by :func:`write_hospital_folder`; distinctive for PHI scans."""

# Every grid of one patient sees the same body box (half size R, A, S in mm) so series of
# different orientation show the same anatomy in world space.
_BODY_HALF_EXTENT_MM = (36.0, 36.0, 36.0)
_FOV_MM = 72.0


@dataclass(frozen=True, eq=False)
class SeriesTruth:
    """Ground truth of one image object written by :func:`write_hospital_folder`.

    Attributes:
        kind: "dicom" (single-frame series), "enhanced" (one multi-frame file) or "nifti".
        series_uid: SeriesInstanceUID ("" for NIfTI).
        case_id: the id ingestion should give it: ``pseudonymous_case_id(series_uid)`` for DICOM,
            ``sanitize_case_id(file stem)`` for NIfTI.
        files: the files of this object, in slice order k for single-frame series.
        orientation: "axial", "sagittal", "coronal" or "oblique".
        modality: "CT" or "MR".
        affine_ras: 4x4 voxel->RAS affine of the written grid (what a correct reader returns).
        image: float32 ``(X, Y, Z)`` values a correct reader returns (HU for CT; already quantised
            to the stored integers and rescaled for DICOM).
        label: uint8 ``(X, Y, Z)`` ground truth on the same grid.
        label_names: label value -> name (background 0 omitted).
        identity: the fake patient identity written into the headers (empty for NIfTI).
        description: SeriesDescription / a short text for NIfTI.
        transfer_syntax: transfer syntax UID ("" for NIfTI).
    """

    kind: str
    series_uid: str
    case_id: str
    files: tuple[Path, ...]
    orientation: str
    modality: str
    affine_ras: np.ndarray
    image: np.ndarray
    label: np.ndarray
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABEL_NAMES))
    identity: dict[str, str] = field(default_factory=dict)
    description: str = ""
    transfer_syntax: str = ""


@dataclass(frozen=True)
class _Recipe:
    """One image object of the hospital folder."""

    folder: str
    patient: int
    orientation: str
    modality: str
    kind: str
    in_plane_mm: tuple[float, float]
    signed: bool = True
    transfer_syntax: str = "1.2.840.10008.1.2.1"
    rescale_slope: float = 1.0
    name: str = ""


# Chosen to exercise one reader trap each (see the descriptions); write_hospital_folder(n_series=k)
# writes the first k, cycling with new seeds when k is larger.
_RECIPES: tuple[_Recipe, ...] = (
    _Recipe("PAT1/STUDY1/SER_A", 0, "axial", "CT", "dicom", (1.5, 1.5)),
    _Recipe("PAT1/STUDY1/MIXED", 0, "sagittal", "CT", "dicom", (1.5, 1.5), signed=False),
    _Recipe("PAT1/STUDY1/MIXED", 0, "coronal", "CT", "dicom", (1.3, 1.7), transfer_syntax=RLELossless),
    _Recipe("PAT2/STUDY1/MR", 1, "oblique", "MR", "dicom", (1.4, 1.6), signed=False, rescale_slope=0.25),
    _Recipe("PAT2/STUDY1/ENH", 1, "axial", "CT", "enhanced", (1.2, 1.6)),
    _Recipe("nifti", 2, "axial", "CT", "nifti", (1.5, 1.5), name="abdomen_ct"),
    _Recipe("nifti/followup", 3, "oblique", "CT", "nifti", (1.5, 1.5), name="followup_ct"),
    _Recipe("PAT2/STUDY2/deep/nested", 1, "axial", "CT", "dicom", (1.5, 1.5), False, JPEGLSLossless),
    _Recipe("PAT1/STUDY2", 0, "axial", "CT", "dicom", (1.5, 1.5), False, JPEG2000Lossless),
)


def _grid(recipe: _Recipe, shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid covering the same ~72 mm box in every orientation (anisotropic in plane)."""
    spacing = (recipe.in_plane_mm[0], recipe.in_plane_mm[1], round(_FOV_MM / shape[2], 3))
    return orientation_affine(recipe.orientation, spacing, shape=shape)


def _identity(spec: DicomSeriesSpec) -> dict[str, str]:
    return {
        "patient_name": spec.patient_name,
        "patient_id": spec.patient_id,
        "birth_date": spec.birth_date,
        "accession": spec.accession,
    }


def _write_one(
    root: Path,
    index: int,
    recipe: _Recipe,
    shape: tuple[int, int, int],
    seed: int,
    patients: Sequence[DicomSeriesSpec],
) -> SeriesTruth:
    """Render and write one recipe; returns its truth."""
    cycle = index // len(_RECIPES)
    folder = root / (recipe.folder if cycle == 0 else f"{recipe.folder}_{cycle}")
    affine = _grid(recipe, shape)
    image, label = make_phantom(
        shape,
        modality=recipe.modality,
        seed=seed * 100 + recipe.patient + 10 * cycle,  # one anatomy per patient and cycle
        affine_ras=affine,
        body_half_extent_mm=_BODY_HALF_EXTENT_MM,
        noise_seed=seed * 100 + index,
    )
    description = f"SYNTH {recipe.modality} {recipe.orientation.upper()}"
    if recipe.kind == "nifti":
        stem = recipe.name if cycle == 0 else f"{recipe.name}_{cycle}"
        return _write_nifti_recipe(folder / f"{stem}.nii.gz", recipe, image, label, affine, description)
    spec = _series_spec(recipe, index, seed, patients, description)
    if recipe.kind == "enhanced":
        files: tuple[Path, ...] = (
            write_enhanced_dicom(image, affine, folder / _random_name(spec.seed, "enh"), spec),
        )
    else:
        files = tuple(write_dicom_series(image, affine, folder, spec))
    quantised = (
        stored_values(image, spec) * spec.rescale_slope + float(spec.rescale_intercept or 0.0)
    ).astype(np.float32)
    assert spec.series_uid is not None
    return SeriesTruth(
        recipe.kind,
        spec.series_uid,
        pseudonymous_case_id(spec.series_uid),
        files,
        recipe.orientation,
        recipe.modality,
        affine,
        quantised,
        label,
        identity=_identity(spec),
        description=description,
        transfer_syntax=spec.transfer_syntax,
    )


def _write_nifti_recipe(
    path: Path, recipe: _Recipe, image: np.ndarray, label: np.ndarray, affine: np.ndarray, description: str
) -> SeriesTruth:
    """Write a NIfTI recipe (the oblique one with a misleading qform); returns its truth."""
    write_nifti(image, affine, path, qform_differs=recipe.orientation == "oblique")
    return SeriesTruth(
        "nifti",
        "",
        sanitize_case_id(path.name.removesuffix(".nii.gz")),
        (path,),
        recipe.orientation,
        recipe.modality,
        affine.astype(np.float32).astype(np.float64),  # NIfTI stores the sform as float32
        image,
        label,
        description=description,
    )


def _series_spec(
    recipe: _Recipe, index: int, seed: int, patients: Sequence[DicomSeriesSpec], description: str
) -> DicomSeriesSpec:
    """Header content of recipe ``index``: its patient's identity, UIDs derived from ``seed``."""
    # Study and frame-of-reference UIDs follow the folder seed, so two folders never share UIDs.
    base = replace(
        patients[recipe.patient % len(patients)], seed=seed, study_uid=None, frame_of_reference_uid=None
    )
    return base.with_series(
        series_number=index + 1,
        series_description=description,
        modality=recipe.modality,
        signed=recipe.signed,
        transfer_syntax=recipe.transfer_syntax,
        shuffle_names=True,
        shuffle_instance_numbers=True,
        rescale_slope=recipe.rescale_slope,
        rescale_intercept=None,
        window_center=40.0 if recipe.modality == "CT" else 400.0,
        window_width=400.0 if recipe.modality == "CT" else 800.0,
        seed=seed * 100 + index,
    )


def _random_name(seed: int, salt: str) -> str:
    """An extensionless upper-case hex file name, as many PACS exports use."""
    rng = np.random.default_rng([seed, sum(salt.encode())])
    return rng.bytes(8).hex().upper()


def _write_non_images(root: Path, seed: int, patients: Sequence[DicomSeriesSpec]) -> None:
    """A Basic Text SR next to image series, a fake DICOMDIR, a text note and binary junk."""
    sr_spec = patients[0].with_series(series_number=99, series_description="SYNTH REPORT", seed=seed)
    write_text_sr(root / "PAT1/STUDY1/MIXED" / _random_name(seed, "sr"), sr_spec)
    write_bytes_atomic(root / "DICOMDIR", b"not a DICOM file: a leftover from a CD export\n")
    write_bytes_atomic(
        root / "PAT1" / "README.txt", b"Exported by SYNTH PACS. Contains no real patient data.\n"
    )
    junk = np.random.default_rng([seed, 97]).bytes(777)
    write_bytes_atomic(root / "PAT2/STUDY1/MR" / _random_name(seed, "junk"), junk)


def write_hospital_folder(
    root: str | Path,
    n_series: int = len(_RECIPES),
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (48, 48, 24),
    truth_dir: str | Path | None = None,
    patients: Sequence[DicomSeriesSpec] = DEFAULT_PATIENTS,
) -> list[SeriesTruth]:
    """Write a messy, nested DICOM + NIfTI folder such as a hospital export, with its ground truth.

    Contents with the default ``n_series`` (9): under ``PAT1/`` and ``PAT2/`` nested study folders
    with extensionless random file names and shuffled InstanceNumbers: CT axial (int16), CT
    sagittal (uint16, intercept -1024) and CT coronal (RLE Lossless, 1.3 x 1.7 mm pixels) sharing
    one folder, MR oblique (uint16, slope 0.25), an Enhanced CT multi-frame file, CT axial JPEG-LS
    and JPEG 2000 lossless series; two NIfTI files (one axial, one oblique whose qform differs from
    its sform). Always added: a Basic Text SR among the CT images, a text "DICOMDIR", a README and
    a binary junk file. All grids cover the same ~72 mm body box so a patient's series show the
    same anatomy in world space.

    Args:
        root: output folder (created).
        n_series: number of image objects (DICOM series, Enhanced files, NIfTI files).
        seed: seed of anatomy, noise, names and UIDs.
        shape: ``(X, Y, Z)`` of every grid.
        truth_dir: if given, each label map is also written there as ``<case_id>.nii.gz`` on its
            object's grid (``medseg predict --labels`` can evaluate against it).
        patients: identities (patient name/ID/birth date/accession) of PAT1, PAT2; their UIDs are
            re-derived from ``seed``.

    Returns:
        One :class:`SeriesTruth` per image object, in writing order.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    truths = []
    for index in range(n_series):
        truth = _write_one(root, index, _RECIPES[index % len(_RECIPES)], shape, seed, patients)
        truths.append(truth)
        if truth_dir is not None:
            write_nifti(truth.label, truth.affine_ras, Path(truth_dir) / f"{truth.case_id}.nii.gz")
    _write_non_images(root, seed, patients)
    logger.info("wrote %d synthetic image objects under %s", len(truths), root)
    return truths
