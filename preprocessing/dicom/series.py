"""Read one DICOM series (single-frame slices, or one enhanced multi-frame object) into a Volume.

The volume keeps the series' own grid: ``array[0, i, j, k]`` is column ``i``, row ``j`` of the
``k``-th slice sorted along the slice normal, and ``affine_ras`` maps ``(i, j, k)`` to RAS mm
(the DICOM LPS geometry with x and y negated). Nothing is reoriented or resampled, so a mask
written on this grid maps back onto the source slices one to one (``Volume.dicom.files[k]`` is
the file of slice ``k``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from preprocessing.dicom.geometry import (
    ORIENTATION_TOL,
    SPACING_TOL_MM,
    check_grayscale,
    check_same,
    rescale_stack,
    stack_geometry,
    stack_to_volume_array,
)
from preprocessing.dicom.multiframe import read_multiframe
from preprocessing.errors import IngestError
from preprocessing.image import DicomSource, Volume, lps_to_ras, pseudonymous_case_id

logger = logging.getLogger(__name__)

_DEFER_BYTES = 16 * 1024
_LITTLE_ENDIAN_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_UNCOMPRESSED = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
}


def read_dicom_series(paths: list[Path] | tuple[Path, ...], *, decode_threads: int | None = None) -> Volume:
    """Read a DICOM series into a :class:`Volume` on the series' own grid.

    Args:
        paths: the files of ONE series (any order, any names), or a single enhanced multi-frame file.
        decode_threads: threads for decoding compressed pixel data (default: CPU count, max 8).
            Uncompressed data is copied serially: threads only add overhead there.

    Returns:
        Volume with ``array`` (1, columns, rows, slices): the stored values with RescaleSlope/
        Intercept applied per slice (int16/int32 when the rescale is whole-numbered, e.g. CT in HU;
        float32 when fractional), ``affine_ras`` exact, ``case_id`` pseudonymous (from the
        SeriesInstanceUID), ``modality`` from the header, ``dicom`` the file of each slice and its
        parsed header (no pixel data) in slice order.

    Raises:
        IngestError: unreadable files, duplicate SOP instances, mismatched rows/columns/spacing,
            files of different patients, studies or frames of reference, truncated or
            undecodable pixel data, colour and PALETTE COLOR images.
        GeometryError: mixed orientations, gaps, uneven spacing, duplicate positions, gantry tilt,
            non-finite positions, spacings that are not positive or outside 1e-3..100 mm.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise IngestError("empty series: no files given")
    datasets = [_read_file(p) for p in paths]
    if any(_is_multiframe(ds) for ds in datasets):
        if len(datasets) != 1:
            raise IngestError(
                f"series mixes {len(datasets)} files with multi-frame objects; read each multi-frame object alone"
            )
        return read_multiframe(datasets[0], paths[0], decode_threads=decode_threads)
    return _read_single_frame_series(datasets, paths, decode_threads)


def _read_file(path: Path) -> Dataset:
    try:
        # Deferring large values (pixel data) keeps parsing cheap and lets decode_frames load one
        # slice at a time: peak memory is the output volume plus one slice, not twice the series.
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise IngestError(f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in ds:
        # pydicom returns an EMPTY dataset (after a warning) when an encapsulated pixel data
        # element is cut short, so a missing element is how truncation shows up here.
        raise IngestError(f"truncated or undecodable pixel data in {path}: no complete Pixel Data element")
    return ds


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _read_single_frame_series(
    datasets: list[Dataset], paths: list[Path], decode_threads: int | None
) -> Volume:
    headers = [_slice_header(ds, path) for ds, path in zip(datasets, paths, strict=True)]
    sops = [h["sop"] for h in headers]
    n_dup = len(sops) - len(set(sops))
    if n_dup:
        raise IngestError(
            f"duplicate SOP instances: {n_dup} file(s) repeat a SOPInstanceUID already in the series"
        )
    check_same([h["size"] for h in headers], "rows/columns")
    check_same_identity(datasets)
    check_same([h["iop"] for h in headers], "orientations (ImageOrientationPatient)", atol=ORIENTATION_TOL)
    check_same([h["spacing"] for h in headers], "PixelSpacing", atol=SPACING_TOL_MM)
    first = datasets[0]
    geometry = stack_geometry(
        np.array([h["ipp"] for h in headers]),
        np.array(headers[0]["iop"]),
        np.array(headers[0]["spacing"]),
        single_slice_spacing_mm=_nominal_spacing(first),
    )
    order = geometry.order
    raw = decode_frames([datasets[k] for k in order], [paths[k] for k in order], decode_threads)
    slopes = np.array([headers[k]["slope"] for k in order])
    intercepts = np.array([headers[k]["intercept"] for k in order])
    stack = rescale_stack(raw, slopes, intercepts)
    series_uid = str(first.get("SeriesInstanceUID", ""))
    return Volume(
        array=stack_to_volume_array(stack),
        affine_ras=lps_to_ras(geometry.affine_lps),
        case_id=pseudonymous_case_id(series_uid),
        source=os.path.commonpath([str(p.parent) for p in paths]),
        modality=str(first.get("Modality", "")),
        # The parsed headers in slice order (decode_frames dropped their pixel data): the DICOM
        # SEG writer references them instead of parsing every file again. They hold patient
        # data; they stay in the process like the files they came from and are never logged.
        dicom=DicomSource(
            files=tuple(paths[k] for k in order),
            headers=tuple(datasets[k] for k in order),
            frame_of_slice=tuple(range(len(order))),
        ),
    )


_TAG_IPP, _TAG_IOP, _TAG_SPACING = 0x00200032, 0x00200037, 0x00280030
_TAG_SLOPE, _TAG_INTERCEPT, _TAG_SOP = 0x00281053, 0x00281052, 0x00080018


def _slice_header(ds: Dataset, path: Path) -> dict:
    """The values one slice contributes to the stack, each read once.

    Decimal strings are parsed from the raw element bytes (:func:`_decimals`): pydicom's
    generic element conversion costs more per slice than decoding its pixels.
    """
    header: dict[str, Any] = {
        "ipp": _decimals(ds, _TAG_IPP),
        "iop": _decimals(ds, _TAG_IOP),
        "spacing": _decimals(ds, _TAG_SPACING),
        "slope": (_decimals(ds, _TAG_SLOPE) or [1.0])[0],
        "intercept": (_decimals(ds, _TAG_INTERCEPT) or [0.0])[0],
        "sop": str(ds.get("SOPInstanceUID", "")),
        "size": (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)),
    }
    for key, keyword, count in (
        ("ipp", "ImagePositionPatient", 3),
        ("iop", "ImageOrientationPatient", 6),
        ("spacing", "PixelSpacing", 2),
    ):
        if header[key] is None or len(header[key]) != count:
            raise IngestError(f"{path}: missing or malformed {keyword}; cannot place the slice in the world")
    if 0 in header["size"]:
        raise IngestError(f"{path}: missing Rows/Columns")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise IngestError(f"{path}: colour image (SamplesPerPixel={ds.SamplesPerPixel}) is not supported")
    check_grayscale(ds, path)
    if header["slope"] == 0:
        header["slope"] = 1.0  # a zero slope is a writer bug; DICOM readers conventionally treat it as 1
    return header


_IDENTITY_TAGS = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")


def check_same_identity(datasets: list[Dataset]) -> None:
    """Refuse files of different patients, studies or frames of reference stacked as one series.

    Discovery already splits such groups into separate cases; this guards direct callers. The
    message names the tag but not its values (PatientID is identifying).
    """
    for keyword in _IDENTITY_TAGS:
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) > 1:
            raise IngestError(
                f"the files mix {len(values)} different {keyword} values under one SeriesInstanceUID; "
                "read each group as its own series"
            )


def _decimals(ds: Dataset, tag: int) -> list[float] | None:
    """A DS (decimal string) element as floats; None when absent or empty."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    try:
        if isinstance(value, bytes):  # still raw: DS bytes are ASCII in every transfer syntax
            text = value.decode("ascii").strip(" \0")
            return [float(v) for v in text.split("\\")] if text else None
        if value is None or value == "":
            return None
        values = value if isinstance(value, list | tuple | MultiValue) else [value]
        return [float(v) for v in values]
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError(f"malformed decimal string in element {tag:08X}: {value!r}") from exc


def _nominal_spacing(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


def decode_frames(datasets: list[Dataset], paths: list[Path], decode_threads: int | None) -> np.ndarray:
    """Decode single-frame datasets, in order, into one (N, rows, cols) array of stored values.

    Compressed slices are decoded on a thread pool (the JPEG/JPEG-2000 decoders are C code that
    releases the GIL); uncompressed slices are plain copies, faster serially. Pixel bytes are
    dropped from each dataset once copied out, to halve peak memory.
    """
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)

    def decode(idx: int) -> np.ndarray:
        ds = datasets[idx]
        try:
            frame = _native_frame(ds, rows, cols)
            if frame is None:
                frame = ds.pixel_array
        except Exception as exc:  # truncated data raises ValueError, missing decoders RuntimeError, ...
            raise IngestError(
                f"truncated or undecodable pixel data in {paths[idx]}: {type(exc).__name__}: {exc}"
            ) from exc
        if frame.shape != (rows, cols):
            raise IngestError(
                f"{paths[idx]}: decoded pixel array has shape {frame.shape}, expected {(rows, cols)}"
            )
        return frame

    syntaxes = {str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) for ds in datasets}
    compressed = bool(syntaxes - _UNCOMPRESSED)
    threads = decode_threads or min(8, os.cpu_count() or 1)
    frame0 = decode(0)
    out = np.empty((len(datasets), rows, cols), dtype=frame0.dtype)
    out[0] = frame0
    del first.PixelData  # every dataset leaves with its header only (the SEG writer reuses them)
    if compressed and threads > 1 and len(datasets) > 2:
        with ThreadPoolExecutor(threads) as pool:
            for idx, frame in enumerate(pool.map(decode, range(1, len(datasets))), start=1):
                out[idx] = frame
                del datasets[idx].PixelData  # halves peak memory on big series
    else:
        for idx in range(1, len(datasets)):
            out[idx] = decode(idx)
            del datasets[idx].PixelData  # halves peak memory on big series
    return out


def _native_frame(ds: Dataset, rows: int, cols: int) -> np.ndarray | None:
    """Little-endian uncompressed pixels as a view of the file bytes; None for anything else.

    Written by hand because pydicom's generic ``pixel_array`` machinery costs ~0.4 ms per file
    (option dictionaries, plugin lookup), which on a 300-slice series is most of the read time.
    Same result as ``pixel_array`` for the cases accepted here: unused high bits are cleared by
    the shift pydicom applies with ``correct_unused_bits`` (PS3.5 8.1.1).
    """
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in _LITTLE_ENDIAN_NATIVE:
        return None
    bits_allocated = int(ds.get("BitsAllocated", 0))
    if bits_allocated not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    data = ds.get("PixelData")
    if data is None:
        raise ValueError("no PixelData element")
    need = rows * cols * dtype.itemsize
    if len(data) < need:
        raise ValueError(f"pixel data holds {len(data)} bytes, {need} needed for {rows}x{cols}")
    frame = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    shift = bits_allocated - int(ds.get("BitsStored", bits_allocated))
    if shift > 0:
        frame = np.right_shift(np.left_shift(frame, shift), shift)
    return frame
