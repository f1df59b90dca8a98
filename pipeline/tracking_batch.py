"""MLflow logging of one batch-prediction run (``medseg predict``).

What is logged, and what is deliberately not:

* params: model name/version/URI and the non-identifying run settings; tags: ``medseg.job=predict``;
* metrics: case counts by status and per-label mean/median Dice, HD95, NSD and predicted volume;
* artifacts: ``cases.csv`` (and the same as an MLflow table ``cases.json``) *without* the ``source``
  column, ``failures.csv``, ``summary.json``, and QC pictures ``qc/<case_id>.png``.

Case ids are pseudonymous (salted hashes of SeriesInstanceUIDs, or the hospital's own NIfTI
names). Source paths, which may contain patient names, never leave the output folder; failure
reasons are scrubbed of paths and UID-like strings before logging.

If the tracking server cannot be reached, nothing is raised: the masks and CSVs are already on
disk, a warning says what was not logged, and the caller turns ``False`` into exit code 4.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.tracking import Tracker, check_tracking_reachable, tracking_uri

logger = logging.getLogger(__name__)

_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?[\\/]?(?:[^\s\\/:'\"]+[\\/])+[^\s\\/:'\"]*")
_UIDLIKE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@dataclass(frozen=True)
class BatchRunInfo:
    experiment: str
    model_uri: str
    model_name: str = ""
    model_version: str = ""
    params: dict = field(default_factory=dict)


def scrub_text(text: str) -> str:
    """Remove file paths and UID-like dotted numbers from a free-text reason."""
    return _UIDLIKE.sub("<uid>", _PATHLIKE.sub("<path>", str(text)))


def loggable_cases(table: pd.DataFrame) -> pd.DataFrame:
    """``cases.csv`` as it may leave the hospital: no source paths, scrubbed reasons."""
    safe = table.drop(columns=[c for c in ("source",) if c in table.columns]).copy()
    if "reason" in safe.columns:
        safe["reason"] = safe["reason"].fillna("").map(scrub_text)
    return safe


def log_batch_run(info: BatchRunInfo, out_dir: Path, qc_sample: int | None = None) -> bool:
    """Log the finished batch in ``out_dir`` as one MLflow run. Returns False if it could not."""
    uri = tracking_uri()
    problem = check_tracking_reachable(uri)
    if problem:
        _warn_not_logged(uri, problem, out_dir)
        return False
    try:
        _log(info, Path(out_dir), qc_sample, uri)
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


def _log(info: BatchRunInfo, out: Path, qc_sample: int | None, uri: str) -> None:
    table = pd.read_csv(out / "cases.csv", keep_default_na=False)
    summary = json.loads((out / "summary.json").read_text())
    # Tracker creates the experiment with a local artifact root next to a sqlite store (never ./mlruns).
    run = Tracker(info.experiment, uri).start_run(
        f"predict-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            "medseg.job": "predict",
            "medseg.model_name": info.model_name,
            "medseg.model_version": info.model_version,
        },
    )
    status = "FAILED"
    try:
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
            safe[safe["status"] == "error"][["case_id", "reason"]].to_csv(tmp / "failures.csv", index=False)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            for name in ("cases.csv", "failures.csv", "summary.json"):
                run.log_artifact(tmp / name)
            assert run.run_id is not None  # start_run returns a tracker bound to the new run
            run.client.log_table(run.run_id, data=safe, artifact_file="cases.json")
            _log_qc_pictures(run, table, out, tmp, qc_sample)
        status = "FINISHED"
        logger.info("batch logged to MLflow run %s (experiment %s)", run.run_id, info.experiment)
    finally:
        run.end(status)


def _safe_model_uri(uri: str) -> str:
    """Registry and run URIs are fine; a local folder path is reduced to its last component."""
    if uri.startswith(("models:/", "runs:/")):
        return uri
    return Path(uri).name


def _summary_metrics(summary: dict) -> dict[str, float]:
    metrics = {f"cases_{status}": float(n) for status, n in summary.get("cases", {}).items()}
    for label, per_metric in summary.get("per_label", {}).items():
        for metric, stats in per_metric.items():
            for stat in ("mean", "median"):
                value = stats.get(stat) if isinstance(stats, dict) else None
                if value is not None and value == value:  # skip NaN
                    metrics[f"{metric}_{label}_{stat}"] = float(value)
    return metrics


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
