"""``seg.dcm``: a DICOM Segmentation (SEG) object of the label map, built with highdicom.

Grid convention (the one trap here): the mask comes in the series' own grid exactly as
``preprocessing.dicom.series.read_dicom_series`` produces ``Volume.array[0]``: index
``(i, j, k)`` = (column, row, slice). The reader decided the slice order once and recorded it in
``Volume.dicom`` (:class:`~preprocessing.image.DicomSource`): ``headers[k]`` is the header of
slice ``k`` (single-frame series) or ``frame_of_slice[k]`` the frame of slice ``k`` in the one
multi-frame object. highdicom pairs frame ``f`` of its pixel array with source image ``f`` (or
frame ``f`` of one multi-frame source), in the order we pass them, and wants frames as
``(rows, columns)``; so source frame ``frame_of_slice[k]`` gets ``mask[:, :, k].T``.

The SEG copies the patient, study and Frame of Reference modules of the sources (highdicom does
this); it is a hospital-side output and never goes to MLflow. highdicom and pydicom are imported
in the functions that use them (see :mod:`pipeline.writers.base`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.writers.base import SegmentedCase
from preprocessing.atomic import atomic_path
from preprocessing.errors import GeometryError
from preprocessing.image import DicomSource

if TYPE_CHECKING:
    import highdicom as hd

logger = logging.getLogger(__name__)

# SNOMED CT concept names (attributes of pydicom's ``codes.SCT``) for the label names we know;
# anything else is described as generic "Tissue" / "Organ" (a reader still gets the name from
# SegmentLabel).
_ANATOMY = {
    name: name.capitalize()
    for name in ("liver", "kidney", "spleen", "pancreas", "heart", "lung", "prostate", "brain", "hippocampus")
}
_ABNORMAL = {
    "lesion": "Lesion",
    "tumor": "Neoplasm",
    "tumour": "Neoplasm",
    "neoplasm": "Neoplasm",
    "mass": "Mass",
    "edema": "Edema",
    "oedema": "Edema",
    "necrosis": "Necrosis",
}


class DicomSegWriter:
    """A DICOM SEG referencing the source series, for DICOM sources only."""

    name = "dicom_seg"
    title = "DICOM SEG"
    filename = "seg.dcm"
    optional = False
    flag = ""
    help = ""
    needs_probabilities = False
    needs_uncertainty = False
    fails_case = True

    def applies_to(self, case: SegmentedCase) -> bool:
        return case.item.kind == "dicom"

    def write(self, case: SegmentedCase, path: Path) -> Path:
        if case.volume.dicom is None:
            raise GeometryError(f"case {case.item.case_id}: the image was read without its DICOM source")
        return write_dicom_seg(
            case.segmentation.labels,
            case.volume.dicom,
            case.label_names,
            path,
            algorithm_name=case.model_name or "medseg",
            algorithm_version=case.model_version,
        )


def write_dicom_seg(
    mask: np.ndarray,
    source: DicomSource,
    label_names: Mapping[int, str],
    out_path: str | Path,
    algorithm_name: str = "medseg",
    algorithm_version: str = "0.1.0",
    series_number: int = 9001,
    segmentation_type: str = "BINARY",
) -> Path:
    """Write a DICOM SEG of ``mask`` referencing the source series, atomically.

    Args:
        mask: label map ``(X, Y, Z)`` = (columns, rows, slices in the reader's order), integer
            values; the grid of ``read_dicom_series(...)`` whose ``.dicom`` is ``source``.
        source: the volume's DICOM files and parsed headers in slice order (``Volume.dicom``):
            single-frame images of one series, or exactly one enhanced multi-frame image.
        label_names: label value -> name; one segment per entry, numbered 1..N in ascending label
            value (segment number = rank, so sparse label values stay valid). Other values are ignored.
        out_path: destination file (``.dcm``).
        algorithm_name: name in the segments' AlgorithmIdentificationSequence and ManufacturerModelName.
        algorithm_version: version string there and in SoftwareVersions.
        series_number: SeriesNumber of the new SEG series.
        segmentation_type: "BINARY" (default: widest viewer support, passes dciodvfy) or
            "LABELMAP" (newer Label Map SEG IOD; the dicom3tools we test with predate it).

    Returns:
        ``out_path`` as a Path.

    Raises:
        GeometryError: if the mask does not fit the sources' grid.
        ValueError: if ``label_names`` is empty or ``source`` holds no files.
    """
    if not label_names:
        raise ValueError("label_names is empty: a SEG needs at least one segment")
    if not source.files:
        raise ValueError("the DICOM source holds no files: a SEG must reference its source images")
    mask = np.asarray(mask)
    _check_grid(mask, source)
    values = sorted(int(v) for v in label_names)
    stacked = _segment_frames(mask, source, values)
    descriptions = _segment_descriptions(values, label_names, algorithm_name, algorithm_version)
    seg = _segmentation(
        source, stacked, descriptions, algorithm_name, algorithm_version, series_number, segmentation_type
    )
    out = Path(out_path)
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    logger.info("wrote DICOM SEG with %d segment(s), %d frame(s)", len(values), int(seg.NumberOfFrames))
    return out


def _check_grid(mask: np.ndarray, source: DicomSource) -> None:
    """Refuse a mask that is not ``(columns, rows, slices)`` of the source grid."""
    if mask.ndim != 3:
        raise GeometryError(f"mask must be (X, Y, Z); got shape {mask.shape}")
    first = source.headers[0]
    grid = (int(first.Columns), int(first.Rows), len(source.frame_of_slice))
    if mask.shape != grid:
        raise GeometryError(
            f"mask shape {mask.shape} does not match the series grid (columns, rows, slices) = {grid}"
        )
    frames = int(getattr(first, "NumberOfFrames", 1) or 1) if source.multiframe else len(source.files)
    if sorted(source.frame_of_slice) != list(range(frames)):
        raise GeometryError(
            f"the source's slice order {source.frame_of_slice[:8]}... is not one slice per frame of "
            f"its {frames} frame(s)"
        )


def _segment_frames(mask: np.ndarray, source: DicomSource, values: Sequence[int]) -> np.ndarray:
    """``uint8 (frames, rows, cols)`` of segment numbers 1..N (0 = none) in the sources' frame order.

    Frame ``f`` of the SEG belongs to source frame ``f``, which holds mask slice ``k`` with
    ``frame_of_slice[k] == f``. Built in one vectorised step: a per-segment one-hot loop costs
    seconds on a 512x512x400 scan.
    """
    lut = np.zeros(max(max(values), int(mask.max(initial=0))) + 1, dtype=np.uint8)
    lut[list(values)] = np.arange(1, len(values) + 1, dtype=np.uint8)
    cols, rows, slices = mask.shape
    stacked = np.empty((slices, rows, cols), dtype=np.uint8)
    stacked[np.asarray(source.frame_of_slice)] = lut[mask.transpose(2, 1, 0)]
    return stacked


def _segmentation(
    source: DicomSource,
    stacked: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    algorithm_name: str,
    algorithm_version: str,
    series_number: int,
    segmentation_type: str,
) -> hd.seg.Segmentation:
    """The highdicom SEG dataset of ``stacked`` ``(frames, rows, cols)`` segment numbers."""
    import highdicom as hd

    return hd.seg.Segmentation(
        source_images=list(source.headers),
        pixel_array=stacked,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=f"{algorithm_name} segmentation"[:64],
        # An all-background mask still makes a valid SEG (one that says "nothing found").
        omit_empty_frames=bool(stacked.any()),
    )


def _segment_descriptions(
    values: Sequence[int], label_names: Mapping[int, str], algorithm_name: str, algorithm_version: str
) -> list[hd.seg.SegmentDescription]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = str(label_names[value])
        category, kind = _property_codes(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_id=f"label {value}",
                tracking_uid=hd.UID(),
            )
        )
    return descriptions


def _property_codes(name: str) -> tuple[Any, Any]:
    """(category, type) SNOMED codes for a label name such as "liver" or "left_kidney"."""
    from pydicom.sr.codedict import codes

    for token in re.split(r"[^a-z]+", name.lower()):
        if token in _ANATOMY:
            return codes.SCT.AnatomicalStructure, getattr(codes.SCT, _ANATOMY[token])
        if token in _ABNORMAL:
            return codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.SCT, _ABNORMAL[token])
    return codes.SCT.Tissue, codes.SCT.Organ
