"""DICOM Segmentation (SEG) objects for a predicted label map, built with highdicom.

Grid convention (the one trap here): the mask comes in the series' own grid exactly as
``preprocessing.dicom.series.read_dicom_series`` produces ``Volume.array[0]``: index
``(i, j, k)`` = (column, row, slice), slices sorted by ``IPP . n`` ascending, where ``n`` is the
slice normal ``r x c`` from ``ImageOrientationPatient``. highdicom pairs frame ``f`` of its pixel
array with source image ``f`` (or frame ``f`` of one multi-frame source), in the order we pass
them, and wants frames as ``(rows, columns)``. So we sort the sources the same way the reader does
and hand highdicom ``mask[:, :, k].T`` for source ``k``.

The SEG copies the patient, study and Frame of Reference modules of the sources (highdicom does
this); it is a hospital-side output and never goes to MLflow.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from preprocessing.atomic import atomic_path
from preprocessing.errors import GeometryError

logger = logging.getLogger(__name__)

# SNOMED CT codes for the label names we know; anything else is described as generic "Tissue" /
# "Organ" (a reader still gets the name from SegmentLabel).
_ANATOMY = {
    name: getattr(codes.SCT, name.capitalize())
    for name in ("liver", "kidney", "spleen", "pancreas", "heart", "lung", "prostate", "brain", "hippocampus")
}
_ABNORMAL = {
    "lesion": codes.SCT.Lesion,
    "tumor": codes.SCT.Neoplasm,
    "tumour": codes.SCT.Neoplasm,
    "neoplasm": codes.SCT.Neoplasm,
    "mass": codes.SCT.Mass,
    "edema": codes.SCT.Edema,
    "oedema": codes.SCT.Edema,
    "necrosis": codes.SCT.Necrosis,
}
_ORIENTATION_TOL = 1e-4


def write_dicom_seg(
    mask: np.ndarray,
    source_paths: Sequence[str | Path],
    label_names: Mapping[int, str],
    out_path: str | Path,
    algorithm_name: str = "medseg",
    algorithm_version: str = "0.1.0",
    series_number: int = 9001,
    segmentation_type: str = "BINARY",
    source_headers: Sequence[pydicom.Dataset] | None = None,
) -> Path:
    """Write a DICOM SEG of ``mask`` referencing the source series, atomically.

    Args:
        mask: label map ``(X, Y, Z)`` = (columns, rows, slices sorted by ``IPP . n``), integer values;
            the grid of ``read_dicom_series(source_paths)``.
        source_paths: the series' files: single-frame images of one series, or exactly one
            enhanced multi-frame image.
        label_names: label value -> name; one segment per entry, numbered 1..N in ascending label
            value (segment number = rank, so sparse label values stay valid). Other values are ignored.
        out_path: destination file (``.dcm``).
        algorithm_name: name in the segments' AlgorithmIdentificationSequence and ManufacturerModelName.
        algorithm_version: version string there and in SoftwareVersions.
        series_number: SeriesNumber of the new SEG series.
        segmentation_type: "BINARY" (default: widest viewer support, passes dciodvfy) or
            "LABELMAP" (newer Label Map SEG IOD; the dicom3tools we test with predate it).
        source_headers: the parsed headers of ``source_paths`` (any order, pixel data not needed),
            e.g. ``read_dicom_series(...).meta["headers"]``; saves parsing every file again
            (about a second for a 400-slice series). Read from ``source_paths`` when omitted.

    Returns:
        ``out_path`` as a Path.

    Raises:
        GeometryError: if the mask does not fit the sources' grid or the sources are not one stack.
        ValueError: if ``label_names`` is empty or ``source_paths`` is empty.
    """
    if not label_names:
        raise ValueError("label_names is empty: a SEG needs at least one segment")
    if not source_paths:
        raise ValueError("source_paths is empty: a SEG must reference its source images")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise GeometryError(f"mask must be (X, Y, Z); got shape {mask.shape}")
    sources, frames_in_slice_order = _sorted_sources(source_paths, source_headers)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if mask.shape != (cols, rows, len(frames_in_slice_order)):
        raise GeometryError(
            f"mask shape {mask.shape} does not match the series grid (columns, rows, slices) = "
            f"{(cols, rows, len(frames_in_slice_order))}"
        )
    values = sorted(int(v) for v in label_names)
    # highdicom takes a (frames, rows, cols) array of segment numbers 1..N (0 = none); frame f of
    # the SEG belongs to source frame f, which holds mask slice k with frames_in_slice_order[k] == f.
    # Built in one vectorised step: a per-segment one-hot loop costs seconds on a 512x512x400 scan.
    lut = np.zeros(max(max(values), int(mask.max(initial=0))) + 1, dtype=np.uint8)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.uint8)
    stacked = np.empty((len(frames_in_slice_order), rows, cols), dtype=np.uint8)
    stacked[np.asarray(frames_in_slice_order)] = lut[mask.transpose(2, 1, 0)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stacked,
        segmentation_type=segmentation_type,
        segment_descriptions=_segment_descriptions(values, label_names, algorithm_name, algorithm_version),
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
    out = Path(out_path)
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    logger.info("wrote DICOM SEG with %d segment(s), %d frame(s)", len(values), int(seg.NumberOfFrames))
    return out


def _sorted_sources(
    paths: Sequence[str | Path], headers: Sequence[pydicom.Dataset] | None = None
) -> tuple[list[pydicom.Dataset], list[int]]:
    """Read source headers; return (datasets for highdicom, source frame index of each sorted slice).

    Single-frame sources are returned sorted by ``IPP . n`` (so frame f is dataset f); a multi-frame
    source keeps its own frame order and the second value maps slice k to its frame index.
    """
    if headers is not None and len(headers) != len(paths):
        raise GeometryError(f"{len(headers)} source headers given for {len(paths)} source files")
    datasets = (
        list(headers) if headers is not None else [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    )
    multi = [ds for ds in datasets if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1]
    if multi:
        if len(datasets) != 1:
            raise GeometryError(
                "a SEG can reference one multi-frame image or a series of single-frame images, "
                f"got {len(datasets)} files of which {len(multi)} multi-frame"
            )
        ds = datasets[0]
        positions, orientation = _multiframe_geometry(ds)
        order = _slice_order(positions, orientation)
        return [ds], order
    orientations = [np.asarray(ds.ImageOrientationPatient, dtype=np.float64) for ds in datasets]
    if any(np.abs(o - orientations[0]).max() > _ORIENTATION_TOL for o in orientations):
        raise GeometryError("source images have different ImageOrientationPatient: not one stack")
    positions = [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets]
    order = _slice_order(positions, orientations[0])
    return [datasets[f] for f in order], list(range(len(order)))


def _slice_order(positions: Sequence[np.ndarray], orientation: np.ndarray) -> list[int]:
    """Indices sorting the planes by ``IPP . n`` ascending, as the ingestion reader does."""
    normal = np.cross(orientation[:3], orientation[3:])
    key = [float(np.dot(p, normal)) for p in positions]
    order = sorted(range(len(key)), key=key.__getitem__)
    if len({round(key[i], 4) for i in order}) != len(order):
        raise GeometryError("two source planes share a position along the slice normal (duplicates?)")
    return order


def _multiframe_geometry(ds: pydicom.Dataset) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-frame IPP and the (single) IOP of an enhanced multi-frame image."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is None:
        raise GeometryError("multi-frame source without PerFrameFunctionalGroupsSequence is not supported")
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    positions, orientations = [], []
    for item in per_frame:
        positions.append(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64))
        holder = item if "PlaneOrientationSequence" in item else shared
        if holder is None or "PlaneOrientationSequence" not in holder:
            raise GeometryError("multi-frame source has no PlaneOrientationSequence")
        orientations.append(
            np.asarray(holder.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
        )
    if any(np.abs(o - orientations[0]).max() > _ORIENTATION_TOL for o in orientations):
        raise GeometryError("multi-frame source frames have different orientations: not one stack")
    return positions, orientations[0]


def _segment_descriptions(
    values: Sequence[int], label_names: Mapping[int, str], algorithm_name: str, algorithm_version: str
) -> list[hd.seg.SegmentDescription]:
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


def _property_codes(name: str):
    """(category, type) SNOMED codes for a label name such as "liver" or "left_kidney"."""
    for token in re.split(r"[^a-z]+", name.lower()):
        if token in _ANATOMY:
            return codes.SCT.AnatomicalStructure, _ANATOMY[token]
        if token in _ABNORMAL:
            return codes.SCT.MorphologicallyAbnormalStructure, _ABNORMAL[token]
    return codes.SCT.Tissue, codes.SCT.Organ
