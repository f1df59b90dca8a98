"""The life of a batch's MLflow run: opened when the batch starts, closed when it ends.

* :func:`open_batch_run` starts the run before the first case (status ``RUNNING`` while the batch
  works, so MLflow shows its true duration), named by :func:`~pipeline.tracking_batch.batch_run_name`,
  tagged, with its params, and linked to the registered model version it uses
  (:func:`~pipeline.tracking_links.link_model_version`).
* Resume: the run id is kept in ``OUT/.medseg/mlflow_run.json`` with the tracking store, the
  experiment and the model's fingerprint; a rerun on the same OUT with the same model continues
  that run (marked ``RUNNING`` again). Another model, another store, or a run deleted in MLflow
  gives a new run (and a new file).
* :meth:`BatchRun.progress` logs ``progress_cases_done`` / ``progress_cases_failed`` per case, so an
  interrupted batch leaves a trace; :meth:`BatchRun.abort` ends the run ``KILLED`` (Ctrl-C) or
  ``FAILED`` with the tag ``medseg.end_reason`` (the exception's type only: messages quote paths).
* :meth:`BatchRun.finish` logs the tables, pictures and report and ends the run ``FINISHED``.

No step raises because of MLflow: an unusable store is a warning and ``False`` / ``None``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.tracking import Tracker, check_tracking_reachable, end_run_status, tracking_uri
from pipeline.tracking_batch import (
    BatchRunInfo,
    _safe_model_uri,
    _warn_not_logged,
    batch_run_name,
    batch_tags,
    log_batch_contents,
)
from pipeline.tracking_links import link_model_version, review_lines
from preprocessing.atomic import write_text_atomic

logger = logging.getLogger(__name__)

#: Where a batch folder remembers its MLflow run (relative to OUT).
RUN_STATE_FILE = Path(".medseg") / "mlflow_run.json"


@dataclass
class BatchRun:
    """An open batch run. ``resumed``: it continues the run of an earlier, unfinished attempt."""

    tracker: Tracker
    info: BatchRunInfo
    out_dir: Path
    experiment_id: str
    resumed: bool = False
    _progress_ok: bool = True

    @property
    def run_id(self) -> str:
        return str(self.tracker.run_id)

    def review_lines(self, training_experiment_id: str | None = None) -> list[str]:
        """The ``mlflow ui`` command and the URLs of this run and of its registered model."""
        return review_lines(
            self.tracker.uri,
            experiment_id=self.experiment_id,
            run_id=self.run_id,
            training_experiment_id=training_experiment_id,
            model_name=self.info.model_name if self.info.registry_version else None,
        )

    def progress(self, done: int, failed: int) -> None:
        """Log the running counts (step = cases done); a tracking error disables it with one warning."""
        if not self._progress_ok:
            return
        try:
            self.tracker.log_metrics(
                {"progress_cases_done": float(done), "progress_cases_failed": float(failed)}, step=done
            )
        except Exception as exc:  # the batch goes on; the final log reports what is missing
            self._progress_ok = False
            logger.warning("MLflow: could not log the batch's progress (%s); going on", type(exc).__name__)

    def finish(
        self,
        cases: pd.DataFrame,
        summary: dict,
        qc_sample: int | None = None,
        extra_artifacts: Sequence[Path] = (),
    ) -> bool:
        """Log the finished batch and end the run ``FINISHED``; ``False`` when that failed (then ``FAILED``)."""
        try:
            log_batch_contents(self.tracker, self.info, self.out_dir, cases, summary, qc_sample, extra_artifacts)
            self.tracker.end("FINISHED")
            return True
        except Exception as exc:  # the outputs are safe on disk; losing the log must not lose them
            _warn_not_logged(self.tracker.uri, f"{type(exc).__name__}: {exc}", self.out_dir)
            self._end_quietly("FAILED", type(exc).__name__)
            return False

    def abort(self, exc: BaseException) -> None:
        """End the run ``KILLED`` (Ctrl-C) or ``FAILED`` (an error), naming the exception's type."""
        self._end_quietly(end_run_status(exc), type(exc).__name__)

    def _end_quietly(self, status: str, reason: str) -> None:
        try:
            self.tracker.set_tags({"medseg.end_reason": reason})
            self.tracker.end(status)
        except Exception as exc:  # the store may be why we are stopping
            logger.warning("could not mark MLflow run %s as %s: %s", self.run_id, status, exc)


def open_batch_run(info: BatchRunInfo, out_dir: Path) -> BatchRun | None:
    """Start (or, on resume, continue) the batch's run; ``None`` with a warning when MLflow is unusable."""
    uri = tracking_uri()
    problem = check_tracking_reachable(uri)
    if problem:
        _warn_not_logged(uri, problem, out_dir)
        return None
    try:
        return _open(info, Path(out_dir), uri)
    except Exception as exc:  # the batch runs without its run; the caller exits 4 at the end
        _warn_not_logged(uri, f"{type(exc).__name__}: {exc}", out_dir)
        return None


def _open(info: BatchRunInfo, out: Path, uri: str) -> BatchRun:
    tracker = Tracker(info.experiment, uri)
    experiment_id = tracker.experiment_id  # created (with its kind tag) on first use
    previous = _resumable_run(tracker, out, info)
    if previous is not None:
        run, resumed = tracker.bind(previous), True
        logger.info("resuming MLflow run %s", previous)
    else:
        run, resumed = tracker.start_run(batch_run_name(info), tags=batch_tags(info)), False
    state = {
        "run_id": run.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "experiment": info.experiment,
        "model_fingerprint": info.model_fingerprint,
    }
    write_text_atomic(_state_path(out), json.dumps(state, indent=2))
    run.log_params(
        {
            "model_uri": _safe_model_uri(info.model_uri),
            "model_name": info.model_name,
            "model_version": info.model_version,
            **info.params,
        }
    )
    if info.model_name and info.registry_version:
        link_model_version(run.client, str(run.run_id), info.model_name, info.registry_version)
    return BatchRun(run, info, out, experiment_id, resumed)


def _state_path(out: Path) -> Path:
    path = out / RUN_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _resumable_run(tracker: Tracker, out: Path, info: BatchRunInfo) -> str | None:
    """The run id of an earlier attempt on ``out`` with the same store, experiment and model, if it still exists."""
    path = out / RUN_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (
        isinstance(state, dict)
        and state.get("tracking_uri") == tracker.uri
        and state.get("experiment") == info.experiment
        and state.get("model_fingerprint") == info.model_fingerprint
        and bool(info.model_fingerprint)
    )
    if not same:
        return None
    try:
        run = tracker.client.get_run(str(state.get("run_id")))
    except Exception:  # deleted for good, or never in this store
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != tracker.experiment_id:
        return None
    return str(run.info.run_id)
