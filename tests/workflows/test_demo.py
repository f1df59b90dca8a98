"""`medseg demo` (what `make demo` runs) end to end, shortened to a few epochs."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import tracking_uri
from workflows.cli import main


def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "6", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "=== demo summary ==="):
        assert step in printed
    assert "mlflow ui --backend-store-uri" in printed
    assert (out / "ingested" / "manifest.csv").is_file()
    cases = pd.read_csv(out / "predictions" / "cases.csv", keep_default_na=False)
    ok = cases[cases["status"] == "ok"]
    assert len(ok) >= 7  # every CT series and NIfTI file of the generated hospital folder
    assert cases["status"].ne("error").all(), cases[["case_id", "reason"]]
    dicom_cases = [c for c in ok["case_id"] if (out / "predictions" / c / "seg.dcm").is_file()]
    assert len(dicom_cases) >= 5
    seg = pydicom.dcmread(out / "predictions" / dicom_cases[0] / "seg.dcm", stop_before_pixels=True)
    assert seg.Modality == "SEG"
    # Even six short epochs find the liver; a broken pipeline (flip, wrong grid) would not.
    assert ok["dice_liver"].astype(float).mean() > 0.5
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"case_id", "label", "dice", "hd95", "nsd"} <= set(metrics.columns)
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    assert client.get_model_version_by_alias("medseg-demo", "champion") is not None
    assert client.get_experiment_by_name("medseg-demo-predict") is not None


def _fake_jobs(monkeypatch, tmp_path, codes: dict[str, int] | None = None) -> dict[str, object]:
    """Replace the demo's data generation and the four jobs; returns {step: config it was given}."""
    import workflows.demo as demo

    seen: dict[str, object] = {}
    codes = codes or {}

    def job(step: str):
        def run(config):
            seen[step] = config
            if codes.get(step) == -1:
                raise ValueError(f"bad {step} input")
            return codes.get(step, 0)

        return run

    paths = (tmp_path / "h", tmp_path / "t", tmp_path / "m")
    monkeypatch.setattr(demo, "_write_demo_data", lambda out: paths)
    monkeypatch.setattr(demo, "_print_summary", lambda *args: print("=== demo summary ==="))
    for step in ("ingest", "train", "predict", "evaluate"):
        monkeypatch.setattr(demo, f"run_{step}", job(step))
    return seen


def test_demo_runs_each_job_with_the_config_its_flags_would_build(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDSEG_PSEUDONYM_SALT", raising=False)
    seen = _fake_jobs(monkeypatch, tmp_path, {"evaluate": 3})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("MEDSEG_PSEUDONYM_SALT is not set") == 1
    assert "expected for the MR series" in captured.out  # evaluate's exit code 3 is explained
    hospital, truth, msd = tmp_path / "h", tmp_path / "t", tmp_path / "m"
    assert seen["ingest"].source == hospital and seen["ingest"].out_dir == out / "ingested"
    assert seen["ingest"].workers == 1
    job = seen["train"]
    assert job.data == msd and job.network == "attention_unet" and job.folds == (0, 1)
    assert job.register == "medseg-demo" and job.work_dir == out / "training"
    assert job.train_config.epochs == 3 and job.train_config.device == "cpu"
    assert job.train_config.optimizer == "adamw" and tuple(job.plan_config.patch_size) == (32, 32, 16)
    assert (out / "demo_train.yaml").is_file()
    predict = seen["predict"]
    assert predict.model_uri == "models:/medseg-demo@champion" and predict.labels_dir == truth
    assert predict.source == hospital and predict.experiment == "medseg-demo-predict"
    assert predict.workers == 1 and predict.device == "cpu"
    assert seen["evaluate"].pred_dir == out / "predictions" and seen["evaluate"].gt_dir == truth


def test_a_failing_demo_step_stops_the_demo_naming_it(tmp_path, monkeypatch, capsys):
    seen = _fake_jobs(monkeypatch, tmp_path, {"predict": -1})
    with pytest.raises(SystemExit, match="`medseg predict` exited with code 2"):
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--workers", "1"])
    assert "medseg predict: error: bad predict input" in capsys.readouterr().err
    assert "evaluate" not in seen
