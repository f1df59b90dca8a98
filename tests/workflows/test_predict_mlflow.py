"""The batch run as a reviewer meets it in MLflow, through the real CLI and a real sqlite store.

Opened when the batch starts (true duration), named after the model version and linked to it,
killed by Ctrl-C with its progress, continued (same run id) by the rerun, with ``cases_failed``,
no blank case ids and the QC thumbnails in the logged table.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd
from mlflow.tracking import MlflowClient

import workflows.predict as predict
from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from pipeline.tracking_batch_run import RUN_STATE_FILE
from pipeline.tracking_links import MODEL_VERSION_URI_TAG
from preprocessing.synthetic import write_hospital_folder
from workflows.cli import _print_training_review, main
from workflows.exit_codes import EXIT_INTERRUPTED, EXIT_OK


def _interrupt_after_first_case(real):
    """Fault injection: Ctrl-C arrives once the first case is done."""

    def run_case_tasks(*args, **kwargs):
        for row in real(*args, **kwargs):
            yield row
            raise KeyboardInterrupt

    return run_case_tasks


def test_batch_run_lifecycle_through_the_cli(tmp_path, monkeypatch, trained_model, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_model.tracking_uri)
    scans = tmp_path / "scans"
    write_hospital_folder(scans, n_series=2, seed=5, shape=(48, 48, 24))
    (scans / "SMITH_JOHN notes.txt").write_text("not an image")  # skipped: once a blank case id
    out = tmp_path / "out"
    argv = ["predict", str(scans), "--model", trained_model.model_uri, "--out", str(out),
            "--workers", "1", "--experiment", "review-batch"]
    client = MlflowClient(tracking_uri=trained_model.tracking_uri, registry_uri=trained_model.tracking_uri)

    with monkeypatch.context() as m:
        m.setattr(predict, "run_case_tasks", _interrupt_after_first_case(predict.run_case_tasks))
        assert main(argv) == EXIT_INTERRUPTED
    run_id = json.loads((out / RUN_STATE_FILE).read_text())["run_id"]
    killed = client.get_run(run_id)
    version = client.get_model_version_by_alias("fixture-phantom", "champion").version
    assert killed.info.status == "KILLED" and killed.data.tags["medseg.end_reason"] == "KeyboardInterrupt"
    assert killed.data.metrics["progress_cases_done"] == 1
    assert killed.info.run_name == f"predict fixture-phantom@v{version}"
    assert killed.data.tags[MODEL_VERSION_URI_TAG] == f"models:/fixture-phantom/{version}"
    assert len(killed.inputs.model_inputs) == 1  # the version's LoggedModel is an input of the run

    capsys.readouterr()
    started = time.monotonic()
    assert main(argv) == EXIT_OK  # the rerun resumes the batch and its run
    seconds = time.monotonic() - started
    printed = capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and json.loads((out / RUN_STATE_FILE).read_text())["run_id"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert (run.info.end_time - run.info.start_time) / 1000 >= 0.5 * seconds  # not ~0: opened at the start
    assert run.data.metrics["cases_failed"] == 0 and run.data.metrics["cases_ok"] == 2
    assert len(run.inputs.model_inputs) == 1
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment_by_name("fixture-train").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    assert (cases["case_id"] != "").all()
    skipped = cases[cases["status"] == "skipped"]["case_id"].tolist()
    assert skipped and all(c.startswith("skipped-") and len(c) == len("skipped-") + 12 for c in skipped)
    assert cases["case_id"].is_unique  # one pseudonym per skipped file (a salted hash of its path)
    table = client.load_table(run.info.experiment_id, "cases.json", run_ids=[run_id])
    assert sorted(table["case_id"]) == sorted(cases["case_id"])  # replaced on resume, not appended
    assert all(cell["type"] == "image" for cell in table["qc"]) and "source" not in table.columns
    assert "SMITH" not in json.dumps(run.to_dictionary(), default=str) + table.to_json()

    db = trained_model.tracking_uri[len("sqlite:///") :]
    assert f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000" in printed
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}" in printed
    assert "http://127.0.0.1:5000/#/models/fixture-phantom" in printed


def test_run_name_flag_and_training_review_lines(tmp_path, monkeypatch, trained_model, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_model.tracking_uri)
    scans = tmp_path / "scans"
    write_hospital_folder(scans, n_series=1, seed=6, shape=(48, 48, 24))
    argv = ["predict", str(scans), "--model", str(trained_model.bundle_dir), "--out", str(tmp_path / "o"),
            "--workers", "1", "--experiment", "review-named", "--run-name", "night batch"]
    assert main(argv) == EXIT_OK
    client = MlflowClient(tracking_uri=trained_model.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("review-named").experiment_id])
    assert run.info.run_name == "night batch"
    capsys.readouterr()
    _print_training_review(argparse.Namespace(experiment="fixture-train", register="fixture-phantom"))
    printed = capsys.readouterr().out
    train_id = client.get_experiment_by_name("fixture-train").experiment_id
    assert f"training experiment: http://127.0.0.1:5000/#/experiments/{train_id}" in printed
    assert "--host 127.0.0.1 --port 5000" in printed and "#/models/fixture-phantom" in printed
