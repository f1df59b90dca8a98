"""Thin MLflow helpers: the tracker object that training code logs through.

Training code never imports ``mlflow``; it receives a :class:`Tracker` (or :class:`NullTracker`)
bound to one run. Trackers use ``MlflowClient`` with explicit run ids rather than MLflow's
process-global "active run", so folds can log to their own child runs from threads or Dask
workers; a tracker pickles as (tracking URI, experiment, run id) and reconnects on the worker.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db`` with artifacts
in ``<cwd>/mlartifacts`` (or ``MLFLOW_ARTIFACTS_DESTINATION``). Against a remote ``mlflow server``
the server chooses the artifact store.

Privacy: :func:`safe_params` drops keys that look like patient identifiers (PatientName,
PatientID, patient_id, birth date, accession number, instance UIDs) before anything is logged.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

_IDENTIFYING = (
    "patientname",
    "patientid",
    "patientsname",
    "birthdate",
    "accessionnumber",
    "instanceuid",
    "patientaddress",
)
#: The experiment tag MLflow 3's UI reads to choose an experiment's page (``mlflow.experimentKind``);
#: ``custom_model_development`` opens the runs table, not the GenAI traces view (an untagged
#: experiment without runs is shown as GenAI).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 900  # MLflow accepts at most 1000 metrics / 100 params per log_batch


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or a sqlite file in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def is_identifying_key(key: str) -> bool:
    """True for keys such as ``PatientName``, ``patient_id``, ``PatientBirthDate``, ``SeriesInstanceUID``."""
    squashed = re.sub(r"[^a-z]", "", key.lower())
    return any(marker in squashed for marker in _IDENTIFYING)


def safe_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params to ``a.b`` keys as strings, dropping identifying keys (with a warning)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if is_identifying_key(str(key)):
            logger.warning("not logging %r: it looks like a patient identifier", name)
            continue
        if isinstance(value, Mapping):
            out.update(safe_params(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


def code_version() -> str:
    """Git commit of the code (``+dirty`` when modified), or the package version without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"medseg-{version('medseg')}"
        except PackageNotFoundError:
            return "unknown"


def _local_artifact_root(uri: str) -> str | None:
    """Artifact folder for a local sqlite/file store (``None`` for a server, which decides itself)."""
    if os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"):
        return Path(os.environ["MLFLOW_ARTIFACTS_DESTINATION"]).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


class Tracker:
    """Logs params, metrics and artifacts into one MLflow run (``run_id``).

    Args:
        experiment: experiment name (created on first use).
        uri: tracking URI (default :func:`tracking_uri`).
        run_id: the run to log into; ``None`` until :meth:`start_run` made one.
    """

    def __init__(self, experiment: str, uri: str | None = None, run_id: str | None = None) -> None:
        self.experiment = experiment
        self.uri = uri or tracking_uri()
        self.run_id = run_id
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older medseg; a user's choice stays
                    self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            else:
                self._experiment_id = self.client.create_experiment(
                    self.experiment,
                    artifact_location=_local_artifact_root(self.uri),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
        return self._experiment_id

    def start_run(self, name: str, nested: bool = False, tags: Mapping[str, str] | None = None) -> Tracker:
        """Create a run (a child of this tracker's run when ``nested``) and return a tracker bound to it."""
        all_tags = dict(safe_params(tags or {}))
        if nested:
            if self.run_id is None:
                raise ValueError("a nested run needs a parent run")
            all_tags["mlflow.parentRunId"] = self.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return Tracker(self.experiment, self.uri, run.info.run_id)

    def bind(self, run_id: str) -> Tracker:
        """A tracker for an existing run (resume); the run is marked running again."""
        self.client.update_run(run_id, status="RUNNING")
        return Tracker(self.experiment, self.uri, run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params; identifying keys are dropped, already-logged keys are skipped."""
        flat = safe_params(params)
        existing = self.client.get_run(self._run()).data.params
        fresh = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self._run(), params=fresh[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at ``step`` (NaN/inf are skipped: MLflow rejects some backends' NaN)."""
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(entries), _BATCH):
            self.client.log_batch(self._run(), metrics=entries[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in safe_params(tags).items():
            self.client.set_tag(self._run(), key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run(), str(path), artifact_path)
        else:
            self.client.log_artifact(self._run(), str(path), artifact_path)

    def log_table(self, data: Any, artifact_file: str) -> None:
        """Log a table (a pandas DataFrame or a dict of columns) as the run's JSON table ``artifact_file``,
        which the MLflow UI shows and compares across runs.

        A column of PIL images is stored as pictures (``table_images/<name>/``) that the table view
        shows in its cells. A table already logged under that name (a resumed run) is replaced:
        MLflow itself would append the new rows to the old ones.
        """
        stem = artifact_file.rsplit(".", 1)[0]
        existing = {a.path for a in self.client.list_artifacts(self._run())}
        if artifact_file in existing:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            repo = get_artifact_repository(self.client.get_run(self._run()).info.artifact_uri)
            repo.delete_artifacts(artifact_file)
            if "table_images" in existing:
                repo.delete_artifacts(f"table_images/{stem}")
        self.client.log_table(self._run(), data=data, artifact_file=artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """End the run: ``FINISHED``, ``FAILED`` (an error) or ``KILLED`` (interrupted by the user)."""
        self.client.set_terminated(self._run(), status=status)

    def status(self) -> str:
        """The run's MLflow status (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``, ...)."""
        return str(self.client.get_run(self._run()).info.status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of a metric of this run."""
        return [(m.step, m.value) for m in self.client.get_metric_history(self._run(), key)]

    def _run(self) -> str:
        if self.run_id is None:
            raise ValueError("tracker is not bound to a run; call start_run first")
        return self.run_id


class NullTracker(Tracker):
    """Logs nothing (tracking disabled or unreachable); same interface as :class:`Tracker`."""

    def __init__(self, experiment: str = "", uri: str | None = None, run_id: str | None = None) -> None:
        self.experiment, self.uri, self.run_id = experiment, "", run_id
        self._client, self._experiment_id = None, None

    def start_run(self, name: str, nested: bool = False, tags: Mapping[str, str] | None = None) -> Tracker:
        return NullTracker()

    def bind(self, run_id: str) -> Tracker:
        return NullTracker()

    def log_params(self, params: Mapping[str, Any]) -> None:
        safe_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_table(self, data: Any, artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def status(self) -> str:
        return ""

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []


def end_run_status(exc: BaseException) -> str:
    """MLflow status for a run that stops because of ``exc``: ``KILLED`` for Ctrl-C, else ``FAILED``."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def end_runs_quietly(trackers: list[Tracker], status: str) -> None:
    """End each still-running run with ``status``; a tracking error here is logged, never raised.

    Used on error paths, where the original exception must reach the user rather than a second
    error from an unreachable tracking store; runs that already ended keep their status.
    """
    for tracker in trackers:
        try:
            if tracker.run_id is not None and tracker.status() in ("RUNNING", "SCHEDULED"):
                tracker.end(status)
        except Exception as exc:  # the store may be the reason we are failing
            logger.warning("could not mark MLflow run %s as %s: %s", tracker.run_id, status, exc)


def check_tracking_reachable(uri: str | None = None) -> str:
    """``""`` when the tracking store answers a quick ``search_experiments``, else the problem.

    HTTP retries are turned off for this probe: MLflow's default backoff would make an
    unreachable server cost minutes before the job can say so.
    """
    uri = uri or tracking_uri()
    # No retries, and a short timeout unless the user chose one (a silent host would take 120 s).
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in probe}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", probe["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return ""
    except Exception as exc:  # any backend error means "not usable now"
        logger.warning("MLflow tracking store %s is not reachable: %s", uri, exc)
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_global_uri(uri: str) -> None:
    """Point MLflow's fluent API at ``uri`` (needed by ``mlflow.pyfunc.log_model`` in the bundle module)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
