"""Header-only discovery of what a source folder holds: DICOM series, NIfTI, NRRD/MHA, MSD datasets.

Discovery never decodes pixels. The tree is walked by :func:`preprocessing.source_tree.walk_source_tree`
(regular files only, links followed once, unlistable folders reported). Files named like NIfTI or
NRRD/MHA images are one case each; every other file is a DICOM candidate: its header is scanned
(:mod:`preprocessing.dicom.scan`) and the headers are grouped into series, split by identity and
orientation (:mod:`preprocessing.dicom.grouping`). An MSD dataset folder is discovered by
:mod:`preprocessing.msd_discovery`. Everything met -- including junk files, special files, links
and non-image DICOM objects (SR, presentation states, RT, SEG, DICOMDIR) -- yields one
:class:`~preprocessing.source_item.SourceItem` with a status and a reason, so the manifest
accounts for every file.

Validation that needs every header in full (gaps, tilt, duplicates, rows/columns) happens when the
series is read (:func:`preprocessing.dicom.series.read_dicom_series`), on the worker that reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from preprocessing.dicom.grouping import group_dicom_headers
from preprocessing.dicom.scan import ScannedHeader, scan_dicom_headers
from preprocessing.image import sanitize_case_id
from preprocessing.image_files import image_file_kind, strip_image_suffix
from preprocessing.msd_discovery import discover_msd_sources, is_msd_folder
from preprocessing.source_item import SourceItem, mark_case_id_collisions, skipped_item
from preprocessing.source_tree import classify_path, walk_source_tree

logger = logging.getLogger(__name__)


def discover_sources(
    source: Path, *, processes: int | None = None, exclude: Iterable[str | os.PathLike] = ()
) -> list[SourceItem]:
    """Scan ``source`` (a file or folder tree) reading headers only.

    Args:
        source: a folder of DICOM/NIfTI/NRRD/MHA files (nested, any names), an MSD dataset
            folder (``dataset.json`` + ``imagesTr/``), or a single image file.
        processes: header-reading processes for large trees (default: CPU count, at most 8;
            1 reads in this process). Trees under
            :data:`preprocessing.dicom.scan.PARALLEL_SCAN_MIN_FILES` files are always read here,
            where starting processes would cost more than it saves.
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
    if is_msd_folder(source):
        return discover_msd_sources(source)
    items: list[SourceItem] = []
    if source.is_dir():
        files, entries = walk_source_tree(source, exclude)
        items.extend(SourceItem("other", "", (e.path,), status=e.status, reason=e.reason) for e in entries)
    else:
        kind, reason = classify_path(source)
        files = [source] if kind == "file" else []
        if reason:
            items.append(skipped_item(source, reason))
    candidates: list[Path] = []
    for path in files:
        kind = image_file_kind(path)
        if kind:
            items.append(SourceItem(kind, sanitize_case_id(strip_image_suffix(path.name)), (path,)))
        else:
            candidates.append(path)
    headers: list[ScannedHeader] = []
    for header_or_item in scan_dicom_headers(candidates, processes):
        if isinstance(header_or_item, SourceItem):
            items.append(header_or_item)
        else:
            headers.append(header_or_item)
    items.extend(group_dicom_headers(headers))
    items = mark_case_id_collisions(items)
    logger.info("discovered %d items in %d files under %s", len(items), len(files), source)
    return sorted(items, key=lambda it: (it.kind, it.case_id, str(it.paths[0]) if it.paths else ""))
