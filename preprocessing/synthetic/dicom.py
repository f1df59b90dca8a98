"""Synthetic single-frame DICOM series (CT / MR Image Storage) with headers derived from an affine.

Geometry (see GEOMETRY.md): the voxel->RAS affine is turned into LPS; its first column is the
DICOM row direction (increasing column index ``i``), the second the column direction (increasing
row index ``j``), the third the slice step. Slice ``k`` is the 2D array ``image[:, :, k].T`` with
shape ``(Rows, Columns) = (Y, X)``, and its ImagePositionPatient is the LPS position of voxel
``(0, 0, k)``. Reading the series back with any correct reader gives exactly ``affine_ras``
(as long as the slice step points along row x column; :func:`orientation_affine` grids do).

Public: :class:`DicomSeriesSpec`, :func:`write_dicom_series`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)

from preprocessing.atomic import atomic_path

logger = logging.getLogger(__name__)

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class DicomSeriesSpec:
    """Header content of one synthetic series. UIDs left ``None`` are derived from ``seed``.

    Attributes:
        modality: "CT" or "MR".
        patient_name, patient_id, birth_date, sex, accession: fake identity (distinctive strings so
            PHI-leak tests can scan outputs for them).
        study_uid, series_uid, frame_of_reference_uid: filled deterministically from ``seed``,
            ``patient_id`` and ``series_number`` when None.
        series_description, series_number, study_date, study_time: descriptive attributes.
        signed: pixels stored as int16 (PixelRepresentation 1) instead of uint16.
        transfer_syntax: transfer syntax UID; compressed ones (RLE Lossless, JPEG-LS Lossless,
            JPEG 2000 Lossless) are encoded with pydicom's encoders.
        shuffle_names: random extensionless file names instead of ``slice_000.dcm``...
        shuffle_instance_numbers: InstanceNumber in a seeded random order, not spatial order
            (catches readers that sort by it).
        rescale_slope, rescale_intercept: stored = round((value - intercept) / slope); intercept
            ``None`` means 0 for signed and -1024 for unsigned CT, 0 for MR.
        window_center, window_width: display window (HU for CT).
        manufacturer, institution: equipment attributes.
        seed: seed of derived UIDs, shuffles.
    """

    modality: str = "CT"
    patient_name: str = "DOE^JANE^SYNTH"
    patient_id: str = "SYNTH-PID-0001"
    birth_date: str = "19700101"
    sex: str = "F"
    accession: str = "SYNTHACC01"
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_description: str = "SYNTH AXIAL"
    series_number: int = 1
    study_date: str = "20240102"
    study_time: str = "101500"
    signed: bool = True
    transfer_syntax: str = ExplicitVRLittleEndian
    shuffle_names: bool = False
    shuffle_instance_numbers: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float | None = None
    window_center: float = 40.0
    window_width: float = 400.0
    manufacturer: str = "MEDSEG SYNTHETIC"
    institution: str = "SYNTH GENERAL HOSPITAL"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in _SOP_CLASS:
            raise ValueError(f"modality must be 'CT' or 'MR'; got {self.modality!r}")
        base = [str(self.seed), self.patient_id]
        if self.study_uid is None:
            object.__setattr__(self, "study_uid", generate_uid(entropy_srcs=[*base, "study"]))
        if self.frame_of_reference_uid is None:
            object.__setattr__(self, "frame_of_reference_uid", generate_uid(entropy_srcs=[*base, "for"]))
        if self.series_uid is None:
            uid = generate_uid(entropy_srcs=[*base, str(self.study_uid), str(self.series_number), "series"])
            object.__setattr__(self, "series_uid", uid)
        if self.rescale_intercept is None:
            default = -1024.0 if (self.modality == "CT" and not self.signed) else 0.0
            object.__setattr__(self, "rescale_intercept", default)

    def instance_uid(self, index: int) -> str:
        """Deterministic SOPInstanceUID of instance ``index`` (0-based) of this series."""
        return generate_uid(entropy_srcs=[str(self.series_uid), str(index), "sop"])

    def with_series(self, series_number: int, series_description: str, **changes: Any) -> DicomSeriesSpec:
        """A spec for another series of the same study and patient (new series UID)."""
        return replace(
            self,
            series_number=series_number,
            series_description=series_description,
            series_uid=None,
            **changes,
        )


def affine_to_dicom_geometry(affine_ras: np.ndarray) -> dict[str, np.ndarray | list[float] | float]:
    """DICOM plane geometry of a voxel->RAS affine.

    Returns:
        dict with ``iop`` (6 floats: row cosine, column cosine; LPS), ``pixel_spacing``
        ([row spacing = along j, column spacing = along i] mm), ``slice_step`` (mm, signed along the
        normal), ``normal`` (LPS), ``affine_lps``.

    Raises:
        ValueError: if the affine's axes are not orthogonal (a sheared grid cannot be one IOP).
    """
    aff_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    cols = aff_lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    unit = cols / spacing
    if np.max(np.abs(unit.T @ unit - np.eye(3))) > 1e-6:
        raise ValueError("affine axes are not orthogonal; a DICOM series cannot represent a sheared grid")
    normal = np.cross(unit[:, 0], unit[:, 1])
    step = float(np.dot(cols[:, 2], normal))
    iop = [float(v) for v in np.concatenate([unit[:, 0], unit[:, 1]])]
    return {
        "iop": iop,
        "pixel_spacing": [float(spacing[1]), float(spacing[0])],
        "slice_step": step,
        "normal": normal,
        "affine_lps": aff_lps,
    }


def stored_values(image: np.ndarray, spec: DicomSeriesSpec) -> np.ndarray:
    """Integer pixel values the files will hold for ``image`` (int16 or uint16, clipped).

    ``stored * slope + intercept`` is what a reader should return (the quantised image).
    """
    intercept = float(spec.rescale_intercept or 0.0)
    raw = np.rint((np.asarray(image, dtype=np.float64) - intercept) / spec.rescale_slope)
    info = np.iinfo(np.int16 if spec.signed else np.uint16)
    return np.clip(raw, info.min, info.max).astype(info.dtype)


def format_decimal_string(value: float) -> str:
    """A Decimal String within 16 characters that keeps as many digits as fit."""
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.3g}"


def base_dataset(spec: DicomSeriesSpec, sop_class: str, sop_uid: str) -> Dataset:
    """Patient, study, series, equipment and SOP common modules shared by all objects we write."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.StudyID = "1"
    ds.AccessionNumber = spec.accession
    ds.ReferringPhysicianName = "REFERRER^SYNTH"
    ds.StudyDescription = "SYNTH ABDOMEN"
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.SeriesDate = spec.study_date
    ds.SeriesTime = spec.study_time
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = "PHANTOM-1"
    ds.InstitutionName = spec.institution
    ds.DeviceSerialNumber = "SYNTH0001"
    ds.SoftwareVersions = "medseg-synthetic-1"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.InstanceCreationDate = spec.study_date
    ds.InstanceCreationTime = spec.study_time
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def _add_modality_attributes(ds: Dataset, spec: DicomSeriesSpec) -> None:
    """CT Image / MR Image module attributes that a validator expects."""
    if spec.modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.AcquisitionNumber = 1
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "3000"
        ds.EchoTime = "90"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.9"
        ds.ImagedNucleus = "1H"


def _rescale_attributes(ds: Dataset, spec: DicomSeriesSpec) -> None:
    """Rescale slope/intercept: always for CT; for MR only when non-identity (the MR IOD has no
    Modality LUT module, but vendors do write it and readers must honour it)."""
    intercept = float(spec.rescale_intercept or 0.0)
    if spec.modality == "CT" or spec.rescale_slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = format_decimal_string(spec.rescale_slope)
        ds.RescaleIntercept = format_decimal_string(intercept)


def _pixel_module(ds: Dataset, pixels: np.ndarray, spec: DicomSeriesSpec) -> None:
    """Image Pixel module for one (Rows, Columns) integer frame (or (F, Rows, Columns) frames)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def encode(ds: Dataset, transfer_syntax: str) -> None:
    """Set the transfer syntax, compressing the pixel data with pydicom's encoders if needed."""
    if UID(transfer_syntax) in (JPEG2000Lossless, JPEG2000) and min(ds.Rows, ds.Columns) < 32:
        # OpenJPEG's encoder always uses 6 resolution levels, which need tiles of at least 32 pixels.
        raise ValueError(f"JPEG 2000 encoding needs Rows and Columns >= 32; got {ds.Rows} x {ds.Columns}")
    if UID(transfer_syntax).is_compressed:
        # pydicom picks an installed encoder plugin (its own RLE, pyjpegls, pylibjpeg-openjpeg).
        ds.compress(UID(transfer_syntax), generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write atomically (temp file in the same folder, then rename) with a valid DICOM file meta."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _file_names(n: int, spec: DicomSeriesSpec) -> list[str]:
    if not spec.shuffle_names:
        return [f"slice_{k:03d}.dcm" for k in range(n)]
    rng = np.random.default_rng([spec.seed, spec.series_number, 71])
    return [rng.bytes(8).hex().upper() for _ in range(n)]


def write_dicom_series(
    image: np.ndarray, affine_ras: np.ndarray, out_dir: str | Path, spec: DicomSeriesSpec
) -> list[Path]:
    """Write ``image`` as a single-frame CT/MR Image Storage series, one file per k-slice.

    Args:
        image: ``(X, Y, Z)`` float values (HU for CT); slice k becomes a (Rows=Y, Columns=X) frame.
        affine_ras: 4x4 voxel->RAS mm affine of ``image`` (orthogonal axes).
        out_dir: folder for the files (created; other files in it are left alone).
        spec: header content; see :class:`DicomSeriesSpec`.

    Returns:
        Paths of the written files in slice order k = 0..Z-1 (not the InstanceNumber order).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z); got shape {image.shape}")
    geo = affine_to_dicom_geometry(affine_ras)
    stored = stored_values(image, spec)
    n = image.shape[2]
    numbers = np.arange(1, n + 1)
    if spec.shuffle_instance_numbers:
        numbers = np.random.default_rng([spec.seed, spec.series_number, 73]).permutation(numbers)
    names = _file_names(n, spec)
    paths = []
    for k in range(n):
        ds = base_dataset(spec, _SOP_CLASS[spec.modality], spec.instance_uid(k))
        _add_modality_attributes(ds, spec)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality == "CT" else "OTHER"]
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = int(numbers[k])
        ipp = geo["affine_lps"] @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [format_decimal_string(v) for v in ipp[:3]]
        ds.ImageOrientationPatient = [format_decimal_string(v) for v in geo["iop"]]  # type: ignore[union-attr]
        ds.PixelSpacing = [format_decimal_string(v) for v in geo["pixel_spacing"]]  # type: ignore[union-attr]
        ds.SliceThickness = format_decimal_string(abs(geo["slice_step"]))  # type: ignore[arg-type]
        ds.SpacingBetweenSlices = format_decimal_string(abs(geo["slice_step"]))  # type: ignore[arg-type]
        ds.SliceLocation = format_decimal_string(float(np.dot(ipp[:3], geo["normal"])))
        _rescale_attributes(ds, spec)
        ds.WindowCenter = format_decimal_string(spec.window_center)
        ds.WindowWidth = format_decimal_string(spec.window_width)
        ds.ContentDate, ds.ContentTime = spec.study_date, spec.study_time
        _pixel_module(ds, stored[:, :, k].T, spec)
        encode(ds, spec.transfer_syntax)
        paths.append(save_dataset(ds, Path(out_dir) / names[k]))
    logger.debug("wrote %d-slice %s series to %s", n, spec.modality, out_dir)
    return paths
