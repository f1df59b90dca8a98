"""MLflow logging of one batch-prediction run (``medseg predict``).

What is logged, and what is deliberately not:

* params: model name/version/URI and the non-identifying run settings; tags: ``medseg.job=predict``;
* metrics: case counts by status and per-label mean/median Dice, HD95, NSD and predicted volume;
* artifacts: ``cases.csv`` (and the same as an MLflow table ``cases.json``) reduced to
  :data:`LOGGED_TEXT_COLUMNS` and the numeric columns, ``failures.csv`` (``case_id, reason_code``),
  ``summary.json``, and QC pictures ``qc/<case_id>.png``.

Case ids are pseudonymous (salted hashes of SeriesInstanceUIDs, or the hospital's own NIfTI
names). Free text never leaves the output folder: not the source paths (folders are often named
after the patient, ``SMITH JOHN 19231117/CT/...``) and not the failure reasons, which quote paths
and file contents. What MLflow gets instead is the ``reason_code`` each row was given where it
was made, from the kind of failure only (``read:IngestError``, ``incompatible_modality``...); no
after-the-fact scrubbing of text, which cannot know where a name ends.

If the tracking server cannot be reached, nothing is raised: the masks and CSVs are already on
disk, a warning says what was not logged, and the caller turns ``False`` into exit code 4.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.tracking import Tracker, check_tracking_reachable, tracking_uri
from preprocessing.source_tree import printable_text

logger = logging.getLogger(__name__)

#: Text columns of ``cases.csv`` that may leave the hospital; every other text column (``source``,
#: ``reason``...) stays in the output folder. Numeric columns (seconds, volumes, metrics) go too.
#: ``flags`` holds only the fixed flag names of ``pipeline.qc_flags`` (their reasons stay in ``flag_reasons``).
LOGGED_TEXT_COLUMNS: tuple[str, ...] = ("case_id", "kind", "status", "reason_code", "model_fingerprint", "flags")
_NEVER_LOGGED = frozenset({"source", "reason"})


@dataclass(frozen=True)
class BatchRunInfo:
    """The batch run's model and settings.

    ``model_version`` is the bundle's ``version_tag`` (``NAME/vN``, or the code version of a plain
    folder); ``registry_version`` the bare registered version (``"3"``, "" for a folder) that the run
    is linked to; ``model_fingerprint`` tells a resumed batch of the same model from another model;
    ``run_name`` is ``--run-name`` ("" -> :func:`batch_run_name`).
    """

    experiment: str
    model_uri: str
    model_name: str = ""
    model_version: str = ""
    params: dict = field(default_factory=dict)
    registry_version: str = ""
    model_fingerprint: str = ""
    run_name: str = ""
    code_version: str = ""


def batch_run_name(info: BatchRunInfo) -> str:
    """``--run-name``, else ``predict NAME@vN`` (registered model), else ``predict bundle@<code version>``.

    Never a folder or file name: folder names can hold patient names.
    """
    if info.run_name:
        return printable_text(info.run_name)
    if info.model_name and info.registry_version:
        return f"predict {info.model_name}@v{info.registry_version}"
    return f"predict bundle@{(info.code_version or 'unregistered')[:12]}"


def batch_tags(info: BatchRunInfo) -> dict[str, str]:
    return {
        "medseg.job": "predict",
        "medseg.model_name": info.model_name,
        "medseg.model_version": info.model_version,
    }


def loggable_cases(table: pd.DataFrame) -> pd.DataFrame:
    """``cases.csv`` as it may leave the hospital: :data:`LOGGED_TEXT_COLUMNS` and numeric columns.

    A row without a ``reason_code`` (made by an older version) that is not ok gets its status as
    the code; text is made printable (a surrogate-escaped byte of an odd file name becomes ``\\xe9``).
    """
    # A text cell left empty (a discovery row has no model fingerprint) is "", as in cases.csv.
    columns = {c: _text_column(table[c]) for c in table.columns if c in LOGGED_TEXT_COLUMNS}
    for c in table.columns:
        numbers = None if c in columns or c in _NEVER_LOGGED else _as_numbers(table[c])
        if numbers is not None:
            columns[c] = numbers
    safe = pd.DataFrame(columns, index=table.index)
    codes = safe["reason_code"] if "reason_code" in safe.columns else pd.Series("", index=safe.index)
    codes = codes.fillna("").astype(str)
    status = safe["status"].fillna("").astype(str) if "status" in safe.columns else codes
    safe["reason_code"] = codes.where((codes != "") | (status == "ok"), status)
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(lambda v: printable_text(v) if isinstance(v, str) else v)
    return safe


def _text_column(column: pd.Series) -> pd.Series:
    return column.astype(object).where(column.notna(), "")


def _as_numbers(column: pd.Series) -> pd.Series | None:
    """The column as floats when every non-empty cell is a number (a CSV read back keeps "" for
    missing values, which makes a metric column text); ``None`` for a text column."""
    if pd.api.types.is_bool_dtype(column):
        return None
    if pd.api.types.is_numeric_dtype(column):
        return column
    filled = column.where(column.astype(str).str.strip() != "")
    if not filled.notna().any():
        return None
    numbers = pd.to_numeric(filled, errors="coerce")
    return numbers if bool((numbers.notna() == filled.notna()).all()) else None


def log_batch_run(
    info: BatchRunInfo, out_dir: Path, cases: pd.DataFrame, summary: dict, qc_sample: int | None = None
) -> bool:
    """Log the finished batch as one MLflow run. Returns False if it could not.

    Args:
        info: the run's model and parameters.
        out_dir: the batch folder (its ``<case_id>/qc.png`` pictures are logged).
        cases: the table written as ``cases.csv`` (rows of earlier runs of a resumed batch
            included); only :func:`loggable_cases` of it is logged.
        summary: what was written as ``summary.json`` (strict-JSON ready: ``None`` for undefined).
        qc_sample: log at most this many QC pictures (``None``: all).
    """
    uri = tracking_uri()
    problem = check_tracking_reachable(uri)
    if problem:
        _warn_not_logged(uri, problem, out_dir)
        return False
    try:
        _log(info, Path(out_dir), cases, summary, qc_sample, uri)
        return True
    except Exception as exc:  # the outputs are safe on disk; losing the log must not lose them
        _warn_not_logged(uri, f"{type(exc).__name__}: {exc}", out_dir)
        return False


def _warn_not_logged(uri: str, problem: str, out_dir: Path) -> None:
    logger.warning(
        "MLflow tracking at %s could not be used (%s). The masks, cases.csv and summary.json are in %s; "
        "NOT logged: the batch run, its metrics, the cases table and the QC pictures.",
        uri,
        problem,
        out_dir,
    )


def _log(
    info: BatchRunInfo, out: Path, table: pd.DataFrame, summary: dict, qc_sample: int | None, uri: str
) -> None:
    # Tracker creates the experiment with a local artifact root next to a sqlite store (never ./mlruns).
    run = Tracker(info.experiment, uri).start_run(batch_run_name(info), tags=batch_tags(info))
    status = "FAILED"
    try:
        log_batch_contents(run, info, out, table, summary, qc_sample)
        status = "FINISHED"
    finally:
        run.end(status)


def log_batch_contents(
    run: Tracker,
    info: BatchRunInfo,
    out: Path,
    table: pd.DataFrame,
    summary: dict,
    qc_sample: int | None,
    extra_artifacts: Sequence[Path] = (),
) -> None:
    """Log the finished batch into ``run`` (params, metrics, tables, pictures, ``review.csv`` and the
    ``extra_artifacts`` that exist, e.g. the MLflow variant of ``report.html``); the caller ends it."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        run.log_params(
            {
                "model_uri": _safe_model_uri(info.model_uri),
                "model_name": info.model_name,
                "model_version": info.model_version,
                **info.params,
            }
        )
        run.log_metrics(_summary_metrics(summary), step=0)
        safe = loggable_cases(table)
        safe.to_csv(tmp / "cases.csv", index=False)
        failed = safe[safe["status"] == "error"] if "status" in safe.columns else safe.iloc[:0]
        failed[["case_id", "reason_code"]].to_csv(tmp / "failures.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        for name in ("cases.csv", "failures.csv", "summary.json"):
            run.log_artifact(tmp / name)
        run.log_table(with_qc_thumbnails(safe, out, qc_sample), artifact_file="cases.json")
        _log_qc_pictures(run, table, out, tmp, qc_sample)
        if (out / "review.csv").is_file():  # pipeline.review: ids, codes, flag names, numbers
            run.log_artifact(out / "review.csv")
        for path in extra_artifacts:
            if Path(path).is_file():
                run.log_artifact(path)
    logger.info("batch logged to MLflow run %s (experiment %s)", run.run_id, info.experiment)


def _safe_model_uri(uri: str) -> str:
    """Registry and run URIs are fine; a local folder path is reduced to its last component."""
    if uri.startswith(("models:/", "runs:/")):
        return uri
    return Path(uri).name


def _summary_metrics(summary: dict) -> dict[str, float]:
    metrics = {f"cases_{status}": float(n) for status, n in summary.get("cases", {}).items()}
    metrics["cases_failed"] = float(summary.get("cases", {}).get("error", 0))
    metrics["cases_total"] = float(sum(summary.get("cases", {}).values()))
    # cases_flagged and flag_<name> (pipeline.review.flag_counts: fixed names, counted from the rows)
    metrics.update({name: float(n) for name, n in summary.get("flags", {}).items()})
    for label, per_metric in summary.get("per_label", {}).items():
        for metric, stats in per_metric.items():
            for stat in ("mean", "median"):
                value = stats.get(stat) if isinstance(stats, dict) else None
                if isinstance(value, (int, float)) and math.isfinite(value):  # null: undefined
                    metrics[f"{metric}_{label}_{stat}"] = float(value)
    return metrics


#: Longest side of a QC thumbnail in the MLflow table (MLflow also stores a compressed copy).
THUMBNAIL_PX = 256


def with_qc_thumbnails(safe: pd.DataFrame, out: Path, qc_sample: int | None) -> pd.DataFrame:
    """``safe`` with a ``qc`` column of PIL thumbnails of ``OUT/<case_id>/qc.png`` (MLflow's table
    view shows them in the cells); a row without a picture (a failure, beyond ``qc_sample``) gets a
    blank one, since MLflow refuses a column mixing pictures and other values. Unchanged when no
    case has a picture."""
    from PIL import Image

    pictures: list[Image.Image | None] = []
    budget = len(safe) if qc_sample is None else max(0, qc_sample)
    statuses = safe["status"] if "status" in safe.columns else pd.Series("ok", index=safe.index)
    for case_id, status in zip(safe["case_id"], statuses, strict=True):
        path = out / str(case_id) / "qc.png"
        if status == "ok" and budget > 0 and str(case_id) and path.is_file():
            budget -= 1
            with Image.open(path) as picture:
                thumb = picture.convert("RGB")
            thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            pictures.append(thumb)
        else:
            pictures.append(None)
    if not any(p is not None for p in pictures):
        return safe
    blank = Image.new("RGB", (8, 8), (255, 255, 255))
    table = safe.copy()
    table.insert(1, "qc", [p if p is not None else blank.copy() for p in pictures])
    return table


def _log_qc_pictures(run: Tracker, table: pd.DataFrame, out: Path, tmp: Path, qc_sample: int | None) -> None:
    ok = table[table["status"] == "ok"]["case_id"].tolist()
    if qc_sample is not None:
        ok = ok[: max(0, qc_sample)]
    qc_dir = tmp / "qc"
    qc_dir.mkdir()
    for case_id in ok:
        picture = out / case_id / "qc.png"
        if picture.is_file():
            shutil.copyfile(picture, qc_dir / f"{case_id}.png")
    if any(qc_dir.iterdir()):
        run.log_artifact(qc_dir, artifact_path="qc")
