"""Tracker: nested runs on a real sqlite store, identifier stripping, pickling to workers."""

from __future__ import annotations

import pickle

from mlflow.tracking import MlflowClient

from pipeline.tracking import NullTracker, Tracker, check_tracking_reachable, safe_params, tracking_uri


def test_safe_params_drops_identifiers_and_flattens():
    flat = safe_params(
        {
            "PatientName": "DOE^JOHN",
            "patient_id": "123",
            "meta": {"PatientID": "x", "StudyInstanceUID": "1.2", "lr": 0.1},
            "network": "unet",
        }
    )
    assert flat == {"meta.lr": "0.1", "network": "unet"}


def test_nested_runs_metrics_and_pickling(tmp_path):
    assert check_tracking_reachable() == ""
    parent = Tracker("exp-t").start_run("cv", tags={"medseg.job": "train", "PatientID": "P1"})
    child = pickle.loads(pickle.dumps(parent.start_run("fold-0", nested=True)))  # as on a Dask worker
    child.log_params({"lr": 0.01, "patient_id": "P1", "plan": {"spacing": [1, 2]}})
    child.log_params({"lr": 0.02})  # already logged: skipped, no MLflow error
    for step in (1, 2, 3):
        child.log_metrics({"val_dice": step / 10, "nan": float("nan")}, step=step)
    (tmp_path / "a.txt").write_text("hello")
    child.log_artifact(tmp_path / "a.txt", "files")
    child.end()
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"lr": "0.01", "plan.spacing": "[1, 2]"}
    assert [m.value for m in client.get_metric_history(child.run_id, "val_dice")] == [0.1, 0.2, 0.3]
    assert "nan" not in run.data.metrics
    assert "PatientID" not in client.get_run(parent.run_id).data.tags
    assert [a.path for a in client.list_artifacts(child.run_id, "files")] == ["files/a.txt"]
    assert run.info.status == "FINISHED"


def test_unreachable_server_is_reported_quickly():
    assert check_tracking_reachable("http://127.0.0.1:9") != ""
    NullTracker().start_run("x").log_metrics({"a": 1.0}, step=0)  # no-op, no error


def test_log_table_logs_a_json_table_artifact():
    import pandas as pd

    run = Tracker("exp-table").start_run("t")
    run.log_table(pd.DataFrame({"case_id": ["a", "b"], "dice_liver": [0.9, 0.8]}), artifact_file="cases.json")
    run.end()
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["cases.json"]
    table = client.load_table(
        client.get_run(run.run_id).info.experiment_id, "cases.json", run_ids=[run.run_id]
    )
    assert table["case_id"].tolist() == ["a", "b"] and table["dice_liver"].tolist() == [0.9, 0.8]
    NullTracker().log_table(pd.DataFrame(), artifact_file="x.json")  # no-op, no error
