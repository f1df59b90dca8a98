"""Discovery of an MSD dataset folder given as an ingestion source: its image files as cases.

Which files are the cases and channels of an MSD folder is decided by
:func:`preprocessing.msd.group_case_channels` (the training reader uses the same function); this
module turns them into :class:`~preprocessing.source_item.SourceItem` rows for ingestion, where
a bad case is an error row rather than an exception, and NRRD/MHA files are read too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from preprocessing.image import sanitize_case_id
from preprocessing.image_files import image_file_kind
from preprocessing.msd import channel_numbering_problem, group_case_channels
from preprocessing.source_item import SourceItem, mark_case_id_collisions, skipped_item
from preprocessing.source_tree import walk_source_tree

logger = logging.getLogger(__name__)

_IMAGE_FOLDERS = ("imagesTr", "imagesTs")


def is_msd_folder(source: Path) -> bool:
    """True for a folder holding ``dataset.json`` and ``imagesTr/`` (an MSD / nnU-Net v2 dataset)."""
    return source.is_dir() and (source / "dataset.json").is_file() and (source / "imagesTr").is_dir()


def discover_msd_sources(root: Path) -> list[SourceItem]:
    """An MSD dataset: imagesTr/ and imagesTs/ files, channels ``CASE_0000.nii.gz`` merged per case.

    Returns:
        One item per case (ok, or an error when its channels are not numbered 0..C-1; each with
        ``meta["declared_channels"]``, what ``dataset.json`` declares, since a 4D file may carry
        them), one skipped item per file that is not a case image, one per unlistable entry;
        sorted by (kind, case_id).
    """
    declared = _declared_channels(root / "dataset.json")
    items: list[SourceItem] = []
    for sub in _IMAGE_FOLDERS:
        folder = root / sub
        if not folder.is_dir():
            continue
        files, entries = walk_source_tree(folder)
        items.extend(SourceItem("other", "", (e.path,), status=e.status, reason=e.reason) for e in entries)
        case_files = []
        for path in files:
            if path.parent != folder or path.name.startswith(".") or not image_file_kind(path):
                items.append(skipped_item(path, "not an image file of an MSD dataset"))
            else:
                case_files.append(path)
        for case, channels in group_case_channels(case_files).items():
            reason = channel_numbering_problem(channels)
            items.append(
                SourceItem(
                    image_file_kind(channels[0][1]),
                    sanitize_case_id(case),
                    tuple(p for _, p in channels),
                    status="error" if reason else "ok",
                    reason=reason,
                    meta={"declared_channels": declared},
                )
            )
    return sorted(mark_case_id_collisions(items), key=lambda it: (it.kind, it.case_id))


def _declared_channels(path: Path) -> int:
    """How many channels ``dataset.json`` declares; 0 when it cannot say.

    Lenient on purpose (unlike :func:`preprocessing.msd.read_msd_dataset`): ingestion only needs
    the count to accept 4D files, and reads the image folders even when the file is broken.
    """
    try:
        dataset = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("dataset.json in %s unreadable (%s); ingesting image folders anyway", path.parent, exc)
        return 0
    channels = dataset.get("channel_names") or dataset.get("modality") if isinstance(dataset, dict) else None
    return len(channels) if isinstance(channels, dict | list) else 0
