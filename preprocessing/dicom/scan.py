"""Header-only scan of candidate DICOM files: the few tags discovery needs, never the pixels.

Each file yields either a :class:`ScannedHeader` (an image slice or multi-frame object, possibly
one that cannot be placed in the world or is truncated: the series grouping decides what that
means for its series) or a :class:`~preprocessing.source_item.SourceItem` saying why the file is
skipped (not DICOM, DICOMDIR, a non-image object...) or an error (cannot be opened). Large trees
are read by a process pool (:func:`scan_dicom_headers`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from preprocessing.source_item import SourceItem, skipped_item

# Tags discovery needs; reading only these keeps the scan at thousands of files per second.
_DISCOVERY_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SpecificCharacterSet",
    # Slices that share a SeriesInstanceUID but differ in these are never merged (PatientID stays
    # in memory: it only feeds the salted hash of a split part's case id).
    "FrameOfReferenceUID",
    "StudyInstanceUID",
    "PatientID",
    # Parsed only when present, i.e. for enhanced multi-frame objects (its items are small).
    "SharedFunctionalGroupsSequence",
]

# Objects that carry no image volume to segment (by Modality), with the reason we give.
_NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "PR": "presentation state",
    "KO": "key object selection",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTDOSE": "RT dose",
    "RTRECORD": "RT treatment record",
    "SEG": "segmentation object",
    "REG": "registration object",
    "DOC": "encapsulated document",
    "ECG": "waveform",
}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_DICOMDIR_REASON = "DICOMDIR (media directory, no image)"
#: Tags whose values must agree for slices of one SeriesInstanceUID to be one volume.
IDENTITY_TAGS = ("FrameOfReferenceUID", "StudyInstanceUID", "PatientID")
#: Start of ``ScannedHeader.placement`` for a file cut off before its image attributes.
TRUNCATED = "truncated DICOM file"
#: ``ScannedHeader.placement`` of a 2D image with neither ImagePositionPatient nor -Orientation.
NO_GEOMETRY = "no ImagePositionPatient/ImageOrientationPatient"
#: Trees with fewer candidate files are scanned in this process (starting workers costs more).
PARALLEL_SCAN_MIN_FILES = 2000


@dataclass
class ScannedHeader:
    """What the scan read from one image file.

    Attributes:
        path: the file.
        series_uid: SeriesInstanceUID.
        sop_uid: SOPInstanceUID ("" for a truncated file).
        modality: Modality or "".
        orientation: ImageOrientationPatient (6 floats) of a placeable single-frame slice, else None.
        multiframe: an enhanced multi-frame object (its geometry is in functional groups).
        identity: (FrameOfReferenceUID, StudyInstanceUID, PatientID), "" where absent.
        placement: why the slice cannot be placed in the world ("" when it can); starts with
            :data:`TRUNCATED` for a cut-off file, equals :data:`NO_GEOMETRY` for a plain 2D picture.
    """

    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    orientation: tuple[float, ...] | None
    multiframe: bool
    identity: tuple[str, str, str] = ("", "", "")
    placement: str = ""


def scan_dicom_headers(paths: list[Path], processes: int | None) -> list[ScannedHeader | SourceItem]:
    """Header of every candidate file, in order; a process pool for large trees.

    Args:
        paths: candidate files (anything that is not a NIfTI/ITK image by name).
        processes: worker processes (None: CPU count, at most 8; 1: this process). Lists under
            :data:`PARALLEL_SCAN_MIN_FILES` files are always read here.

    Parsing DICOM headers in pydicom is pure Python (GIL-bound), so threads would not help;
    processes scale with cores.
    """
    n_proc = min(8, os.cpu_count() or 1) if processes is None else max(1, processes)
    if n_proc == 1 or len(paths) < PARALLEL_SCAN_MIN_FILES:
        return [scan_dicom_header(p) for p in paths]
    chunk = max(64, len(paths) // (n_proc * 4))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    # fork shares the already imported pydicom (importing it costs ~0.5-1.5 s per process), but
    # forking a process that runs other threads can deadlock the child: use forkserver then.
    context: multiprocessing.context.BaseContext
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(n_proc, mp_context=context) as pool:
        return [h for part in pool.map(_scan_chunk, chunks) for h in part]


def _scan_chunk(paths: list[Path]) -> list[ScannedHeader | SourceItem]:
    return [scan_dicom_header(p) for p in paths]


def _open_header(path: Path) -> Dataset | SourceItem:
    """The discovery tags of ``path`` (no pixel data), or the item explaining why it has none."""
    if path.name.upper() == "DICOMDIR":
        return skipped_item(path, _DICOMDIR_REASON)
    try:
        # stop_before_pixels: never walk (possibly encapsulated) pixel data. A custom stop after
        # group 0028 was measured slower: the per-element callback costs more than it skips.
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DISCOVERY_TAGS)
    except InvalidDicomError:
        return skipped_item(path, "not a DICOM file (no 'DICM' preamble)")
    except OSError as exc:  # the file is there but cannot be opened: data missing from the run
        return SourceItem(
            "other", "", (path,), status="error", reason=f"cannot open file: {exc.strerror or exc}"
        )
    except Exception as exc:  # corrupt headers raise many types (EOFError, struct.error, ...)
        return skipped_item(path, f"unreadable DICOM header: {type(exc).__name__}: {exc}")


def scan_dicom_header(path: Path) -> ScannedHeader | SourceItem:
    """Read the few tags discovery needs, or explain why the file is skipped."""
    ds = _open_header(path)
    if isinstance(ds, SourceItem):
        return ds
    sop_class = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if sop_class == _DICOMDIR_SOP_CLASS:
        return skipped_item(path, _DICOMDIR_REASON)
    if modality.upper() in _NON_IMAGE_MODALITIES:
        what = _NON_IMAGE_MODALITIES[modality.upper()]
        return skipped_item(path, f"non-image object: {what} ({modality})", modality, series_uid)
    if "Rows" not in ds or "Columns" not in ds:
        truncated = _truncation(path, ds, sop_class)
        if not truncated:
            return skipped_item(path, "DICOM object without pixel data", modality, series_uid)
        if not series_uid:
            return SourceItem("other", "", (path,), "", modality, "error", truncated)
        # It belongs to a series: that series is incomplete, exactly like one with a missing slice.
        return ScannedHeader(path, series_uid, "", modality, None, False, _identity(ds), truncated)
    if not series_uid:
        return skipped_item(path, "DICOM image without SeriesInstanceUID", modality)
    # Enhanced objects carry NumberOfFrames and keep the plane position in functional groups.
    n_frames = ds.get("NumberOfFrames")
    multiframe = n_frames is not None and (int(n_frames or 1) > 1 or "ImagePositionPatient" not in ds)
    if multiframe and "SharedFunctionalGroupsSequence" not in ds:
        reason = "multi-frame object without functional groups (cine or 2D+t, not a 3D volume)"
        return skipped_item(path, reason, modality, series_uid)
    orientation, placement = (None, "") if multiframe else _plane(ds)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    return ScannedHeader(
        path, series_uid, sop_uid, modality, orientation, multiframe, _identity(ds), placement
    )


def _identity(ds: Dataset) -> tuple[str, str, str]:
    frame, study, patient = (str(ds.get(k, "") or "") for k in IDENTITY_TAGS)
    return frame, study, patient


def _plane(ds: Dataset) -> tuple[tuple[float, ...] | None, str]:
    """(ImageOrientationPatient, "") or (None, why the slice cannot be placed in the world)."""
    values: dict[str, list[float]] = {}
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6)):
        raw = ds.get(keyword)
        if raw is None or raw == "":
            continue
        try:
            numbers = [float(v) for v in (raw if isinstance(raw, list | tuple | MultiValue) else [raw])]
        except (TypeError, ValueError):
            return None, f"{keyword} is malformed ({raw!r})"
        if len(numbers) != count:
            return None, f"{keyword} has {len(numbers)} values, {count} expected"
        if not all(math.isfinite(v) for v in numbers):
            return None, f"{keyword} is not finite ({numbers})"
        values[keyword] = numbers
    if not values:
        return None, NO_GEOMETRY
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        if keyword not in values:
            return None, f"no {keyword}"
    return tuple(values["ImageOrientationPatient"]), ""


def _truncation(path: Path, ds: Dataset, sop_class: str) -> str:
    """Why a file without Rows/Columns is a cut-off image object ("" when it is not one).

    pydicom stops silently where a file ends, so a truncated image looks like an object without
    pixel data. It is not one when its SOP class is an image storage class, or when the file
    ends inside its own file meta group.
    """
    size = path.stat().st_size
    meta = ds.file_meta
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is not None and size < 132 + 12 + int(group_length):
        return f"{TRUNCATED}: it ends inside its file meta information ({size} bytes); re-export it"
    name = UID(sop_class).name if sop_class else ""
    if "Image Storage" in name:
        return (
            f"{TRUNCATED}: a {name} object that ends before its image attributes "
            f"(Rows/Columns/Pixel Data) at {size} bytes; re-export it"
        )
    return ""
