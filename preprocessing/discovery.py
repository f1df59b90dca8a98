"""Header-only discovery of what a source folder holds: DICOM series, NIfTI, NRRD/MHA, MSD datasets.

Discovery never decodes pixels. DICOM files are grouped by SeriesInstanceUID; within a series,
slices whose orientation differs from the main stack (localizers) are split off and skipped with a
reason, and a series made of several large stacks of different orientation is rejected. Everything
met -- including junk files and non-image DICOM objects (SR, presentation states, RT, SEG,
DICOMDIR) -- yields one :class:`SourceItem` with a status and a reason, so the manifest accounts
for every file.

Validation that needs every header in full (gaps, tilt, duplicates, rows/columns) happens when the
series is read (:func:`preprocessing.dicom_series.read_dicom_series`), on the worker that reads it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import threading
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from preprocessing.image import pseudonymous_case_id, sanitize_case_id

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


@dataclass
class _DicomHeader:
    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    orientation: tuple[float, ...] | None
    multiframe: bool


def discover_sources(source: Path, *, processes: int | None = None) -> list[SourceItem]:
    """Scan ``source`` (a file or folder tree) reading headers only.

    Args:
        source: a folder of DICOM/NIfTI/NRRD/MHA files (nested, any names), an MSD dataset
            folder (``dataset.json`` + ``imagesTr/``), or a single image file.
        processes: header-reading processes for large trees (default: CPU count, at most 8;
            1 reads in this process). Trees under :data:`PARALLEL_SCAN_MIN_FILES` files are
            always read here, where starting processes would cost more than it saves.

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
    files = [source] if source.is_file() else _walk_files(source)
    items: list[SourceItem] = []
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


def _walk_files(root: Path) -> list[Path]:
    out: list[Path] = []
    # os.walk with followlinks=False: a symlink loop in a hospital share must not hang the scan.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


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
        return _skip(path, "DICOM object without pixel data", modality, series_uid)
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
    orientation = None
    if not multiframe:
        iop = ds.get("ImageOrientationPatient")
        if iop is None or ds.get("ImagePositionPatient") is None:
            return _skip(
                path,
                "2D image without patient geometry (no ImagePosition/OrientationPatient)",
                modality,
                series_uid,
            )
        orientation = tuple(float(v) for v in iop)
    return _DicomHeader(
        path, series_uid, str(ds.get("SOPInstanceUID", "")), modality, orientation, multiframe
    )


def _group_dicom(headers: list[_DicomHeader]) -> list[SourceItem]:
    by_series: dict[str, list[_DicomHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    items: list[SourceItem] = []
    for uid, members in by_series.items():
        modality = members[0].modality
        multi = [h for h in members if h.multiframe]
        single = [h for h in members if not h.multiframe]
        for h in multi:
            # One enhanced object is one volume; several in one series get distinct ids.
            key = uid if len(multi) == 1 and not single else f"{uid}/{h.sop_uid}"
            items.append(
                SourceItem(
                    "dicom", pseudonymous_case_id(key), (h.path,), uid, modality, meta={"multiframe": True}
                )
            )
        if single:
            items.extend(_split_orientations(uid, single, modality))
    return items


def _split_orientations(uid: str, members: list[_DicomHeader], modality: str) -> list[SourceItem]:
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
    case_id = pseudonymous_case_id(uid)
    if len(groups) == 1:
        return [SourceItem("dicom", case_id, tuple(h.path for h in members), uid, modality)]
    groups.sort(key=lambda g: -len(g[1]))
    main, rest = groups[0][1], [g[1] for g in groups[1:]]
    counts = ", ".join(str(len(g[1])) for g in groups)
    if len(main) <= MAX_LOCALIZER_SLICES or any(len(g) > MAX_LOCALIZER_SLICES for g in rest):
        reason = (
            f"mixed orientations: {len(groups)} different ImageOrientationPatient stacks "
            f"({counts} slices) in one series; export each stack as its own series"
        )
        return [SourceItem("dicom", case_id, tuple(h.path for h in members), uid, modality, "error", reason)]
    n_loc = sum(len(g) for g in rest)
    note = f"mixed orientations: split off {n_loc} localizer slice(s) with a different orientation"
    items = [SourceItem("dicom", case_id, tuple(h.path for h in main), uid, modality, "ok", note)]
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
    try:
        json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        logger.warning("dataset.json in %s unreadable (%s); ingesting image folders anyway", root, exc)
    items: list[SourceItem] = []
    for sub in ("imagesTr", "imagesTs"):
        folder = root / sub
        if not folder.is_dir():
            continue
        cases: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or _file_kind(path) == "dicom":
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
                    kind, sanitize_case_id(case), tuple(p for _, p in channels), status=status, reason=reason
                )
            )
    return sorted(_mark_case_id_collisions(items), key=lambda it: (it.kind, it.case_id))
