"""``OUT/review.csv``: every case of a batch, the ones that most need a human look first.

Order: failed cases (``status`` ``error``: no result at all) first, then the segmented cases by
their :func:`pipeline.qc_flags.risk_score` (highest first), then the cases that were not segmented
(skipped by discovery or for the model); ties by ``case_id``. Columns: ``case_id, status, risk,
flags, top_reason``. ``risk`` is empty for a case that was not segmented; ``top_reason`` is the
reason of the flag with the largest weight (for a failed or skipped case: its ``reason_code``, never
the free-text reason, so the file holds label names and numbers only and may be logged to MLflow).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.case_row import CaseRow
from pipeline.qc_flags import FLAG_NAMES, risk_score, top_flag
from preprocessing.atomic import write_text_atomic
from preprocessing.source_tree import printable_text

REVIEW_FILE = "review.csv"
REVIEW_COLUMNS = ("case_id", "status", "risk", "flags", "top_reason")


def case_risk(row: CaseRow) -> float | None:
    """The row's risk score (``None`` for a case that was not segmented)."""
    if not row.ok:
        return None
    uncertainty = getattr(row, "uncertainty", None)  # set by --uncertainty
    return risk_score(row.flags, None if uncertainty is None else uncertainty.score)


def review_table(rows: Sequence[CaseRow]) -> pd.DataFrame:
    """The review queue as a table, in its order (see the module docstring)."""
    records = []
    for row in rows:
        risk = case_risk(row)
        top = top_flag(row.flags)
        reason = top.reason if top is not None else ("" if row.ok else row.reason_code or row.status)
        rank = 0 if row.status == "error" else 1 if row.ok else 2
        records.append(
            {
                "case_id": printable_text(row.case_id),
                "status": printable_text(row.status),
                "risk": risk,
                "flags": ";".join(flag.name for flag in row.flags),
                "top_reason": printable_text(reason),
                "_rank": rank,
                "_key": -(risk or 0.0),
            }
        )
    table = pd.DataFrame(records, columns=[*REVIEW_COLUMNS, "_rank", "_key"])
    table = table.sort_values(["_rank", "_key", "case_id"], kind="stable")
    return table[list(REVIEW_COLUMNS)].reset_index(drop=True)


def write_review_queue(out_dir: Path, rows: Sequence[CaseRow]) -> Path:
    """Write ``out_dir/review.csv`` atomically; returns its path."""
    path = Path(out_dir) / REVIEW_FILE
    write_text_atomic(path, review_table(rows).to_csv(index=False))
    return path


def flag_counts(rows: Sequence[CaseRow]) -> dict[str, int]:
    """``{"cases_flagged": n, "flag_<name>": n, ...}``: segmented cases with any flag / with each flag.

    Every name of :data:`~pipeline.qc_flags.FLAG_NAMES` is counted (0 included) and only those: the
    keys are fixed identifiers, safe as MLflow metric names whatever a read-back ``case.json`` holds.
    """
    counts: Counter[str] = Counter()
    for row in rows:
        if row.ok:
            counts.update({flag.name for flag in row.flags})
    flagged = sum(bool(row.flags) for row in rows if row.ok)
    return {"cases_flagged": flagged, **{f"flag_{name}": counts[name] for name in FLAG_NAMES}}
