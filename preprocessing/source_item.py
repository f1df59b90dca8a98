"""What discovery reports for each thing in a source folder: :class:`SourceItem`.

Its own module because every discoverer builds them -- the DICOM header scan
(:mod:`preprocessing.dicom.scan`, :mod:`preprocessing.dicom.grouping`), the MSD folder discovery
(:mod:`preprocessing.msd_discovery`) and :func:`preprocessing.discovery.discover_sources` -- and
the readers (:func:`preprocessing.volume_io.load_source_item`) consume them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.image import pseudonymous_case_id


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
        meta: facts for the reader, e.g. ``{"multiframe": True}`` for an enhanced object,
            ``{"declared_channels": 2}`` for an MSD case.
    """

    kind: str
    case_id: str
    paths: tuple[Path, ...]
    series_uid: str = ""
    modality: str = ""
    status: str = "ok"
    reason: str = ""
    meta: dict = field(default_factory=dict, compare=False)


def skipped_item(path: Path, reason: str, modality: str = "", series_uid: str = "") -> SourceItem:
    """A file deliberately not ingested (junk, a non-image object), with the reason."""
    return SourceItem("other", "", (path,), series_uid, modality, "skipped", reason)


def join_notes(*notes: str) -> str:
    """The non-empty notes joined with "; " (an item's reason may collect several)."""
    return "; ".join(n for n in notes if n)


def mark_case_id_collisions(items: list[SourceItem]) -> list[SourceItem]:
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


def row_case_id(item: SourceItem) -> str:
    """The case id of ``item``'s row in a manifest or ``cases.csv``.

    A skipped or broken file has no case id of its own; its row gets ``skipped-<12 hex>``, a salted
    hash of its path (never the path itself), so every row has a pseudonymous id that ingest and
    predict agree on.
    """
    if item.case_id:
        return item.case_id
    # The path's bytes (a non-UTF-8 file name is a surrogate-escaped str, which cannot be encoded).
    source = os.fsencode(item.paths[0]).hex() if item.paths else ""
    return "skipped-" + pseudonymous_case_id(source).removeprefix("case-")
