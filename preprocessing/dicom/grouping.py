"""Scanned DICOM headers -> one :class:`~preprocessing.source_item.SourceItem` per case or skipped file.

Files are grouped by SeriesInstanceUID; slices of one SeriesInstanceUID that differ in
FrameOfReferenceUID, StudyInstanceUID or PatientID are never merged: each such group becomes its
own case (see :func:`_split_by_identity` for the case ids). Within a group, slices whose
orientation differs from the main stack (localizers) are split off and skipped with a reason, a
series made of several large stacks of different orientation is rejected, and a slice that cannot
be placed in the world (ImagePositionPatient/ImageOrientationPatient missing or not finite) makes
the whole series an error, like a missing slice.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from preprocessing.dicom.scan import IDENTITY_TAGS, NO_GEOMETRY, TRUNCATED, ScannedHeader
from preprocessing.image import pseudonymous_case_id
from preprocessing.source_item import SourceItem, join_notes, skipped_item
from preprocessing.source_tree import printable_path

#: A stack of at most this many slices with an orientation other than the series' main stack is
#: treated as a localizer (scout) and split off, not a reason to reject the series.
MAX_LOCALIZER_SLICES = 3
# Two slices belong to the same stack when their ImageOrientationPatient agree to this. Coarser
# than the reader's ORIENTATION_TOL (decimal rounding within one stack): here it only has to tell
# a localizer (a different plane) from the main stack.
_SAME_STACK_IOP_TOL = 1e-3


def group_dicom_headers(headers: list[ScannedHeader]) -> list[SourceItem]:
    """The items of all scanned image files: cases (ok or error) and split-off localizers."""
    by_series: dict[str, list[ScannedHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    items: list[SourceItem] = []
    for uid, members in by_series.items():
        truncated = sorted(
            (h for h in members if h.placement.startswith(TRUNCATED)), key=lambda h: str(h.path)
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


def _split_by_identity(uid: str, members: list[ScannedHeader]) -> list[tuple[str, list[ScannedHeader], str]]:
    """Parts of one SeriesInstanceUID that share frame of reference, study and patient.

    Returns (case-id key, headers, note) per part. A series that is one part keeps its plain
    key (the SeriesInstanceUID), so its case id is the one it always had. When a series splits,
    EVERY part's key is the UID plus its (FrameOfReferenceUID, StudyInstanceUID, PatientID): a
    part's id then depends on nothing but its own headers, never on which other parts happen to
    be in the folder, so a rerun with more or fewer parts can never reuse (resume) an output of
    a different part under the same id.
    """
    parts: dict[tuple[str, str, str], list[ScannedHeader]] = defaultdict(list)
    for h in members:
        parts[h.identity].append(h)
    if len(parts) == 1:
        return [(uid, members, "")]
    differing = [tag for i, tag in enumerate(IDENTITY_TAGS) if len({k[i] for k in parts}) > 1]
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


def _series_items(uid: str, key: str, members: list[ScannedHeader], note: str) -> list[SourceItem]:
    """The items of one part of a series: each multi-frame object, and the single-frame stack."""
    modality = members[0].modality
    multi = [h for h in members if h.multiframe]
    single = [h for h in members if not h.multiframe]
    items: list[SourceItem] = []
    for h in multi:
        # One enhanced object is one volume; several in one series get distinct ids.
        mf_key = key if len(multi) == 1 and not single else f"{key}/{h.sop_uid}"
        case_id = pseudonymous_case_id(mf_key)
        items.append(SourceItem("dicom", case_id, (h.path,), uid, modality, "ok", note, {"multiframe": True}))
    if not single:
        return items
    unplaced = [h for h in single if h.placement]
    if unplaced and all(h.placement == NO_GEOMETRY for h in single):
        # A series of plain 2D pictures (secondary capture, X-ray): nothing to stack, not an error.
        reason = f"2D image without patient geometry ({NO_GEOMETRY})"
        return items + [skipped_item(h.path, reason, modality, uid) for h in single]
    case_id = pseudonymous_case_id(key)
    if unplaced:
        first = min(unplaced, key=lambda h: str(h.path))
        reason = (
            f"{len(unplaced)} of {len(single)} file(s) of the series cannot be placed in the world "
            f"({printable_path(first.path.name)}: {first.placement}); a slice that cannot be placed leaves "
            "the series incomplete, like a missing slice: fix or re-export the series"
        )
        paths = tuple(h.path for h in single)
        return items + [SourceItem("dicom", case_id, paths, uid, modality, "error", join_notes(note, reason))]
    return items + _split_orientations(uid, case_id, single, modality, note)


def _orientation_groups(members: list[ScannedHeader]) -> list[list[ScannedHeader]]:
    """Slices grouped by ImageOrientationPatient, largest group first (stable among equals)."""
    groups: list[tuple[np.ndarray, list[ScannedHeader]]] = []
    for h in members:
        iop = np.asarray(h.orientation, dtype=np.float64)
        for ref, group in groups:
            if iop.shape == ref.shape and np.allclose(iop, ref, atol=_SAME_STACK_IOP_TOL):
                group.append(h)
                break
        else:
            groups.append((iop, [h]))
    groups.sort(key=lambda g: -len(g[1]))
    return [group for _, group in groups]


def _split_orientations(
    uid: str, case_id: str, members: list[ScannedHeader], modality: str, note: str = ""
) -> list[SourceItem]:
    """Group a series' slices by orientation; split off small localizer stacks, reject the rest."""
    groups = _orientation_groups(members)
    if len(groups) == 1:
        return [SourceItem("dicom", case_id, tuple(h.path for h in members), uid, modality, "ok", note)]
    main, rest = groups[0], groups[1:]
    counts = ", ".join(str(len(g)) for g in groups)
    if len(main) <= MAX_LOCALIZER_SLICES or any(len(g) > MAX_LOCALIZER_SLICES for g in rest):
        reason = (
            f"mixed orientations: {len(groups)} different ImageOrientationPatient stacks "
            f"({counts} slices) in one series; export each stack as its own series"
        )
        paths = tuple(h.path for h in members)
        return [SourceItem("dicom", case_id, paths, uid, modality, "error", join_notes(note, reason))]
    n_loc = sum(len(g) for g in rest)
    split = f"mixed orientations: split off {n_loc} localizer slice(s) with a different orientation"
    main_paths = tuple(h.path for h in main)
    items = [SourceItem("dicom", case_id, main_paths, uid, modality, "ok", join_notes(split, note))]
    for group in rest:
        reason = f"localizer: {len(group)} slice(s) whose orientation differs from the main stack"
        items.append(SourceItem("dicom", "", tuple(h.path for h in group), uid, modality, "skipped", reason))
    return items
