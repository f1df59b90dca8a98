"""The MLflow run of ``medseg predict``: opened before the first case, finished after the tables.

Kept out of :mod:`workflows.predict` so the batch flow stays readable; MLflow itself is only
spoken in ``pipeline/tracking*.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from pipeline.bundle import bundle_fingerprint
from pipeline.case_row import CaseRow
from pipeline.report import MLFLOW_REPORT_FILE, write_batch_report
from pipeline.tracking_batch import BatchRunInfo
from pipeline.tracking_batch_run import BatchRun, open_batch_run


def open_predict_run(
    bundle, bundle_dir: Path, out_dir: Path, experiment: str, model_uri: str, run_name: str, params: dict
) -> BatchRun | None:
    """The batch's MLflow run, continued when ``out_dir`` was started with the same model."""
    return open_batch_run(
        BatchRunInfo(
            experiment=experiment,
            model_uri=model_uri,
            model_name=bundle.name,
            model_version=bundle.version_tag,
            params=params,
            registry_version=bundle.version if bundle.name else "",
            model_fingerprint=bundle_fingerprint(bundle_dir),
            run_name=run_name,
            code_version=bundle.code_version,
        ),
        out_dir,
    )


def finish_predict_run(
    run: BatchRun,
    rows: list[CaseRow],
    bundle,
    tables: tuple[pd.DataFrame, dict],
    out_dir: Path,
    qc_sample: int | None,
) -> bool:
    """Log the batch's tables, pictures, ``review.csv`` and MLflow report; end the run FINISHED."""
    table, summary = tables
    with tempfile.TemporaryDirectory(prefix="medseg-report-") as tmp:
        report = _mlflow_report(Path(out_dir), Path(tmp), rows, bundle)
        return run.finish(table, summary, qc_sample, [report] if report else [])


def _mlflow_report(out_dir: Path, folder: Path, rows: list[CaseRow], bundle) -> Path:
    """The batch report in its MLflow-safe variant (no paths, no free text; QC thumbnails embedded
    from ``out_dir``), written into ``folder``."""
    model = {"name": bundle.name, "version": bundle.version, "version_tag": bundle.version_tag}
    path = folder / MLFLOW_REPORT_FILE
    return Path(write_batch_report(out_dir, rows, model, for_mlflow=True, path=path))
