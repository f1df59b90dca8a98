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


def test_experiments_open_on_the_runs_table_not_the_genai_view():
    from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(tracking_uri=tracking_uri())
    made = Tracker("exp-kind").experiment_id  # created by medseg
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("exp-old")  # made by an older medseg: tagged on first use
    assert Tracker("exp-old").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = client.create_experiment("exp-mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert Tracker("exp-mine").experiment_id == mine  # a user's choice stays
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_log_table_with_pictures_and_replacing_on_resume():
    import pandas as pd
    from PIL import Image

    run = Tracker("exp-pictures").start_run("t")
    pictures = [Image.new("RGB", (20, 10), (200, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 200))]
    run.log_table(pd.DataFrame({"case_id": ["a", "b"], "qc": pictures}), artifact_file="cases.json")
    run.log_table(pd.DataFrame({"case_id": ["a", "b", "c"], "qc": pictures + pictures[:1]}), "cases.json")
    client = MlflowClient(tracking_uri=tracking_uri())
    table = client.load_table(client.get_run(run.run_id).info.experiment_id, "cases.json", run_ids=[run.run_id])
    assert table["case_id"].tolist() == ["a", "b", "c"]  # replaced, not appended to
    cells = table["qc"].tolist()
    assert all(c["type"] == "image" and c["filepath"].startswith("table_images/cases/") for c in cells)
    stored = {a.path for a in client.list_artifacts(run.run_id, "table_images/cases")}
    assert {c["filepath"] for c in cells} <= stored and len(stored) == 6  # png + webp per row, old ones gone
