"""Header-only discovery of what a source folder holds: DICOM series, NIfTI, NRRD/MHA, MSD datasets.

Discovery never decodes pixels. The tree is walked by :func:`preprocessing.source_tree.walk_source_tree`
(regular files only, links followed once, unlistable folders reported). DICOM files are grouped by
SeriesInstanceUID; slices of one SeriesInstanceUID that differ in FrameOfReferenceUID,
StudyInstanceUID or PatientID are never merged: each such group becomes its own case (see
:func:`_split_by_identity` for the case ids). Within a group, slices whose orientation differs from
the main stack (localizers) are split off and skipped with a reason, a series made of several
large stacks of different orientation is rejected, and a slice that cannot be placed in the world
(ImagePositionPatient/ImageOrientationPatient missing or not finite) makes the whole series an
error, like a missing slice. Everything met -- including junk files, special files, links and
non-image DICOM objects (SR, presentation states, RT, SEG, DICOMDIR) -- yields one
:class:`SourceItem` with a status and a reason, so the manifest accounts for every file.

Validation that needs every header in full (gaps, tilt, duplicates, rows/columns) happens when the
series is read (:func:`preprocessing.dicom.series.read_dicom_series`), on the worker that reads it.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from preprocessing.image import pseudonymous_case_id, sanitize_case_id
from preprocessing.source_tree import classify_path, printable_path, walk_source_tree

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")

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
_IDENTITY_TAGS = ("FrameOfReferenceUID", "StudyInstanceUID", "PatientID")
_TRUNCATED = "truncated DICOM file"
# A stack of at most this many slices with an orientation other than the series' main stack is
# treated as a localizer (scout) and split off, not a reason to reject the series.
MAX_LOCALIZER_SLICES = 3
_ORIENTATION_TOL = 1e-3
PARALLEL_SCAN_MIN_FILES = 2000
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class SourceItem:
    """One thing found in a source folder: a DICOM series, an image file, or a skipped/bad file.

    Attributes:
        kind: "dicom" (a series, or one multi-frame object), "nifti", "itk" (NRRD/MHA via
            SimpleITK), or "other" (junk, non-image objects).
        case_id: output file stem; pseudonymous for DICOM, the sanitised file name for files.
            Empty for skipped files that produce no output.
        paths: the files of this item (DICOM slices in no particular order; MSD channels in
            channel order).
        series_uid: DICOM SeriesInstanceUID ("" for files). Stays on the hospital side.
        modality: DICOM Modality or "".
        status: "ok" (to be read), "skipped" (deliberately not ingested) or "error".
        reason: why skipped/error (empty when ok, or a note such as split-off localizers).
        meta: facts for the reader, e.g. ``{"multiframe": True}`` for an enhanced object.
    """

    kind: str
    case_id: str
    paths: tuple[Path, ...]
    series_uid: str = ""
    modality: str = ""
    status: str = "ok"
    reason: str = ""
    meta: dict = field(default_factory=dict, compare=False)


#: ``_DicomHeader.placement`` of a 2D image with neither ImagePositionPatient nor -Orientation.
_NO_GEOMETRY = "no ImagePositionPatient/ImageOrientationPatient"


@dataclass
class _DicomHeader:
    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    orientation: tuple[float, ...] | None
    multiframe: bool
    identity: tuple[str, str, str] = ("", "", "")  # FrameOfReferenceUID, StudyInstanceUID, PatientID
    placement: str = ""  # why the slice cannot be placed in the world ("" when it can)


def discover_sources(
    source: Path, *, processes: int | None = None, exclude: Iterable[str | os.PathLike] = ()
) -> list[SourceItem]:
    """Scan ``source`` (a file or folder tree) reading headers only.

    Args:
        source: a folder of DICOM/NIfTI/NRRD/MHA files (nested, any names), an MSD dataset
            folder (``dataset.json`` + ``imagesTr/``), or a single image file.
        processes: header-reading processes for large trees (default: CPU count, at most 8;
            1 reads in this process). Trees under :data:`PARALLEL_SCAN_MIN_FILES` files are
            always read here, where starting processes would cost more than it saves.
        exclude: folders never scanned (the run's OUT when it lies inside ``source``); folders
            named ``.staging`` or ``.model`` are never scanned either.

    Returns:
        Items sorted by (kind, case_id, first path) so runs are reproducible.

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if source.is_dir() and (source / "dataset.json").is_file() and (source / "imagesTr").is_dir():
        return _discover_msd(source)
    items: list[SourceItem] = []
    if source.is_dir():
        files, entries = walk_source_tree(source, exclude)
        items.extend(SourceItem("other", "", (e.path,), status=e.status, reason=e.reason) for e in entries)
    else:
        kind, reason = classify_path(source)
        files = [source] if kind == "file" else []
        if reason:
            items.append(_skip(source, reason))
    candidates: list[Path] = []
    for path in files:
        kind = _file_kind(path)
        if kind in ("nifti", "itk"):
            items.append(SourceItem(kind, sanitize_case_id(_stem(path)), (path,)))
        else:
            candidates.append(path)
    headers: list[_DicomHeader] = []
    for header_or_item in _read_headers(candidates, processes):
        if isinstance(header_or_item, SourceItem):
            items.append(header_or_item)
        else:
            headers.append(header_or_item)
    items.extend(_group_dicom(headers))
    items = _mark_case_id_collisions(items)
    logger.info("discovered %d items in %d files under %s", len(items), len(files), source)
    return sorted(items, key=lambda it: (it.kind, it.case_id, str(it.paths[0]) if it.paths else ""))


def _read_headers(paths: list[Path], processes: int | None) -> list[_DicomHeader | SourceItem]:
    """Header of every candidate file, in order; a process pool for large trees.

    Parsing DICOM headers in pydicom is pure Python (GIL-bound), so threads would not help;
    processes scale with cores.
    """
    n_proc = min(8, os.cpu_count() or 1) if processes is None else max(1, processes)
    if n_proc == 1 or len(paths) < PARALLEL_SCAN_MIN_FILES:
        return [_read_dicom_header(p) for p in paths]
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
        return [h for part in pool.map(_read_header_chunk, chunks) for h in part]


def _read_header_chunk(paths: list[Path]) -> list[_DicomHeader | SourceItem]:
    return [_read_dicom_header(p) for p in paths]


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    return "dicom"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _skip(path: Path, reason: str, modality: str = "", series_uid: str = "") -> SourceItem:
    return SourceItem("other", "", (path,), series_uid, modality, "skipped", reason)


def _read_dicom_header(path: Path) -> _DicomHeader | SourceItem:
    """Read the few tags discovery needs, or explain why the file is skipped."""
    if path.name.upper() == "DICOMDIR":
        return _skip(path, "DICOMDIR (media directory, no image)")
    try:
        # stop_before_pixels: never walk (possibly encapsulated) pixel data. A custom stop after
        # group 0028 was measured slower: the per-element callback costs more than it skips.
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DISCOVERY_TAGS)
    except InvalidDicomError:
        return _skip(path, "not a DICOM file (no 'DICM' preamble)")
    except OSError as exc:  # the file is there but cannot be opened: data missing from the run
        return SourceItem(
            "other", "", (path,), status="error", reason=f"cannot open file: {exc.strerror or exc}"
        )
    except Exception as exc:  # corrupt headers raise many types (EOFError, struct.error, ...)
        return _skip(path, f"unreadable DICOM header: {type(exc).__name__}: {exc}")
    sop_class = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if sop_class == _DICOMDIR_SOP_CLASS:
        return _skip(path, "DICOMDIR (media directory, no image)")
    if modality.upper() in _NON_IMAGE_MODALITIES:
        what = _NON_IMAGE_MODALITIES[modality.upper()]
        return _skip(path, f"non-image object: {what} ({modality})", modality, series_uid)
    if "Rows" not in ds or "Columns" not in ds:
        truncated = _truncation(path, ds, sop_class)
        if not truncated:
            return _skip(path, "DICOM object without pixel data", modality, series_uid)
        if not series_uid:
            return SourceItem("other", "", (path,), "", modality, "error", truncated)
        # It belongs to a series: that series is incomplete, exactly like one with a missing slice.
        return _DicomHeader(path, series_uid, "", modality, None, False, _identity(ds), truncated)
    if not series_uid:
        return _skip(path, "DICOM image without SeriesInstanceUID", modality)
    # Enhanced objects carry NumberOfFrames and keep the plane position in functional groups.
    n_frames = ds.get("NumberOfFrames")
    multiframe = n_frames is not None and (int(n_frames or 1) > 1 or "ImagePositionPatient" not in ds)
    if multiframe and "SharedFunctionalGroupsSequence" not in ds:
        return _skip(
            path,
            "multi-frame object without functional groups (cine or 2D+t, not a 3D volume)",
            modality,
            series_uid,
        )
    orientation, placement = (None, "") if multiframe else _plane(ds)
    return _DicomHeader(
        path,
        series_uid,
        str(ds.get("SOPInstanceUID", "")),
        modality,
        orientation,
        multiframe,
        _identity(ds),
        placement,
    )


def _identity(ds: Dataset) -> tuple[str, str, str]:
    frame, study, patient = (str(ds.get(k, "") or "") for k in _IDENTITY_TAGS)
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
        return None, _NO_GEOMETRY
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
        return f"{_TRUNCATED}: it ends inside its file meta information ({size} bytes); re-export it"
    name = UID(sop_class).name if sop_class else ""
    if "Image Storage" in name:
        return (
            f"{_TRUNCATED}: a {name} object that ends before its image attributes "
            f"(Rows/Columns/Pixel Data) at {size} bytes; re-export it"
        )
    return ""


def _group_dicom(headers: list[_DicomHeader]) -> list[SourceItem]:
    by_series: dict[str, list[_DicomHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    items: list[SourceItem] = []
    for uid, members in by_series.items():
        truncated = sorted(
            (h for h in members if h.placement.startswith(_TRUNCATED)), key=lambda h: str(h.path)
        )
        if truncated:
            # A cut-off file's identity tags may be gone too: no split can place it, so the whole
            # series is incomplete.
            reason = (
                f"{len(truncated)} file(s) of the series are truncated "
                f"({printable_path(truncated[0].path.name)}: {truncated[0].placement})"
            )
            paths = tuple(h.path for h in members)
            items.append(
                SourceItem(
                    "dicom", pseudonymous_case_id(uid), paths, uid, members[0].modality, "error", reason
                )
            )
            continue
        for key, part, note in _split_by_identity(uid, members):
            items.extend(_series_items(uid, key, part, note))
    return items


def _split_by_identity(uid: str, members: list[_DicomHeader]) -> list[tuple[str, list[_DicomHeader], str]]:
    """Parts of one SeriesInstanceUID that share frame of reference, study and patient.

    Returns (case-id key, headers, note) per part. A series that is one part keeps its plain
    key (the SeriesInstanceUID), so its case id is the one it always had. When a series splits,
    EVERY part's key is the UID plus its (FrameOfReferenceUID, StudyInstanceUID, PatientID): a
    part's id then depends on nothing but its own headers, never on which other parts happen to
    be in the folder, so a rerun with more or fewer parts can never reuse (resume) an output of
    a different part under the same id.
    """
    parts: dict[tuple[str, str, str], list[_DicomHeader]] = defaultdict(list)
    for h in members:
        parts[h.identity].append(h)
    if len(parts) == 1:
        return [(uid, members, "")]
    differing = [tag for i, tag in enumerate(_IDENTITY_TAGS) if len({k[i] for k in parts}) > 1]
    ordered = sorted(parts.items(), key=lambda kv: min(str(h.path) for h in kv[1]))
    out = []
    for n, (identity, part) in enumerate(ordered, start=1):
        note = (
            f"series split: its SeriesInstanceUID is shared by {len(parts)} groups of files that differ in "
            f"{'/'.join(differing)} (never merged into one volume); this is part {n} of {len(parts)}, "
            f"{len(part)} file(s)"
        )
        out.append(("/".join((uid, *identity)), part, note))
    return out


def _series_items(uid: str, key: str, members: list[_DicomHeader], note: str) -> list[SourceItem]:
    """The items of one part of a series: each multi-frame object, and the single-frame stack."""
    items: list[SourceItem] = []
    modality = members[0].modality
    multi = [h for h in members if h.multiframe]
    single = [h for h in members if not h.multiframe]
    for h in multi:
        # One enhanced object is one volume; several in one series get distinct ids.
        mf_key = key if len(multi) == 1 and not single else f"{key}/{h.sop_uid}"
        items.append(
            SourceItem(
                "dicom",
                pseudonymous_case_id(mf_key),
                (h.path,),
                uid,
                modality,
                "ok",
                note,
                {"multiframe": True},
            )
        )
    if not single:
        return items
    unplaced = [h for h in single if h.placement]
    if unplaced and all(h.placement == _NO_GEOMETRY for h in single):
        # A series of plain 2D pictures (secondary capture, X-ray): nothing to stack, not an error.
        reason = f"2D image without patient geometry ({_NO_GEOMETRY})"
        return items + [_skip(h.path, reason, modality, uid) for h in single]
    case_id = pseudonymous_case_id(key)
    if unplaced:
        first = min(unplaced, key=lambda h: str(h.path))
        reason = (
            f"{len(unplaced)} of {len(single)} file(s) of the series cannot be placed in the world "
            f"({printable_path(first.path.name)}: {first.placement}); a slice that cannot be placed leaves "
            "the series incomplete, like a missing slice: fix or re-export the series"
        )
        paths = tuple(h.path for h in single)
        return items + [SourceItem("dicom", case_id, paths, uid, modality, "error", _join(note, reason))]
    return items + _split_orientations(uid, case_id, single, modality, note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _split_orientations(
    uid: str, case_id: str, members: list[_DicomHeader], modality: str, note: str = ""
) -> list[SourceItem]:
    """Group a series' slices by orientation; split off small localizer stacks, reject the rest."""
    groups: list[tuple[np.ndarray, list[_DicomHeader]]] = []
    for h in members:
        iop = np.asarray(h.orientation, dtype=np.float64)
        for ref, group in groups:
            if iop.shape == ref.shape and np.allclose(iop, ref, atol=_ORIENTATION_TOL):
                group.append(h)
                break
        else:
            groups.append((iop, [h]))
    if len(groups) == 1:
        return [SourceItem("dicom", case_id, tuple(h.path for h in members), uid, modality, "ok", note)]
    groups.sort(key=lambda g: -len(g[1]))
    main, rest = groups[0][1], [g[1] for g in groups[1:]]
    counts = ", ".join(str(len(g[1])) for g in groups)
    if len(main) <= MAX_LOCALIZER_SLICES or any(len(g) > MAX_LOCALIZER_SLICES for g in rest):
        reason = (
            f"mixed orientations: {len(groups)} different ImageOrientationPatient stacks "
            f"({counts} slices) in one series; export each stack as its own series"
        )
        paths = tuple(h.path for h in members)
        return [SourceItem("dicom", case_id, paths, uid, modality, "error", _join(note, reason))]
    n_loc = sum(len(g) for g in rest)
    split = f"mixed orientations: split off {n_loc} localizer slice(s) with a different orientation"
    items = [
        SourceItem("dicom", case_id, tuple(h.path for h in main), uid, modality, "ok", _join(split, note))
    ]
    for group in rest:
        items.append(
            SourceItem(
                "dicom",
                "",
                tuple(h.path for h in group),
                uid,
                modality,
                "skipped",
                f"localizer: {len(group)} slice(s) whose orientation differs from the main stack",
            )
        )
    return items


def _mark_case_id_collisions(items: list[SourceItem]) -> list[SourceItem]:
    """Two inputs mapping to one case id would overwrite each other: keep the first, flag the rest."""
    seen: dict[str, SourceItem] = {}
    out = []
    for item in items:
        if item.status == "ok" and item.case_id:
            first = seen.get(item.case_id)
            if first is not None:
                item = SourceItem(
                    item.kind,
                    item.case_id,
                    item.paths,
                    item.series_uid,
                    item.modality,
                    "error",
                    f"case id {item.case_id!r} also produced by {first.paths[0]}; rename one file",
                )
            else:
                seen[item.case_id] = item
        out.append(item)
    return out


def _discover_msd(root: Path) -> list[SourceItem]:
    """An MSD dataset: imagesTr/ and imagesTs/ files, channels ``CASE_0000.nii.gz`` merged per case."""
    declared = 0
    try:
        dataset = json.loads((root / "dataset.json").read_text())
        channels = (
            dataset.get("channel_names") or dataset.get("modality") if isinstance(dataset, dict) else None
        )
        declared = len(channels) if isinstance(channels, dict | list) else 0
    except (OSError, ValueError) as exc:
        logger.warning("dataset.json in %s unreadable (%s); ingesting image folders anyway", root, exc)
    items: list[SourceItem] = []
    for sub in ("imagesTr", "imagesTs"):
        folder = root / sub
        if not folder.is_dir():
            continue
        cases: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        files, entries = walk_source_tree(folder)
        items.extend(SourceItem("other", "", (e.path,), status=e.status, reason=e.reason) for e in entries)
        for path in files:
            if path.parent != folder or path.name.startswith(".") or _file_kind(path) == "dicom":
                items.append(_skip(path, "not an image file of an MSD dataset"))
                continue
            match = _CHANNEL_SUFFIX.match(_stem(path))
            case, channel = (match["case"], int(match["channel"])) if match else (_stem(path), 0)
            cases[case].append((channel, path))
        for case, channels in cases.items():
            channels.sort()
            kind = _file_kind(channels[0][1])
            numbers = [c for c, _ in channels]
            status, reason = "ok", ""
            if numbers != list(range(len(numbers))):
                status, reason = "error", f"channels {numbers} are not numbered 0..{len(numbers) - 1}"
            items.append(
                SourceItem(
                    kind,
                    sanitize_case_id(case),
                    tuple(p for _, p in channels),
                    status=status,
                    reason=reason,
                    # The number of channels dataset.json declares: a 4D file may carry them.
                    meta={"declared_channels": declared},
                )
            )
    return sorted(_mark_case_id_collisions(items), key=lambda it: (it.kind, it.case_id))
