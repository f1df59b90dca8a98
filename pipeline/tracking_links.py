"""Where a reviewer finds a job in MLflow, and which registered model version a batch run used.

* :func:`review_lines`: the absolute, copy-pasteable ``mlflow ui --backend-store-uri ... --host
  127.0.0.1 --port 5000`` for a local store, and the direct URLs of an experiment, a run and a
  registered model (MLflow's UI routes ``#/experiments/<id>/runs/<run_id>``, ``#/models/<name>``).
* :func:`link_model_version`: MLflow 3 links a run to the model it *used* through the run's
  inputs (``log_inputs`` with the model version's ``LoggedModel``); the run also gets the tags
  ``medseg.model_version_uri`` (``models:/NAME/VERSION``) and ``medseg.model_name``/``_version``.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from urllib.parse import quote

from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

UI_HOST = "127.0.0.1"
UI_PORT = 5000
MODEL_VERSION_URI_TAG = "medseg.model_version_uri"


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///rel/mlflow.db`` -> ``sqlite:////abs/mlflow.db``; a server URI is unchanged."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder path (file store)
        return Path(uri).resolve().as_uri()
    return uri


def ui_base_url(uri: str) -> str:
    """The address of the MLflow UI: the server itself, or the local ``mlflow ui`` of :func:`mlflow_ui_command`."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return f"http://{UI_HOST}:{UI_PORT}"


def mlflow_executable() -> str:
    """The ``mlflow`` next to this Python (the project venv's), else plain ``mlflow``."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.is_file() else "mlflow"


def mlflow_ui_command(uri: str) -> str | None:
    """The command that serves a local store's UI (``None`` for a server: it is its own UI)."""
    if uri.startswith(("http://", "https://")):
        return None
    parts = [mlflow_executable(), "ui", "--backend-store-uri", absolute_tracking_uri(uri)]
    return " ".join(shlex.quote(p) for p in parts) + f" --host {UI_HOST} --port {UI_PORT}"


#: Query string that selects MLflow's runs-table view of an experiment.
ML_VIEW = "?workflowType=machine_learning"


def experiment_url(uri: str, experiment_id: str) -> str:
    # MLflow 3 opens an experiment on its GenAI overview unless the URL asks for the ML runs view
    # (the experimentKind tag alone is not enough in 3.17: checked in chromium by the browser test).
    return f"{ui_base_url(uri)}/#/experiments/{experiment_id}{ML_VIEW}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url(uri)}/#/experiments/{experiment_id}/runs/{run_id}{ML_VIEW}"


def model_url(uri: str, model_name: str) -> str:
    return f"{ui_base_url(uri)}/#/models/{quote(model_name, safe='')}"


def experiment_id_of(uri: str, name: str) -> str | None:
    """The id of experiment ``name`` (``None`` when absent or the store cannot be read)."""
    try:
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except Exception as exc:  # an unreachable store: no URL to print
        logger.debug("no experiment id for %s: %s", name, exc)
        return None
    return None if found is None else str(found.experiment_id)


def review_lines(
    uri: str,
    *,
    experiment_id: str | None = None,
    run_id: str | None = None,
    training_experiment_id: str | None = None,
    model_name: str | None = None,
) -> list[str]:
    """Lines to print after a job: how to open the UI, then the direct URLs that are known."""
    lines = []
    command = mlflow_ui_command(uri)
    if command:
        lines.append(f"review in MLflow: {command}")
    else:
        lines.append(f"review in MLflow at {ui_base_url(uri)}")
    if experiment_id and run_id:
        lines.append(f"  batch run:           {run_url(uri, experiment_id, run_id)}")
    elif experiment_id:
        lines.append(f"  experiment:          {experiment_url(uri, experiment_id)}")
    if training_experiment_id:
        lines.append(f"  training experiment: {experiment_url(uri, training_experiment_id)}")
    if model_name:
        lines.append(f"  registered model:    {model_url(uri, model_name)}")
    return lines


def link_model_version(client: MlflowClient, run_id: str, model_name: str, model_version: str) -> str:
    """Link ``run_id`` to registered ``model_name`` version ``model_version``; returns its ``models:/`` URI.

    The version's ``LoggedModel`` (MLflow 3 registers logged models) becomes an input of the run,
    once: a resumed run is not linked twice. A version without one (registered from a plain run
    artifact) keeps only the tags; a version this store does not hold (a bundle folder downloaded
    from another store) is not linked at all and gives ``""``.
    """
    try:
        version = client.get_model_version(model_name, model_version)
    except MlflowException:  # a bundle downloaded from another store: nothing here to link to
        logger.info("model %s version %s is not in this store; the run is not linked", model_name, model_version)
        return ""
    version_uri = f"models:/{model_name}/{model_version}"
    client.set_tag(run_id, MODEL_VERSION_URI_TAG, version_uri)
    model_id = _logged_model_id(version)
    if model_id:
        inputs = client.get_run(run_id).inputs
        linked = {m.model_id for m in (getattr(inputs, "model_inputs", None) or [])}
        if model_id not in linked:
            client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    return version_uri


def _logged_model_id(version: object) -> str | None:
    """The ``LoggedModel`` id of a model version: its ``model_id`` or, where the store leaves that
    empty (MLflow 3.17's sqlite registry), the ``m-...`` of its ``models:/m-...`` source."""
    model_id = getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/") :].split("/", 1)[0]
    return model_id or None
