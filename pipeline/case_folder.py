"""A case's output folder: private staging, the atomic publish, and resume.

Atomicity: every output of a case is written into a private staging folder
``OUT/.staging/<case_id>.<pid>.<thread>/`` and the folder is renamed to ``OUT/<case_id>/`` as the
very last step. A rename of a directory is atomic on POSIX file systems, so a case folder either
exists complete (with ``case.json``, its row of ``cases.csv``) or not at all; a SIGKILL at any
moment leaves at most a staging folder, which the next run deletes.

``case.json`` holds the row's columns (:meth:`CaseRow.to_record`) plus the provenance keys of
:data:`CASE_PROVENANCE` (``model_name``, ``model_version``, ``written_utc`` ISO 8601 UTC,
``label_names`` value -> name), which :func:`read_case_record` leaves out of the row (they are not
``cases.csv`` columns).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.case_row import CaseRow

CASE_RECORD = "case.json"
STAGING = ".staging"
#: Keys of ``case.json`` that are not columns of the row (see the module docstring).
CASE_PROVENANCE = ("model_name", "model_version", "written_utc", "label_names")


@dataclass(frozen=True)
class CaseModel:
    """The model a case was made with, as recorded in its ``case.json``.

    Attributes:
        name: registered model name ("" for a plain folder); ``version``: its version tag.
        label_names: foreground label value -> name.
    """

    name: str = ""
    version: str = ""
    label_names: Mapping[int, str] = field(default_factory=dict)


def case_is_done(out_dir: Path, case_id: str, model_fingerprint: str = "") -> bool:
    """True when a previous run finished this case (ok or deliberately skipped) with this model.

    Failed cases publish no folder, so a rerun retries them; a case finished by a different
    model (another ``model_fingerprint``) counts as not done, so its outputs are replaced.
    """
    record = Path(out_dir) / case_id / CASE_RECORD
    if not record.is_file():
        return False
    return (
        not model_fingerprint or json.loads(record.read_text()).get("model_fingerprint") == model_fingerprint
    )


def read_case_record(out_dir: Path, case_id: str) -> CaseRow:
    """The row of a finished case, from its ``case.json``."""
    record = json.loads((Path(out_dir) / case_id / CASE_RECORD).read_text())
    return CaseRow.from_record({k: v for k, v in record.items() if k not in CASE_PROVENANCE})


def clean_staging(out_dir: Path) -> int:
    """Delete staging folders left by a killed run. Returns how many were removed."""
    staging = Path(out_dir) / STAGING
    if not staging.is_dir():
        return 0
    leftovers = list(staging.iterdir())
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


def remove_empty_staging(out_dir: Path) -> None:
    """Remove ``OUT/.staging`` once the batch is over and it is empty (a rerun makes it again)."""
    try:
        (Path(out_dir) / STAGING).rmdir()
    except OSError:  # absent, or holds a folder another run is still writing
        pass


def staging_folder(out_dir: Path, case_id: str) -> Path:
    """This process's and thread's private staging folder of a case (not created here)."""
    return Path(out_dir) / STAGING / f"{case_id}.{os.getpid()}.{threading.get_ident()}"


def publish_case(row: CaseRow, staging: Path, out_dir: Path, model: CaseModel | None = None) -> None:
    """Write the case record (with ``model``'s provenance) into staging, then rename the folder into place."""
    staging.mkdir(parents=True, exist_ok=True)
    record = row.to_record()
    model = model or CaseModel()
    record.update(
        {
            "model_name": model.name,
            "model_version": model.version,
            "written_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "label_names": {str(value): name for value, name in sorted(model.label_names.items())},
        }
    )
    (staging / CASE_RECORD).write_text(json.dumps(record, indent=1, default=_json_default))
    final = Path(out_dir) / row.case_id
    if final.exists():  # made by another model: move it aside, put the new one in, then delete it
        stale = staging.with_name(staging.name + ".old")
        os.replace(final, stale)
        os.replace(staging, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, final)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
