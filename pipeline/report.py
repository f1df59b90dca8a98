"""``OUT/report.html``: one page for a whole batch, to review it in a browser or in MLflow.

The page (Jinja2 templates in ``pipeline/templates/``, autoescaped: every value is escaped) holds
the model (name, version, date), a table of every case sortable by any column (plain JavaScript
inside the page: nothing is fetched from anywhere, the page works offline inside the hospital) with
status, QC flags, risk (:func:`pipeline.review.case_risk`), volume per label, Dice / HD95 / NSD per
label when the batch had ``--labels``, the uncertainty score when it had ``--uncertainty``, and a
thumbnail of each case's QC picture that opens the full picture; then every case that was not
segmented, with its reason.

Two variants:

* local (default): ``OUT/report.html``, thumbnails are relative links to ``<case_id>/qc.png`` (no
  copy of the pictures; the page must stay in OUT), failures show the free-text reason and source
  path (they never leave the output folder).
* ``for_mlflow=True``: for the batch run's artifacts. No ``source`` and no free-text ``reason``
  (they may hold paths and patient names): failures show ``case_id`` and ``reason_code`` only;
  the thumbnails are embedded (base64 PNG) since MLflow shows the page alone, without the case
  folders. Flag reasons are kept: they hold label names and numbers only (:mod:`pipeline.qc_flags`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.case_row import CaseRow
from pipeline.metrics import ReferenceMetrics
from pipeline.review import case_risk
from preprocessing.atomic import write_text_atomic
from preprocessing.source_tree import printable_text

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MLFLOW_REPORT_FILE = "report.mlflow.html"
QC_FILE = "qc.png"  # pipeline.writers.qc_picture.QcPictureWriter.filename
THUMBNAIL_PX = 480  # longest side of an embedded thumbnail (shown at half size until clicked)
TEMPLATES = Path(__file__).parent / "templates"
_METRIC_UNITS = {"dice": "", "hd95": " mm", "nsd": ""}


def write_batch_report(
    out_dir: Path,
    rows: Sequence[CaseRow],
    model: Mapping[str, Any],
    *,
    for_mlflow: bool = False,
    path: Path | None = None,
    embed_thumbnails: bool | None = None,
) -> Path:
    """Write the batch report atomically; returns its path.

    Args:
        out_dir: the batch output folder (holds ``<case_id>/qc.png``).
        rows: every case of the batch, in the order of ``cases.csv``.
        model: ``name``, ``version`` and optionally ``date`` (default: now, UTC) of the model; in the
            local variant any further keys are listed under the model too (never in ``for_mlflow``).
        for_mlflow: the variant without source paths and free-text reasons (module docstring).
        path: where to write; default ``out_dir/report.html`` (``out_dir/report.mlflow.html`` for
            ``for_mlflow``).
        embed_thumbnails: embed the QC thumbnails as base64 instead of linking them; default
            ``for_mlflow``.
    """
    out_dir = Path(out_dir)
    embed = for_mlflow if embed_thumbnails is None else embed_thumbnails
    target = Path(path) if path is not None else out_dir / (MLFLOW_REPORT_FILE if for_mlflow else REPORT_FILE)
    context = report_context(out_dir, rows, model, for_mlflow=for_mlflow, embed=embed)
    return write_text_atomic(target, _render(context))


def write_batch_report_or_warn(
    out_dir: Path, rows: Sequence[CaseRow], model: Mapping[str, Any]
) -> Path | None:
    """The local :func:`write_batch_report` at the end of a batch: a review aid, so a failure to
    write it is logged as a warning (the batch's results are written already) and gives ``None``."""
    try:
        return write_batch_report(out_dir, rows, model)
    except Exception:
        logger.warning("%s not written", Path(out_dir) / REPORT_FILE, exc_info=True)
        return None


def report_context(
    out_dir: Path, rows: Sequence[CaseRow], model: Mapping[str, Any], *, for_mlflow: bool, embed: bool
) -> dict[str, Any]:
    """The values the template shows (plain strings and numbers; the template escapes them)."""
    labels = list(dict.fromkeys(label for row in rows for label in row.volumes_ml))
    metric_labels = list(dict.fromkeys(label for row in rows for label in row.metrics))
    has_uncertainty = any(row.uncertainty is not None for row in rows)
    columns = ["case", "status", "flags", "risk"] + [f"{label} mL" for label in labels]
    columns += [
        f"{m} {label}{_METRIC_UNITS.get(m, '')}" for label in metric_labels for m in ReferenceMetrics.names()
    ]
    columns += ["uncertainty"] if has_uncertainty else []
    cases = [
        _case_entry(out_dir, row, labels, metric_labels, has_uncertainty, embed=embed, for_mlflow=for_mlflow)
        for row in rows
    ]
    failures = [_failure_entry(row, for_mlflow) for row in rows if not row.ok]
    counts: dict[str, int] = {}
    for row in rows:
        counts[printable_text(row.status)] = counts.get(printable_text(row.status), 0) + 1
    return {
        "model": _model_entries(model, for_mlflow),
        "columns": columns,
        "cases": cases,
        "failures": failures,
        "counts": counts,
        "flagged": sum(bool(row.flags) for row in rows if row.ok),
        "for_mlflow": for_mlflow,
    }


def _render(context: Mapping[str, Any]) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined  # heavy-ish: only when writing

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)
    return env.get_template("report.html").render(**context)


def _model_entries(model: Mapping[str, Any], for_mlflow: bool) -> list[tuple[str, str]]:
    date = model.get("date") or datetime.now(UTC).isoformat(timespec="seconds")
    entries = [
        ("model", str(model.get("name") or "unnamed")),
        ("version", str(model.get("version") or "")),
        ("date", str(date)),
    ]
    if not for_mlflow:  # a model URI may be a local path: only in the local page
        entries += [(str(k), str(v)) for k, v in model.items() if k not in ("name", "version", "date")]
    return [(k, printable_text(v)) for k, v in entries]


def _cell(value: float | None, digits: int = 3) -> dict[str, Any]:
    """A numeric cell: its text and its sort key (empty / NaN sort last)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"text": "", "sort": ""}
    return {"text": f"{value:.{digits}f}", "sort": repr(float(value))}


def _case_entry(
    out_dir: Path,
    row: CaseRow,
    labels: Sequence[str],
    metric_labels: Sequence[str],
    has_uncertainty: bool,
    *,
    embed: bool,
    for_mlflow: bool,
) -> dict[str, Any]:
    cells = [_cell(row.volumes_ml.get(label), 1) for label in labels]
    for label in metric_labels:
        measured = row.metrics.get(label)
        cells += [_cell(None if measured is None else getattr(measured, m)) for m in ReferenceMetrics.names()]
    if has_uncertainty:
        cells.append(_cell(None if row.uncertainty is None else row.uncertainty.score))
    picture = Path(out_dir) / row.case_id / QC_FILE
    has_picture = row.ok and picture.is_file()
    return {
        "case_id": printable_text(row.case_id),
        "status": printable_text(row.status),
        "note": printable_text(row.reason_code if for_mlflow else row.reason) if row.ok else "",
        "flags": [(f.name, printable_text(f.reason)) for f in row.flags],
        "risk": _cell(case_risk(row), 2),
        "cells": cells,
        "picture_href": f"{quote(printable_text(row.case_id))}/{QC_FILE}" if has_picture else "",
        "thumbnail": _thumbnail(picture) if has_picture and embed else "",
    }


def _failure_entry(row: CaseRow, for_mlflow: bool) -> dict[str, str]:
    entry = {
        "case_id": printable_text(row.case_id),
        "status": printable_text(row.status),
        "reason_code": printable_text(row.reason_code),
    }
    if not for_mlflow:
        entry.update(reason=printable_text(row.reason), source=printable_text(row.source))
    return entry


def _thumbnail(picture: Path) -> str:
    """``data:`` URI of a PNG thumbnail of ``picture`` (longest side ``THUMBNAIL_PX``)."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(picture) as image:
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
