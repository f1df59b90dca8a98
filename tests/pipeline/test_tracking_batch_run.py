"""The batch run's life on a real sqlite store: opened at the start, resumed, interrupted, linked."""

from __future__ import annotations

import json
import time

import mlflow
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.tracking import tracking_uri
from pipeline.tracking_batch import BatchRunInfo, batch_run_name
from pipeline.tracking_batch_run import RUN_STATE_FILE, open_batch_run
from pipeline.tracking_links import MODEL_VERSION_URI_TAG, mlflow_ui_command, review_lines


def _info(**kw) -> BatchRunInfo:
    base = {"experiment": "medseg-predict", "model_uri": "/data/SMITH JOHN/bundle", "model_fingerprint": "fp1"}
    return BatchRunInfo(**{**base, **kw})


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def _cases(out, ids, statuses):
    for case_id, status in zip(ids, statuses, strict=True):
        if status == "ok":
            (out / case_id).mkdir(parents=True)
            Image.new("RGB", (600, 300), (10, 200, 30)).save(out / case_id / "qc.png")
    return pd.DataFrame({"case_id": ids, "status": statuses, "source": ["/PHI/x"] * len(ids), "dice_liver": 0.9})


def test_run_is_open_while_the_batch_works_and_finishes_with_its_tables(tmp_path):
    out = tmp_path / "out"
    run = open_batch_run(_info(code_version="abc123def4567890"), out)
    assert run is not None and not run.resumed
    info = _client().get_run(run.run_id).info
    assert info.status == "RUNNING" and info.run_name == "predict bundle@abc123def456"  # never a folder name
    assert json.loads((out / RUN_STATE_FILE).read_text())["run_id"] == run.run_id
    run.progress(1, 0)
    time.sleep(1.2)  # the batch works
    table = _cases(out, ["case-a", "case-b", "skipped-0123456789ab"], ["ok", "error", "skipped"])
    (out / "review.csv").write_text("case_id,risk\ncase-a,0.1\n")
    summary = {"cases": {"ok": 1, "error": 1, "skipped": 1}}
    assert run.finish(table, summary)
    got = _client().get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.end_time - got.info.start_time >= 1000
    assert got.data.metrics["cases_failed"] == 1 and got.data.metrics["cases_total"] == 3
    assert got.data.params["model_uri"] == "bundle"  # the folder path stays home
    names = {a.path for a in _client().list_artifacts(run.run_id)}
    assert {"cases.json", "cases.csv", "review.csv", "table_images", "qc"} <= names
    logged = _client().load_table(got.info.experiment_id, "cases.json", run_ids=[run.run_id])
    assert logged["case_id"].tolist() == ["case-a", "case-b", "skipped-0123456789ab"]
    assert [c["type"] for c in logged["qc"]] == ["image"] * 3 and "source" not in logged.columns


def test_resume_continues_the_run_unless_the_model_changed_or_the_run_was_deleted(tmp_path):
    out = tmp_path / "out"
    first = open_batch_run(_info(), out)
    first.abort(KeyboardInterrupt())
    assert _client().get_run(first.run_id).info.status == "KILLED"
    again = open_batch_run(_info(), out)
    assert again.resumed and again.run_id == first.run_id
    assert _client().get_run(first.run_id).info.status == "RUNNING"
    again.finish(_cases(out, ["case-a"], ["ok"]), {"cases": {"ok": 1}})
    third = open_batch_run(_info(), out)  # the same batch run once more (nothing new)
    assert third.run_id == first.run_id
    third.finish(_cases(out, ["case-b"], ["ok"]), {"cases": {"ok": 2}})
    exp = _client().get_run(first.run_id).info.experiment_id
    assert _client().load_table(exp, "cases.json", run_ids=[first.run_id])["case_id"].tolist() == ["case-b"]
    other = open_batch_run(_info(model_fingerprint="fp2"), out)  # another model
    assert other.run_id != first.run_id and not other.resumed
    _client().delete_run(other.run_id)
    fresh = open_batch_run(_info(model_fingerprint="fp2"), out)
    assert fresh.run_id not in (first.run_id, other.run_id)


def test_an_error_leaves_a_failed_run_with_its_progress(tmp_path):
    run = open_batch_run(_info(), tmp_path / "out")
    run.progress(1, 0)
    run.progress(2, 1)
    run.abort(RuntimeError("disk of /PHI/SMITH full"))
    got = _client().get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["medseg.end_reason"] == "RuntimeError"
    assert got.data.metrics["progress_cases_done"] == 2 and got.data.metrics["progress_cases_failed"] == 1
    assert "SMITH" not in json.dumps(got.to_dictionary())


def test_unreachable_store_gives_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert open_batch_run(_info(), tmp_path / "out") is None


class _Constant(PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return model_input


@pytest.fixture
def registered_version() -> str:
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    mlflow.set_experiment("medseg-train")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_Constant(), registered_model_name="liver-net", pip_requirements=[]
        )
    return str(info.registered_model_version)


def test_run_is_named_after_and_linked_to_the_model_version_it_used(tmp_path, registered_version):
    info = _info(model_name="liver-net", registry_version=registered_version, model_version="liver-net/v1")
    assert batch_run_name(info) == f"predict liver-net@v{registered_version}"
    assert batch_run_name(_info(run_name="night batch")) == "night batch"
    run = open_batch_run(info, tmp_path / "out")
    got = _client().get_run(run.run_id)
    assert got.info.run_name == "predict liver-net@v1"
    assert got.data.tags[MODEL_VERSION_URI_TAG] == "models:/liver-net/1"
    model_id = _client().get_model_version("liver-net", registered_version).source.removeprefix("models:/")
    assert model_id.startswith("m-")
    assert model_id and [m.model_id for m in got.inputs.model_inputs] == [model_id]
    run.finish(_cases(tmp_path / "out", ["case-a"], ["ok"]), {"cases": {"ok": 1}})
    again = open_batch_run(info, tmp_path / "out")  # linked once, not twice
    assert [m.model_id for m in _client().get_run(again.run_id).inputs.model_inputs] == [model_id]
    foreign = open_batch_run(_info(model_name="liver-net", registry_version="99"), tmp_path / "o2")
    assert foreign is not None and MODEL_VERSION_URI_TAG not in _client().get_run(foreign.run_id).data.tags
    lines = again.review_lines()
    assert any(f"/#/experiments/{got.info.experiment_id}/runs/{run.run_id}" in line for line in lines)
    assert any(line.endswith("http://127.0.0.1:5000/#/models/liver-net") for line in lines)


def test_printed_ui_command_is_absolute_with_host_and_port(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = mlflow_ui_command("sqlite:///rel/mlflow.db")
    assert f"--backend-store-uri sqlite:///{tmp_path}/rel/mlflow.db --host 127.0.0.1 --port 5000" in command
    assert command.split()[0].endswith("mlflow") and command.split()[1] == "ui"
    assert mlflow_ui_command("http://mlflow.hospital:5000") is None
    assert review_lines("http://mlflow.hospital:5000/", experiment_id="3", run_id="r")[1].endswith(
        "http://mlflow.hospital:5000/#/experiments/3/runs/r?workflowType=machine_learning"
    )
